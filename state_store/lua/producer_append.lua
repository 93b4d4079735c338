-- producer_append: idempotent, length-capped append of a batch of input entries
-- (producer/publisher.py).
--
-- Each producer has a random id and numbers its entries 1, 2, 3, ...; the producers hash
-- keeps, per producer id, "<last seq> <last entry id>". Entries whose seq is not above the
-- recorded one were already appended by an earlier attempt whose reply was lost, so a retry
-- of the same batch skips them: no duplicates, and since the script is atomic (and AOF logs
-- its effects as one unit) the record and the entries can never disagree. Appending stops
-- when the stream holds max_len entries (backpressure; nothing is dropped): the caller sees
-- full and resends the rest later.
--
-- KEYS[1]  input stream
-- KEYS[2]  producers hash (same hash tag)
-- ARGV[1]  producer id
-- ARGV[2]  max stream length
-- ARGV[3]  TTL of the producers hash in ms (0 = none)
-- ARGV[4...]  5 values per entry: seq, text, speaker, ts, eos ('' = field absent)
--
-- Reply: {last seq recorded, entries added, duplicates skipped, full (0/1), stream length,
--         last entry id written by this producer ('' if none)}; an error reply if an XADD
--         failed (the entries before it stay appended and recorded).
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
