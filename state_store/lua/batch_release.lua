-- batch_release: give a stream back after its batches and settle its scheduled flag, in one
-- round trip (state_store/claims.py).
--
-- The task side of the flag (the dispatcher sets it with SET NX before it enqueues a task):
-- a stream with input left keeps it and gets its next task at the back of the queue; a
-- stream that is caught up drops it, and if input arrived after the batch read it (a
-- producer's wake-up found the flag still set), sets it again at once for a new task rather
-- than leave that input to the dispatcher's next full pass.
--
-- KEYS[1]  lease
-- KEYS[2]  meta hash (its lease_holder is cleared if it is this lease)
-- KEYS[3]  scheduled flag
-- KEYS[4]  input stream
-- KEYS[5]  state hash
-- ARGV[1]  lease value ("<worker_id>|<token>")
-- ARGV[2]  what next: 'continue' (input is left), 'done' (caught up), 'retry' (a batch of the
--          task's own stream cut short by an error: the flag is set to ARGV[3], no task now;
--          the dispatcher retries the stream when it lapses), or 'keep' (leave the flag
--          alone: a companion stream)
-- ARGV[3]  scheduled-flag TTL in ms (the queued TTL: while the task ran, the flag followed
--          its lease and would lapse with it)
--
-- Reply: {released (1 if the lease was ours), enqueue (1: the flag is set for a new task,
--         which the caller must send)}.
local released = 0
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  released = 1
  if redis.call('HGET', KEYS[2], 'lease_holder') == ARGV[1] then
    redis.call('HDEL', KEYS[2], 'lease_holder')
  end
end
if ARGV[2] == 'keep' then return {released, 0} end
if ARGV[2] == 'retry' then
  redis.call('SET', KEYS[3], '1', 'PX', ARGV[3])
  return {released, 0}
end
if ARGV[2] == 'continue' then
  redis.call('SET', KEYS[3], '1', 'PX', ARGV[3])
  return {released, 1}
end
redis.call('DEL', KEYS[3])
if redis.call('HGET', KEYS[2], 'status') == 'failed' then return {released, 0} end
if redis.call('TYPE', KEYS[4])['ok'] ~= 'stream' then return {released, 0} end
if not has_unread(KEYS[4], KEYS[5]) then return {released, 0} end
if redis.call('SET', KEYS[3], '1', 'NX', 'PX', ARGV[3]) then return {released, 1} end
return {released, 0}
