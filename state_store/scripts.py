"""Every Lua script sinkstream runs on Redis, in one place.

Each script touches only keys of one stream (one hash tag), so it runs on a single Redis
Cluster slot. Keys are always passed in KEYS, never built inside the script.
"""

from __future__ import annotations

# --- PRODUCER ---------------------------------------------------------------------------------
#: Idempotent, length-capped append of a batch of input entries (producer/publisher.py).
#:
#: Each producer has a random id and numbers its entries 1, 2, 3, ...; the ``producers`` hash
#: keeps, per producer id, "<last seq> <last entry id>". Entries whose seq is not above the
#: recorded one were already appended by an earlier attempt whose reply was lost, so a retry
#: of the same batch skips them: no duplicates, and since the script is atomic (and AOF logs
#: its effects as one unit) the record and the entries can never disagree. Appending stops
#: when the stream holds ``max_len`` entries (backpressure; nothing is dropped): the caller
#: sees ``full`` and resends the rest later.
#:
#: KEYS[1] input stream, KEYS[2] producers hash (same hash tag).
#: ARGV[1] producer id, ARGV[2] max stream length, ARGV[3] TTL of the producers hash in ms
#: (0 = none), then 5 values per entry: seq, text, speaker, ts, eos ("" = field absent).
#: Returns {last seq recorded, entries added, duplicates skipped, full (0/1), stream length,
#: last entry id written by this producer ("" if none)}.
PRODUCER_APPEND = """
local key, phash, pid = KEYS[1], KEYS[2], ARGV[1]
local maxlen = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
local last, last_s, last_id = 0, '0', ''
local rec = redis.call('HGET', phash, pid)
if rec then
  local s, id = string.match(rec, '^(%d+) (.*)$')
  if s then last, last_s, last_id = tonumber(s), s, id end
end
local xlen = redis.call('XLEN', key)
local added, dups, full = 0, 0, 0
local function append()
for i = 4, #ARGV, 5 do
  local seq = tonumber(ARGV[i])
  if seq <= last then
    dups = dups + 1
  elseif xlen >= maxlen then
    full = 1
    break
  else
    local text, speaker, ts = ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
    if ARGV[i + 4] ~= '' then  -- end marker (rare): build the field list
      local f = {'text', text}
      if speaker ~= '' then f[#f + 1] = 'speaker'; f[#f + 1] = speaker end
      if ts ~= '' then f[#f + 1] = 'ts'; f[#f + 1] = ts end
      f[#f + 1] = 'eos'; f[#f + 1] = ARGV[i + 4]
      last_id = redis.call('XADD', key, '*', unpack(f))
    elseif speaker ~= '' and ts ~= '' then  -- common cases: no table, no unpack
      last_id = redis.call('XADD', key, '*', 'text', text, 'speaker', speaker, 'ts', ts)
    elseif speaker ~= '' then
      last_id = redis.call('XADD', key, '*', 'text', text, 'speaker', speaker)
    elseif ts ~= '' then
      last_id = redis.call('XADD', key, '*', 'text', text, 'ts', ts)
    else
      last_id = redis.call('XADD', key, '*', 'text', text)
    end
    last, last_s = seq, ARGV[i]
    xlen = xlen + 1
    added = added + 1
  end
end
end
-- a failing XADD does not undo the ones before it, so record progress before reporting it
local ok, err = pcall(append)
if added > 0 then redis.call('HSET', phash, pid, last_s .. ' ' .. last_id) end
if ttl > 0 and (added > 0 or rec) then redis.call('PEXPIRE', phash, ttl) end
if not ok then
  return redis.error_reply('sinkstream append stopped after ' .. added .. ' entries: ' ..
    tostring(type(err) == 'table' and err.err or err))
end
return {last, added, dups, full, xlen, last_id}
"""


# ===== STATE / LEASE (state_store.store, state_store.lease) ====================================
# Lease value: "<worker_id>|<fencing token>". The fence counter key is never expired: tokens stay
# strictly increasing per stream for as long as the stream's data exists (AOF keeps it across
# restarts). Run Redis with a noeviction or volatile-* policy so it is never evicted either.

