-- worker_presence: a worker's heartbeat in the live-worker set, and how many task slots are
-- live (state_store/presence.py; cross-stream batching shares the runnable streams among them).
-- Expiries are in the server's clock, so hosts whose clocks disagree still agree on who is live.
--
-- KEYS[1]  live-worker set (sorted set: member = '<worker id>#<slot>', score = expiry in ms)
-- ARGV[1]  worker id ('' = only count)
-- ARGV[2]  how long this heartbeat lasts in ms ('0' = the worker leaves)
-- ARGV[3]  the worker's task slots (members '<id>#1' .. '<id>#n')
--
-- Reply: live slots after this call (expired members are removed).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if ARGV[1] ~= '' then
  local slots = tonumber(ARGV[3])
  for i = 1, slots do
    if ARGV[2] == '0' then
      redis.call('ZREM', KEYS[1], ARGV[1] .. '#' .. i)
    else
      redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1] .. '#' .. i)
    end
  end
end
return redis.call('ZCARD', KEYS[1])
