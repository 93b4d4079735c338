-- lease_renew: extend a lease that is still ours (state_store/lease.py), and with it the
-- stream's scheduled flag while the task holding the lease runs.
--
-- The flag follows the lease: a running task's flag lapses shortly after its lease would, so
-- when the holder dies the dispatcher's next pass re-schedules the stream within about the
-- lease, not after the (long) queued-task TTL. The flag is only extended, never created: a
-- stream whose flag is gone is already visible to the dispatcher.
--
-- KEYS[1]  lease
-- KEYS[2]  scheduled flag (optional: only read when ARGV[3] is given and not '0')
-- ARGV[1]  lease value ("<worker_id>|<token>")
-- ARGV[2]  lease TTL in ms
-- ARGV[3]  scheduled-flag TTL in ms (optional; '0' or absent: leave the flag alone, e.g. a
--          stream held as another task's companion)
--
-- Reply: 1 if the lease is still ours (its expiry reset), else 0.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  if ARGV[3] and ARGV[3] ~= '0' and redis.call('EXISTS', KEYS[2]) == 1 then
    redis.call('PEXPIRE', KEYS[2], ARGV[3])
  end
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
