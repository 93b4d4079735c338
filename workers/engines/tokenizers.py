"""Tokenizers behind the engine's small ``Tokenizer`` protocol."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import Any


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

    @property
    def line_break_ids(self) -> tuple[int, ...]:
        return (10,)


class HFTokenizer:
    """A transformers tokenizer behind the engine's protocol.

    ``encode`` adds no special tokens (a stream's text is a continuation, never a new document,
    and a BOS in the middle of a stream would confuse the model); ``decode`` skips them.
    ``apply_chat_template`` and ``chat_template`` pass through to the wrapped tokenizer.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.hf = tokenizer

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def chat_template(self) -> str | None:
        template = getattr(self.hf, "chat_template", None)
        return template if isinstance(template, str) else None

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        eos = getattr(self.hf, "eos_token_id", None)
        return (int(eos),) if isinstance(eos, int) else ()

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    @cached_property
    def line_break_ids(self) -> tuple[int, ...]:
        """Every token that holds a line break ("Ċ" in byte-level BPE, "<0x0A>" in
        sentencepiece vocabularies): a generation that must stay on one line stops at them."""
        vocab: dict[str, int] = self.hf.get_vocab()
        return tuple(sorted(i for t, i in vocab.items()
                            if "Ċ" in t or "\n" in t or t == "<0x0A>"))

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.hf.decode([int(i) for i in ids], skip_special_tokens=True))

    def apply_chat_template(
        self,
        messages: list[dict[str, str]],
        *,
        add_generation_prompt: bool = True,
        tokenize: bool = False,
    ) -> str:
        """The chat-formatted text (tokenize it with ``encode``); only ``tokenize=False``."""
        if tokenize:
            raise ValueError("HFTokenizer.apply_chat_template returns text; encode it after")
        return str(
            self.hf.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tokenize=False
            )
        )


def adapt_tokenizer(tokenizer: Any) -> Any:
    """Wrap a transformers tokenizer; pass anything else with encode/decode through."""
    try:
        from transformers import PreTrainedTokenizerBase
    except ImportError:  # pragma: no cover
        return tokenizer
    return HFTokenizer(tokenizer) if isinstance(tokenizer, PreTrainedTokenizerBase) else tokenizer


def eos_token_ids(model: Any, tokenizer: Any) -> tuple[int, ...]:
    """Every end-of-sequence id the tokenizer, the generation config or the model config names."""
    ids: set[int] = set()
    sources = [
        getattr(tokenizer, "eos_token_ids", None),
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
        getattr(model.config, "eos_token_id", None),
    ]
    for source in sources:
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple, set)):
            ids.update(int(i) for i in source if isinstance(i, int))
    return tuple(sorted(ids))
