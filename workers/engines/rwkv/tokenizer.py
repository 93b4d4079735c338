"""The RWKV "world" tokenizer (``rwkv_vocab_v20230424``, 65,536 ids) shipped in ``rwkv``."""

from __future__ import annotations

import functools
import importlib.resources
from collections.abc import Sequence

__all__ = ["WORLD_VOCAB_FILE", "WORLD_VOCAB_SIZE", "WorldTokenizer", "world_tokenizer"]

WORLD_VOCAB_FILE = "rwkv_vocab_v20230424.txt"
WORLD_VOCAB_SIZE = 65536


class WorldTokenizer:
    """The RWKV "world" tokenizer (``rwkv_vocab_v20230424``, 65,536 ids) shipped in ``rwkv``.

    Wraps the package's pure-Python trie (slow to build: get it via :func:`world_tokenizer`,
    which builds it once per process). Its own ``decode`` returns a lone U+FFFD for the whole
    text if any byte sequence is invalid (a continuation cut mid-character); we decode with
    ``errors="replace"`` instead and skip ids with no bytes (0 is ``<|endoftext|>``).
    """

    vocab_size = WORLD_VOCAB_SIZE
    chat_template = None

    def __init__(self) -> None:
        from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

        vocab = importlib.resources.files("rwkv") / WORLD_VOCAB_FILE
        with importlib.resources.as_file(vocab) as path:
            self._trie = TRIE_TOKENIZER(str(path))
        self._bytes: dict[int, bytes] = self._trie.idx2token

    def encode(self, text: str) -> list[int]:
        return list(self._trie.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        return b"".join(self._bytes.get(int(i), b"") for i in ids).decode("utf-8", errors="replace")


@functools.lru_cache(maxsize=1)
def world_tokenizer() -> WorldTokenizer:
    """The process-wide world tokenizer (built on first use, ~3 s)."""
    return WorldTokenizer()
