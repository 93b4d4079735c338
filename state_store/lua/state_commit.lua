-- state_commit: the fenced, exactly-once commit of one stream batch (state_store/commit.py).
--
-- The state, its input position, the version, the outputs published from that state, the
-- dead letters of the batch and its side data change together or not at all, and only while
-- the caller still owns the stream: the fencing token must be the stream's current fence and
-- still be carried by the live lease, and the stored version, chunk generation and segments
-- field must be the ones the caller read. Every check runs before the first write, so a
-- refusal or an error never leaves half a commit behind; a refusal only bumps the counters in
-- meta (commits_refused, commits_refused:<reason>, last_refusal).
--
-- Large states are chunked, and segmented states (state_layout = "segments") keep their
-- window in segment keys; both are staged before this script as expiring keys registered in
-- the pending set. The script makes the new ones permanent, swaps the generation / segments
-- fields, deletes the replaced chunks and the evicted segments and unregisters the staged
-- sets, so a reader never sees a hash naming keys that are not all there.
--
-- KEYS[1] state hash      KEYS[4] meta hash       KEYS[7] input stream
-- KEYS[2] fence counter   KEYS[5] output stream   KEYS[8] summary hash
-- KEYS[3] lease           KEYS[6] dead letters    KEYS[9] pending sorted set
-- KEYS[10...] chunk, segment and side-data keys, referenced from the request below. Every key
--   is passed in KEYS (Redis Cluster: they all carry the stream's hash tag), never built here.
--
-- ARGV[1] the request: one msgpack map, packed with msgpack's raw strings (bin types off:
--   the cmsgpack of Redis 7.0 cannot read bin8/16/32, and a raw string carries any bytes).
--   Field values are strings as redis-py would send them (numbers already formatted).
-- ARGV[2] the encoded state when it is inline (req.state.data = 2), else absent: up to
--   state_chunk_bytes (4 MiB) that would cost a copy more through cmsgpack (measured here on
--   4 MiB: 15 ms per commit inside the map, 10 ms as its own argument).
--
-- A range is {first, count}: KEYS[first] .. KEYS[first + count - 1]. A field marked "?" may
-- be absent.
--   fence          int     the caller's fencing token
--   version        int     the stored version the caller expects
--   last_entry_id? str     the last input entry folded in; absent: keep the stored one
--   read           what the caller read before the commit (its StateHead):
--     generation   str     the stored chunk generation ('' = inline state, or none)
--     segments     str     the stored segments field ('' = none)
--     chunks?      range   that generation's chunk keys, deleted when the state is replaced
--   state?         the new state; absent: keep the stored one (a batch of dead letters only)
--     nbytes       int     encoded size (segmented: the header plus every segment)
--     data?        int     inline: the ARGV index of the encoded bytes; else chunked:
--     generation?  str     "<version>.<nonce>.<count>", the staged chunk set
--     chunks?      range   its chunk keys
--   segments?      the segments after the commit; absent: leave the stored ones alone
--     field        str     the new segments field ('' = a whole state: drop the field)
--     member       str     the pending member of the staged segments ('' = none staged)
--     new          range   the staged segment keys
--     evicted      range   stored segment keys the new window drops
--   orphans        array of {pending member, range}: staged sets of crashed attempts,
--                  deleted if still pending (and neither the stored nor the new set)
--   state_fields   array   name, value, ...: caller fields of the state hash
--   meta_fields    array   name, value, ...: merged into meta
--   meta_counts?   array   name, delta, ...: meta counters increased (HINCRBY), e.g. the
--                          entries a batch applied (entries_applied: `sinkstream streams`)
--   summary?       array   name, value, ...: replaces the summary hash; absent: leave it
--   trim_minid?    str     XTRIM the input to this MINID; absent: no trim
--   output_maxlen? int     approximate MAXLEN of the output stream; absent: none
--   outputs        array of arrays name, value, ...: entries added to the output stream
--   dead_letters   array of arrays name, value, ...: entries added to the dead letters
--   hash_updates   array of maps, each: key (int, index in KEYS of a hash of the stream),
--                  set (array name, value, ...), delete (array of names); set, then delete
--
-- Reply: {1, new version, {output ids}, {dead-letter ids}} when applied, or
--   {0, reason, current fence, current version}: refused (stale_fence, lease_lost,
--   version_conflict; counted in meta) or rejected (no_state, chunks_missing,
--   segments_missing, wrong_type; nothing written).
local state, fence, lease, meta = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local output, dead, input, summary, pending = KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local req = cmsgpack.unpack(ARGV[1])
local function keys(range)
  local t = {}
  if range then
    for i = 1, range[2] do t[i] = KEYS[range[1] + i - 1] end
  end
  return t
end

local token = string.format('%d', req.fence)
local expected = string.format('%d', req.version)
local read, new, seg = req.read, req.state, req.segments
local new_chunks, new_segs = {}, {}
local generation, seg_member = '', ''
if new then
  new_chunks = keys(new.chunks)
  generation = new.generation or ''
