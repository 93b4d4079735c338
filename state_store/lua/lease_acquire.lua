-- lease_acquire: take a stream's lease with a new fencing token (state_store/lease.py).
--
-- How a lease is taken (its value, the fencing token, takeovers): lease_take.lua.
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
local token, previous = take_lease(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2])
return {1, token, previous}
