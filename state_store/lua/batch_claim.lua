-- batch_claim: claim a stream for a batch, in one round trip (state_store/claims.py).
--
-- Refreshes the stream's scheduled flag (a task is running for it), refuses a parked stream,
-- takes the lease with a new fencing token, and reads the state head the batch starts from
-- and commits against: what took five round trips (flag PEXPIRE, failure HMGET, lease script,
-- head HMGET, pending ZRANGE).
--
-- How a lease is taken (its value, the fencing token, takeovers): lease_take.lua.
--
-- KEYS[1]  lease (string, with a TTL)
-- KEYS[2]  fence counter
-- KEYS[3]  meta hash
-- KEYS[4]  state hash
-- KEYS[5]  pending sorted set (staged chunk and segment sets)
-- KEYS[6]  scheduled flag
-- KEYS[7]  input stream
-- ARGV[1]  worker id (the lease holder)
-- ARGV[2]  lease TTL in ms
-- ARGV[3]  scheduled-flag TTL in ms: refresh it ('0': leave the flag alone, e.g. a stream
--          claimed as a companion of another stream's task). The caller passes the lease TTL
--          plus a margin: a running task's flag follows its lease (lease_renew.lua extends
--          both), so a dead holder's stream is re-scheduled soon after its lease lapses.
--
-- Reply:
--   {'ok', token, previous holder or '', version, segments, generation, last_entry_id,
--    {pending members}}: claimed. A previous holder recorded in meta.lease_holder means its
--    lease expired without a release: a takeover (counted in meta.leases_taken_over).
--   {'busy', current lease value}: another worker holds the stream.
--   {'idle', ''}: nobody holds the stream and its input holds nothing after the committed
--    last_entry_id (has_unread, unread.lua): no lease is taken, and the
--    task's own flag is dropped, as a caught-up release drops it (atomically here, so input
--    arriving later finds no flag and is scheduled anew). Most such tasks are a stream's own
--    queued task that found it already fed as another task's companion: this answers them
--    in one round trip instead of three (claim, read, release).
--   {'failed', reason}: the stream is parked; with a flag TTL the flag is cleared, since no
--    task will run for it until someone clears the failure.
local own = ARGV[3] ~= '0'
local meta = redis.call('HMGET', KEYS[3], 'status', 'failure_reason')
if meta[1] == 'failed' then
  if own then redis.call('DEL', KEYS[6]) end
  return {'failed', meta[2] or ''}
end
if own then redis.call('PEXPIRE', KEYS[6], ARGV[3]) end
local held = redis.call('GET', KEYS[1])
if held then return {'busy', held} end
local input = redis.call('TYPE', KEYS[7])['ok']
if input == 'none' or (input == 'stream' and not has_unread(KEYS[7], KEYS[4])) then
  if own then redis.call('DEL', KEYS[6]) end
  return {'idle', ''}
end
local token, previous = take_lease(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2])
local head = redis.call('HMGET', KEYS[4], 'version', 'segments', 'generation', 'last_entry_id')
return {'ok', token, previous, head[1] or '', head[2] or '', head[3] or '', head[4] or '',
        redis.call('ZRANGE', KEYS[5], 0, -1)}
