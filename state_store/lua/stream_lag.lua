-- stream_lag: input lag and status of one stream (monitoring/lag.py), read-only.
--
-- KEYS[1]  state hash
-- KEYS[2]  meta hash
-- KEYS[3]  input stream
-- KEYS[4]  dead-letter stream
-- KEYS[5]  lease
-- ARGV[1]  cap on the unapplied entries counted
--
-- Reply: {last_entry_id, state_nbytes, status, ended, input_len, oldest_unapplied_id,
--         pending, capped, dead_len, leased}; '' stands for "none" (Lua nil ends a table).
local st = redis.call('HMGET', KEYS[1], 'last_entry_id', 'nbytes')
local meta = redis.call('HMGET', KEYS[2], 'status', 'ended')
local committed = st[1] or ''
local len, oldest, pending, capped = 0, '', 0, 0
if redis.call('TYPE', KEYS[3])['ok'] == 'stream' then
  len = redis.call('XLEN', KEYS[3])
  if len > 0 then
    local start = '-'
    if committed ~= '' then start = '(' .. committed end
    local first = redis.call('XRANGE', KEYS[3], start, '+', 'COUNT', 1)
    if #first > 0 then
      oldest = first[1][1]
      local head = redis.call('XRANGE', KEYS[3], '-', '+', 'COUNT', 1)
      if head[1][1] == oldest then
        pending = len
      else
        local cap = tonumber(ARGV[1])
        pending = #redis.call('XRANGE', KEYS[3], start, '+', 'COUNT', cap)
        if pending >= cap then capped = 1 end
      end
    end
  end
end
local dead = 0
if redis.call('TYPE', KEYS[4])['ok'] == 'stream' then dead = redis.call('XLEN', KEYS[4]) end
return {committed, st[2] or '0', meta[1] or '', meta[2] or '', len, oldest, pending, capped,
        dead, redis.call('EXISTS', KEYS[5])}
