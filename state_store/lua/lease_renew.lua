-- lease_renew: extend a lease that is still ours (state_store/lease.py).
--
-- KEYS[1]  lease
-- ARGV[1]  lease value ("<worker_id>|<token>")
-- ARGV[2]  TTL in ms
--
-- Reply: 1 if the lease is still ours (its expiry reset), else 0.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