end
if seg then
  new_segs = keys(seg.new)
  seg_member = seg.member
end

local current_fence = redis.call('GET', fence) or '0'
local current_version = redis.call('HGET', state, 'version') or '0'
local stored_generation = redis.call('HGET', state, 'generation') or ''
local stored_segments = redis.call('HGET', state, 'segments') or ''

local function refuse(reason)
  redis.call('HINCRBY', meta, 'commits_refused', 1)
  redis.call('HINCRBY', meta, 'commits_refused:' .. reason, 1)
  redis.call('HSET', meta, 'last_refusal', reason)
  return {0, reason, current_fence, current_version}
end
local function reject(reason)
  return {0, reason, current_fence, current_version}
end
local function type_ok(key, want)
  local t = redis.call('TYPE', key)['ok']
  return t == 'none' or t == want
end

if current_fence ~= token then return refuse('stale_fence') end
local holder = redis.call('GET', lease)
if not holder or string.match(holder, '|(%d+)$') ~= token then return refuse('lease_lost') end
if current_version ~= expected or stored_generation ~= read.generation
    or stored_segments ~= read.segments then
  return refuse('version_conflict')
end
if not new and stored_generation == '' and redis.call('HEXISTS', state, 'data') == 0 then
  return reject('no_state')
end
for _, k in ipairs(new_chunks) do
  if redis.call('EXISTS', k) == 0 then return reject('chunks_missing') end
end
for _, k in ipairs(new_segs) do
  if redis.call('EXISTS', k) == 0 then return reject('segments_missing') end
end
if not (type_ok(output, 'stream') and type_ok(dead, 'stream') and type_ok(input, 'stream')
        and type_ok(summary, 'hash') and type_ok(pending, 'zset') and type_ok(meta, 'hash')) then
  return reject('wrong_type')
end
for _, u in ipairs(req.hash_updates) do
  if not type_ok(KEYS[u.key], 'hash') then return reject('wrong_type') end
end

local function xadd(key, fields, maxlen)
  if maxlen then
    return redis.call('XADD', key, 'MAXLEN', '~', maxlen, '*', unpack(fields))
  end
  return redis.call('XADD', key, '*', unpack(fields))
end
local out_ids, dead_ids = {}, {}
for i, f in ipairs(req.outputs) do out_ids[i] = xadd(output, f, req.output_maxlen) end
for i, f in ipairs(req.dead_letters) do dead_ids[i] = xadd(dead, f, nil) end
if req.trim_minid then redis.call('XTRIM', input, 'MINID', req.trim_minid) end

if new then
  if new.data then
    redis.call('HSET', state, 'data', ARGV[new.data])
    redis.call('HDEL', state, 'generation', 'chunks')
  else
    for _, k in ipairs(new_chunks) do redis.call('PERSIST', k) end
    redis.call('HDEL', state, 'data')
    redis.call('HSET', state, 'generation', generation, 'chunks', #new_chunks)
    redis.call('ZREM', pending, generation)
  end
  redis.call('HSET', state, 'nbytes', new.nbytes)
  for _, k in ipairs(keys(read.chunks)) do redis.call('DEL', k) end
end
if seg then
  for _, k in ipairs(new_segs) do redis.call('PERSIST', k) end
  if seg_member ~= '' then redis.call('ZREM', pending, seg_member) end
  if seg.field ~= '' then
    redis.call('HSET', state, 'segments', seg.field)
  else
    redis.call('HDEL', state, 'segments')
  end
  for _, k in ipairs(keys(seg.evicted)) do redis.call('DEL', k) end
end
for _, o in ipairs(req.orphans) do
  local name = o[1]
  if name ~= generation and name ~= stored_generation and name ~= seg_member
      and redis.call('ZSCORE', pending, name) then
    for _, k in ipairs(keys(o[2])) do redis.call('DEL', k) end
    redis.call('ZREM', pending, name)
  end
end

local now = redis.call('TIME')
local now_ms = string.format('%d', tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000))
redis.call('HSET', state, 'fence', token, 'committed_ms', now_ms)
if req.last_entry_id then redis.call('HSET', state, 'last_entry_id', req.last_entry_id) end
if #req.state_fields > 0 then redis.call('HSET', state, unpack(req.state_fields)) end
local version = redis.call('HINCRBY', state, 'version', 1)
redis.call('HINCRBY', meta, 'commits', 1)
if #req.meta_fields > 0 then redis.call('HSET', meta, unpack(req.meta_fields)) end
local counts = req.meta_counts or {}
for i = 1, #counts, 2 do redis.call('HINCRBY', meta, counts[i], counts[i + 1]) end
if req.summary then
  redis.call('DEL', summary)
  if #req.summary > 0 then redis.call('HSET', summary, unpack(req.summary)) end
end
for _, u in ipairs(req.hash_updates) do
  if #u.set > 0 then redis.call('HSET', KEYS[u.key], unpack(u.set)) end
  if #u.delete > 0 then redis.call('HDEL', KEYS[u.key], unpack(u.delete)) end
end
return {1, version, out_ids, dead_ids}
