-- lease_release: give a lease back (state_store/lease.py).
--
-- KEYS[1]  lease
-- KEYS[2]  meta hash (its lease_holder is cleared if it is this lease)
-- ARGV[1]  lease value ("<worker_id>|<token>")
--
-- Reply: 1 if the lease was ours and is now released, else 0.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
if redis.call('HGET', KEYS[2], 'lease_holder') == ARGV[1] then
  redis.call('HDEL', KEYS[2], 'lease_holder')
end
return 1
