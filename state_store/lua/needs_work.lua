-- needs_work: does a stream need a task? The dispatcher's check of one stream, on the
-- stream's own slot (workers/scheduling/): one reply per stream instead of four, so a full
-- pass over 1,000 streams costs the worker's Python a quarter of the packing and parsing it
-- did (and the model the GIL for that long).
--
-- KEYS[1]  input stream
-- KEYS[2]  state hash
-- KEYS[3]  scheduled flag
-- KEYS[4]  meta hash
-- ARGV     none
--
-- Reply: 1 when the input holds an entry after the committed last_entry_id (has_unread,
-- unread.lua) and the stream is neither scheduled nor failed, else 0. An input key that is
-- not a stream is a WRONGTYPE error for that stream alone.
if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
if redis.call('HGET', KEYS[4], 'status') == 'failed' then return 0 end
if has_unread(KEYS[1], KEYS[2]) then return 1 end
return 0
