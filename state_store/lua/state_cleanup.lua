-- state_cleanup: delete staged, uncommitted chunk and segment sets (state_store/staging.py).
--
-- A crash between staging and committing leaves chunk sets (pending member
-- "<version>.<nonce>.<count>") or segment sets (pending member "s.<nonce>.<id>,<id>...").
-- A commit removes its own member from the pending set, so a listed set that is no longer
-- pending was committed: it is never touched, and neither is the committed generation.
--
-- KEYS[1]  state hash
-- KEYS[2]  pending sorted set
-- KEYS[3...]  the keys of every listed set, set after set
-- ARGV  per set: its pending member name, its number of keys in KEYS
--
-- Reply: the number of sets deleted.
local stored = redis.call('HGET', KEYS[1], 'generation') or ''
local keyi, argi, removed = 2, 1, 0
while argi < #ARGV do
  local name, n = ARGV[argi], tonumber(ARGV[argi + 1])
  argi = argi + 2
  if name ~= stored and redis.call('ZSCORE', KEYS[2], name) then
    for i = 1, n do redis.call('DEL', KEYS[keyi + i]) end
    redis.call('ZREM', KEYS[2], name)
    removed = removed + 1
  end
  keyi = keyi + n
end
return removed
