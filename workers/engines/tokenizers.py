"""Tokenizers behind the engine's small ``Tokenizer`` protocol."""

from __future__ import annotations

from collections.abc import Sequence


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255, for tiny test models: exact, tiny and dependency-free.

    Decoding replaces invalid byte sequences (a sampled continuation can stop mid-character).
    """

    vocab_size = 256
    chat_template = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")
