-- memory_vectors: store embeddings of retrieval chunks beside their chunks, each once
-- (workers/memory/vectors.py).
--
-- A vector is written only while its chunk is still in the memory hash (a chunk trimmed
-- meanwhile gets none: no orphan field) and only if the chunk has no vector yet (two writers,
-- e.g. the vectorizer and an answer, write it once; a chunk's text is fixed by its sequence
-- number, so either writer's vector is the right one).
--
-- KEYS[1]  memory hash of the stream
-- ARGV     3 values per vector: chunk field, vector field, encoded vector
--
-- Reply: the number of vectors written.
local written = 0
for i = 1, #ARGV, 3 do
  if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 1 then
    written = written + redis.call('HSETNX', KEYS[1], ARGV[i + 1], ARGV[i + 2])
  end
end
return written
