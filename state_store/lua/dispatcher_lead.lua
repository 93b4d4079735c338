-- dispatcher_lead: take, renew or give up the dispatcher leadership (workers/scheduling/).
--
-- KEYS[1]  leader key (string, with a TTL)
-- ARGV[1]  node id
-- ARGV[2]  TTL in ms ('0' = give the leadership up)
--
-- Reply: 1 if this node leads (now), else 0.
local holder = redis.call('GET', KEYS[1])
if ARGV[2] == '0' then
  if holder == ARGV[1] then redis.call('DEL', KEYS[1]) end
  return 0
end
if holder == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]); return 1 end
if not holder then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]); return 1 end
return 0