#: KEYS: lease, fence, meta.  ARGV: worker_id, ttl_ms.
#: Returns {1, token, previous_holder_or_''} or {0, current_holder}. A previous holder recorded in
#: meta.lease_holder means its lease expired without a release: a takeover.
LEASE_ACQUIRE = """
local held = redis.call('GET', KEYS[1])
if held then return {0, held} end
local token = redis.call('INCR', KEYS[2])
local value = ARGV[1] .. '|' .. string.format('%d', token)
redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
local previous = redis.call('HGET', KEYS[3], 'lease_holder') or ''
redis.call('HSET', KEYS[3], 'lease_holder', value)
if previous ~= '' then redis.call('HINCRBY', KEYS[3], 'leases_taken_over', 1) end
return {1, token, previous}
"""

#: KEYS: lease.  ARGV: lease value, ttl_ms.  Returns 1 if still ours (expiry reset), else 0.
LEASE_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

#: KEYS: lease, meta.  ARGV: lease value.  Returns 1 if it was ours and is now released, else 0.
LEASE_RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
if redis.call('HGET', KEYS[2], 'lease_holder') == ARGV[1] then
  redis.call('HDEL', KEYS[2], 'lease_holder')
end
return 1
"""

#: The fenced, exactly-once commit of one stream batch.
#: KEYS: 1 state, 2 fence, 3 lease, 4 meta, 5 output, 6 dead, 7 input, 8 summary, 9 pending
#:       chunk sets, then the new chunk keys, the previous version's chunk keys, the orphan
#:       chunk keys, the new segment keys and the evicted segment keys (counts in ARGV).
#: ARGV, read in order: token, expected_version, last_entry_id ('' = unchanged),
#:   mode ('keep'|'inline'|'chunked'), inline data, new generation, nbytes,
#:   #new chunk keys, previous generation as the caller read it, #previous chunk keys,
#:   orphans: #generations, then per generation: name, #chunk keys,
#:   segments: the ``segments`` field as the caller read it, segment mode ('keep' = leave
#:   them, 'set' = the state is segmented, 'none' = the state is whole: drop them), the new
#:   ``segments`` field, the pending member of the new segments, #new segment keys,
#:   #evicted segment keys,
#:   #state field args, pairs..., #meta field args, pairs...,
#:   #summary field args (-1 = leave the summary alone), pairs...,
#:   input trim MINID ('' = none), output MAXLEN ('' = none),
#:   #outputs, per output: #field args, pairs..., #dead letters, per entry: #field args, pairs...,
#:   #hash updates, per update (its key is the next KEYS entry): #field args to set, pairs...,
#:   #fields to delete, names...
#: Returns {1, new_version, {output ids}, {dead-letter ids}}, or {0, reason, fence, version}
#: without writing anything but the refusal counters. Every check runs before the first write,
#: so an error never leaves half a commit behind.
#:
#: Segmented states (``state_layout = "segments"``): the encoded header goes where a whole
#: state goes (inline or chunked); the window's segments are separate keys, staged before the
#: script like chunks (expiring, registered in the pending set). The script persists the new
#: ones, swaps the ``segments`` field and deletes the evicted ones together with the header,
#: so a reader never sees a header whose segments are not all there.
STATE_COMMIT = """
local state, fence, lease, meta = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local output, dead, input, summary, pending = KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local argi, keyi = 0, 9
local function arg() argi = argi + 1; return ARGV[argi] end
local function args(n)
  local t = {}
  for i = 1, n do t[i] = arg() end
  return t
end
local function keys(n)
  local t = {}
  for i = 1, n do t[i] = KEYS[keyi + i] end
  keyi = keyi + n
  return t
end

local token, expected, last_id, mode = arg(), arg(), arg(), arg()
local data, generation, nbytes = arg(), arg(), arg()
local new_chunks = keys(tonumber(arg()))
local old_generation = arg()
local old_chunks = keys(tonumber(arg()))
local orphans = {}
for i = 1, tonumber(arg()) do
  local name = arg()
  orphans[i] = {name, keys(tonumber(arg()))}
