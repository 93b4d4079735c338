-- lease_acquire: take a stream's lease with a new fencing token (state_store/lease.py).
--
-- Lease value: "<worker_id>|<fencing token>". The fence counter key is never expired: tokens
-- stay strictly increasing per stream for as long as the stream's data exists (AOF keeps it
-- across restarts). Run Redis with a noeviction or volatile-* policy so it is never evicted
-- either.
--
-- KEYS[1]  lease (string, with a TTL)
-- KEYS[2]  fence counter
-- KEYS[3]  meta hash
-- ARGV[1]  worker id
-- ARGV[2]  TTL in ms
--
-- Reply: {1, token, previous holder or ''} when taken, or {0, current holder}. A previous
-- holder recorded in meta.lease_holder means its lease expired without a release: a takeover
-- (counted in meta.leases_taken_over).
local held = redis.call('GET', KEYS[1])
if held then return {0, held} end
local token = redis.call('INCR', KEYS[2])
local value = ARGV[1] .. '|' .. string.format('%d', token)
redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
local previous = redis.call('HGET', KEYS[3], 'lease_holder') or ''
redis.call('HSET', KEYS[3], 'lease_holder', value)
if previous ~= '' then redis.call('HINCRBY', KEYS[3], 'leases_taken_over', 1) end
return {1, token, previous}
