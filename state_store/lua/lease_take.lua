-- lease_take: a fragment, not a script. state_store/scripts.py puts it in front of the scripts
-- that take a lease (lease_acquire.lua, batch_claim.lua), so the one way a lease is taken is
-- written once.
--
-- take_lease(lease, fence, meta, worker, ttl_ms) takes a lease the caller found free: a new
-- fencing token from the fence counter, the lease value "<worker>|<token>" with a TTL of
-- ttl_ms, and meta.lease_holder set to it. Returns the token and the previous holder ('' when
-- none): a previous holder still recorded in meta.lease_holder means its lease expired without
-- a release, a takeover, counted in meta.leases_taken_over.
--
-- The fence counter key is never expired: tokens stay strictly increasing per stream for as
-- long as the stream's data exists (AOF keeps it across restarts). Run Redis with a noeviction
-- or volatile-* policy so it is never evicted either.
local function take_lease(lease, fence, meta, worker, ttl_ms)
  local token = redis.call('INCR', fence)
  local value = worker .. '|' .. string.format('%d', token)
  redis.call('SET', lease, value, 'PX', ttl_ms)
  local previous = redis.call('HGET', meta, 'lease_holder') or ''
  redis.call('HSET', meta, 'lease_holder', value)
  if previous ~= '' then redis.call('HINCRBY', meta, 'leases_taken_over', 1) end
  return token, previous
end
