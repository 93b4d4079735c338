"""What retrieval memory adds to a batch: embedding a closed chunk vs feeding its tokens.

Every applied entry ends up in a memory chunk, and with ``retrieval = "embedding"`` each closed
chunk is embedded once (MiniLM, in the worker). That is extra model work per token, so it is
measured next to the feed it rides on: the same ``memory_chunk_tokens`` tokens fed to the
stream's model, interleaved, in process CPU seconds with one torch thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from benchmarks.run import BenchResult
from sinkstream.settings import Settings
from workers.engines.loading import load_engine
from workers.memory.embedder import PACKAGED_MODEL, Embedder

TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def _cpu_seconds(work: Callable[[], object]) -> float:
    started = time.process_time()
    work()
    return time.process_time() - started


def run(quick: bool) -> BenchResult:
    torch.set_num_threads(1)
    settings = Settings()  # the default model (SmolLM2 unless SINKSTREAM_MODEL says otherwise)
    engine = load_engine(settings)
    embedder = Embedder(settings.embedding_model)
    size = settings.memory_chunk_tokens
    reps = 3 if quick else 8
    text = TEXT.read_text()[: 4000 * (reps + 1)] if TEXT.is_file() else "the meeting " * 8000
    ids = engine.tokenizer.encode(text)[: size * (reps + 1)]
    chunks = [ids[i * size : (i + 1) * size] for i in range(reps + 1)]
    embedder.embed([engine.tokenizer.decode(chunks[0])])  # load and warm up
    feed_s, embed_s = [], []
    for tokens in chunks[1:]:
        chunk_text = engine.tokenizer.decode(tokens)
        feed_s.append(_cpu_seconds(partial(engine.feed, engine.new_state(), tokens)))
        embed_s.append(_cpu_seconds(partial(embedder.embed, [chunk_text])))
    row = {
        "model": engine.model_name,
        "embedding_model": settings.embedding_model,
        "chunk_tokens": size,
        "feed_s": min(feed_s),
        "embed_s": min(embed_s),
        "embed_over_feed": min(embed_s) / min(feed_s),
    }
    return BenchResult(
        title=f"retrieval memory cost per {size}-token chunk, 1 thread, CPU seconds",
        rows=[row],
        summary={"embed_over_feed": row["embed_over_feed"], "model": engine.model_name,
                 "embedding_model": PACKAGED_MODEL if settings.embedding_model == PACKAGED_MODEL
                 else settings.embedding_model},
    )
