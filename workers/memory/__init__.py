"""Whole-stream memory: what a stream keeps beyond its model window (issue #8).

A sink-KV window forgets the middle of a stream, so a two-hour meeting would be summarized
from its last minutes only. Two bounded records, kept per stream in the hash
``StreamKeys.memory`` and written only inside the batch's own fenced commit, make up for it:

- summary memory (``records.SummaryMemory``): the latest rolling summary and the entry it
  covers, folded into the next rolling summary and into the final one;
- retrieval chunks (``records.Chunk``): the transcript cut at entry boundaries into chunks of
  about ``memory_chunk_tokens``, with entry ids, speakers, timestamps and an embedding, so a
  question can bring back text that left the window (``retrieve``).
"""
