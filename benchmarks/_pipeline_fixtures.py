"""The pipeline benchmark's fixtures: its rows (engine, backlog size, rounds, state layout),
the backlog of meeting turns, and the mid-size tiny Llama saved as a local model directory.

``benchmarks/pipeline.py`` describes the benchmark.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import DATA_DIR, mid_tiny_llama, smollm2_ready


@dataclass
class Case:
    """One row: an engine spec (or a builder of a local model dir) and its backlog."""

    name: str
    spec: str | Callable[[Path], str]
    streams: int
    bytes_per_stream: int
    env: dict[str, str] = field(default_factory=dict)  # extra SINKSTREAM_* for both sides
    rounds: int = 2  # bare/pipeline alternations, one group of streams each
    timeout_s: float = 300.0


def _layouts() -> tuple[str, str]:
    """(default state_layout, the other one)."""
    default = _settings().state_layout
    return default, "whole" if default == "segments" else "segments"


def _layout_env(layout: str) -> dict[str, str]:
    return {"SINKSTREAM_STATE_LAYOUT": layout}


def _cases(quick: bool) -> list[Case]:
    default, other = _layouts()
    if quick:
        return [
            Case("tiny-llama-mid", _mid_llama_dir, streams=6, bytes_per_stream=2_700, rounds=6,
                 env=_layout_env(default)),
            Case(f"tiny-llama-mid, {other}", _mid_llama_dir, streams=6, bytes_per_stream=2_700,
                 rounds=6, env=_layout_env(other)),
            Case("tiny-rwkv", "tiny-rwkv", streams=6, bytes_per_stream=2_700, rounds=6),
        ]
    cases = [
        Case("tiny-llama-mid", _mid_llama_dir, streams=8, bytes_per_stream=5_000, rounds=8,
             env=_layout_env(default)),
        Case(f"tiny-llama-mid, {other}", _mid_llama_dir, streams=8, bytes_per_stream=5_000,
             rounds=8, env=_layout_env(other)),
        Case("tiny-llama", "tiny-llama", streams=8, bytes_per_stream=10_000, rounds=8,
             env=_layout_env(default)),
        Case(f"tiny-llama, {other}", "tiny-llama", streams=8, bytes_per_stream=10_000,
             rounds=8, env=_layout_env(other)),
        Case("tiny-llama, batch 256 tok", "tiny-llama", streams=6, bytes_per_stream=4_000,
             rounds=6, env={"SINKSTREAM_MAX_BATCH_TOKENS": "256"}),
        Case("tiny-rwkv", "tiny-rwkv", streams=8, bytes_per_stream=5_000, rounds=8),
    ]
    if smollm2_ready(_settings()):  # ~64 tok/s on one thread: one batch per stream
        cases.append(Case("smollm2", "smollm2", streams=2, bytes_per_stream=2_400,
                          timeout_s=600.0))
    return cases


# ----- data --------------------------------------------------------------------------------


def _meetings() -> Iterator[list[tuple[str, str | None]]]:
    """Turns of one meeting after another (QMSum val), else synthetic caption turns."""
    folder = DATA_DIR / "qmsum" / "val"
    files = sorted(folder.glob("*.json"))
    if files:
        from producer.formats import read_file

        while True:
            for file in files:
                yield [(t.text, t.speaker) for t in read_file(file, "qmsum")]
    import random

    rng = random.Random(0)
    words = ("we", "should", "ship", "the", "release", "on", "friday", "after", "review",
             "tests", "are", "green", "budget", "numbers", "look", "fine", "next", "week")
    speakers = ("Alice", "Bob", "Carol", "Dan")
    while True:
        yield [(" ".join(rng.choice(words) for _ in range(rng.randint(3, 30))),
                rng.choice(speakers)) for _ in range(2000)]


def _backlog(streams: int, budget: int) -> list[list[tuple[str, str | None]]]:
    """``streams`` lists of turns, each about ``budget`` formatted UTF-8 bytes."""
    from workers.processing.prompts import format_turn

    out = []
    meetings = _meetings()
    for _ in range(streams):
        turns: list[tuple[str, str | None]] = []
        used = 0
        while used < budget:
            for text, speaker in next(meetings):
                turns.append((text, speaker))
                used += len(format_turn(text, speaker).encode())
                if used >= budget:
                    break
        out.append(turns)
    return out


# ----- models ------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (what the ByteLevel pre-tokenizer emits)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _mid_llama_dir(root: Path) -> str:
    """``benchmarks.common.mid_tiny_llama`` as a local HF directory that the worker can load
    (``SINKSTREAM_MODEL=<dir>``), with a byte-level fast tokenizer whose ids are exactly the
    UTF-8 bytes (same ids as the tiny models' ``ByteTokenizer``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    directory = root / "tiny-llama-mid"
    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    sample = "Grad E: OK , we 're on . héllo 日本\n"
    if fast.encode(sample, add_special_tokens=False) != list(sample.encode()):
        raise RuntimeError("byte-level tokenizer does not reproduce UTF-8 bytes")
    mid_tiny_llama().save_pretrained(directory)
    fast.save_pretrained(directory)
    return str(directory)


def _settings(**overrides: Any) -> Any:
    from sinkstream.settings import Settings

    return Settings(**overrides)