end
local old_segments, seg_mode, segments, seg_member = arg(), arg(), arg(), arg()
local new_segs = keys(tonumber(arg()))
local evicted_segs = keys(tonumber(arg()))
local state_fields = args(tonumber(arg()))
local meta_fields = args(tonumber(arg()))
local summary_n = tonumber(arg())
local summary_fields = nil
if summary_n >= 0 then summary_fields = args(summary_n) end
local trim_minid, out_maxlen = arg(), arg()
local outputs, deads = {}, {}
for i = 1, tonumber(arg()) do outputs[i] = args(tonumber(arg())) end
for i = 1, tonumber(arg()) do deads[i] = args(tonumber(arg())) end
local updates = {}
for i = 1, tonumber(arg()) do
  local key = keys(1)[1]
  local sets = args(tonumber(arg()))
  updates[i] = {key, sets, args(tonumber(arg()))}
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
if current_version ~= expected or stored_generation ~= old_generation
    or stored_segments ~= old_segments then
  return refuse('version_conflict')
end
if mode == 'keep' and stored_generation == '' and redis.call('HEXISTS', state, 'data') == 0 then
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
for _, u in ipairs(updates) do
  if not type_ok(u[1], 'hash') then return reject('wrong_type') end
end

local function xadd(key, fields, maxlen)
  if maxlen ~= '' then
    return redis.call('XADD', key, 'MAXLEN', '~', maxlen, '*', unpack(fields))
  end
  return redis.call('XADD', key, '*', unpack(fields))
end
local out_ids, dead_ids = {}, {}
for i, f in ipairs(outputs) do out_ids[i] = xadd(output, f, out_maxlen) end
for i, f in ipairs(deads) do dead_ids[i] = xadd(dead, f, '') end
if trim_minid ~= '' then redis.call('XTRIM', input, 'MINID', trim_minid) end

if mode ~= 'keep' then
  if mode == 'inline' then
    redis.call('HSET', state, 'data', data)
    redis.call('HDEL', state, 'generation', 'chunks')
  else
    for _, k in ipairs(new_chunks) do redis.call('PERSIST', k) end
    redis.call('HDEL', state, 'data')
    redis.call('HSET', state, 'generation', generation, 'chunks', #new_chunks)
    redis.call('ZREM', pending, generation)
  end
  redis.call('HSET', state, 'nbytes', nbytes)
  for _, k in ipairs(old_chunks) do redis.call('DEL', k) end
end
if seg_mode ~= 'keep' then
  for _, k in ipairs(new_segs) do redis.call('PERSIST', k) end
  if seg_member ~= '' then redis.call('ZREM', pending, seg_member) end
  if segments ~= '' then
    redis.call('HSET', state, 'segments', segments)
  else
    redis.call('HDEL', state, 'segments')
  end
  for _, k in ipairs(evicted_segs) do redis.call('DEL', k) end
end
for _, o in ipairs(orphans) do
  local name = o[1]
  if name ~= generation and name ~= stored_generation and name ~= seg_member
      and redis.call('ZSCORE', pending, name) then
    for _, k in ipairs(o[2]) do redis.call('DEL', k) end
    redis.call('ZREM', pending, name)
  end
end

local now = redis.call('TIME')
local now_ms = string.format('%d', tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000))
redis.call('HSET', state, 'fence', token, 'committed_ms', now_ms)
if last_id ~= '' then redis.call('HSET', state, 'last_entry_id', last_id) end
if #state_fields > 0 then redis.call('HSET', state, unpack(state_fields)) end
local version = redis.call('HINCRBY', state, 'version', 1)
redis.call('HINCRBY', meta, 'commits', 1)
if #meta_fields > 0 then redis.call('HSET', meta, unpack(meta_fields)) end
if summary_fields then
  redis.call('DEL', summary)
  if #summary_fields > 0 then redis.call('HSET', summary, unpack(summary_fields)) end
end
for _, u in ipairs(updates) do
  if #u[2] > 0 then redis.call('HSET', u[1], unpack(u[2])) end
  if #u[3] > 0 then redis.call('HDEL', u[1], unpack(u[3])) end
