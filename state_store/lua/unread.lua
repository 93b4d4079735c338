-- unread: a fragment, not a script. state_store/scripts.py puts it in front of the scripts
-- that ask whether a stream has input its state has not applied (needs_work.lua,
-- batch_claim.lua, batch_release.lua), so that question is written once.
--
-- has_unread(input, state) is true when the input stream holds an entry after the state
-- hash's last_entry_id (all of it when there is none): an exclusive XRANGE of one entry, no
-- id parsing. The caller checks the input's type where a non-stream must not raise.
local function has_unread(input, state)
  local committed = redis.call('HGET', state, 'last_entry_id')
  local start = '-'
  if committed and committed ~= '' then start = '(' .. committed end
  return #redis.call('XRANGE', input, start, '+', 'COUNT', 1) > 0
end