end
return {1, version, out_ids, dead_ids}
"""

#: Delete uncommitted chunk sets (a crash between writing chunks and committing) and
#: uncommitted segment sets (pending members ``s.<nonce>.<ids>``; a commit removes its own
#: member from the pending set, so a listed set that is no longer pending was committed).
#: KEYS: 1 state, 2 pending, then chunk keys.  ARGV: per generation: name, #chunk keys.
#: A generation is deleted only if still pending and not the committed one, so a chunk set that
#: was committed after the caller listed it is never touched. Returns the generations deleted.
STATE_CLEANUP = """
local stored = redis.call('HGET', KEYS[1], 'generation') or ''
local keyi, argi, removed = 2, 1, 0
while argi < #ARGV do
  local name, n = ARGV[argi], tonumber(ARGV[argi + 1])
  argi = argi + 2
  if name ~= stored and redis.call('ZSCORE', KEYS[2], name) then
    for i = 1, n do redis.call('DEL', KEYS[keyi + i]) end
    redis.call('ZREM', KEYS[2], name)
    removed = removed + 1
  end
  keyi = keyi + n
end
return removed
"""


# --- DISPATCHER -------------------------------------------------------------------------------
#: Take, renew or give up the dispatcher leadership (workers/scheduling.py); one key.
#: KEYS: leader key.  ARGV: node id, ttl ms (0 = give it up).  1 if we lead (now), else 0.
DISPATCHER_LEAD = """
local holder = redis.call('GET', KEYS[1])
if ARGV[2] == '0' then
  if holder == ARGV[1] then redis.call('DEL', KEYS[1]) end
  return 0
end
if holder == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]); return 1 end
if not holder then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]); return 1 end
return 0
"""

#: Does a stream need a task? The dispatcher's check of one stream, on the stream's own slot:
#: one reply per stream instead of four, so a full pass over 1,000 streams costs the worker's
#: Python a quarter of the packing and parsing it did (and the model the GIL for that long).
#: KEYS[1] input stream, KEYS[2] state hash, KEYS[3] scheduled flag, KEYS[4] meta hash.
#: Returns 1 when the input holds an entry after the committed ``last_entry_id`` (an exclusive
#: XRANGE: no id parsing) and the stream is neither scheduled nor failed, else 0. An input key
#: that is not a stream is a WRONGTYPE error for that stream alone.
NEEDS_WORK = """
if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
if redis.call('HGET', KEYS[4], 'status') == 'failed' then return 0 end
local committed = redis.call('HGET', KEYS[2], 'last_entry_id')
local start = '-'
if committed and committed ~= '' then start = '(' .. committed end
if #redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', 1) > 0 then return 1 end
return 0
"""

# --- MONITORING -------------------------------------------------------------------------------
#: Input lag and status of one stream (monitoring/lag.py), read-only.
#: KEYS: state, meta, input, dead, lease.  ARGV: count cap.
#: Returns {last_entry_id, state_nbytes, status, ended, input_len, oldest_unapplied_id,
#:          pending, capped, dead_len, leased}; '' stands for "none" (Lua nil ends a table).
STREAM_LAG = """
local st = redis.call('HMGET', KEYS[1], 'last_entry_id', 'nbytes')
local meta = redis.call('HMGET', KEYS[2], 'status', 'ended')
local committed = st[1] or ''
local len, oldest, pending, capped = 0, '', 0, 0
if redis.call('TYPE', KEYS[3])['ok'] == 'stream' then
  len = redis.call('XLEN', KEYS[3])
  if len > 0 then
    local start = '-'
    if committed ~= '' then start = '(' .. committed end
    local first = redis.call('XRANGE', KEYS[3], start, '+', 'COUNT', 1)
    if #first > 0 then
      oldest = first[1][1]
      local head = redis.call('XRANGE', KEYS[3], '-', '+', 'COUNT', 1)
      if head[1][1] == oldest then
        pending = len
      else
        local cap = tonumber(ARGV[1])
        pending = #redis.call('XRANGE', KEYS[3], start, '+', 'COUNT', cap)
        if pending >= cap then capped = 1 end
      end
    end
  end
end
local dead = 0
if redis.call('TYPE', KEYS[4])['ok'] == 'stream' then dead = redis.call('XLEN', KEYS[4]) end
return {committed, st[2] or '0', meta[1] or '', meta[2] or '', len, oldest, pending, capped,
        dead, redis.call('EXISTS', KEYS[5])}
"""
