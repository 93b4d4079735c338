"""The text around a stream: what opens it and what asks the model about it.

A chat model gets its own template: the stream opens a user turn (``stream_prefix``), the
transcript is that user's message, and a summary prompt closes the turn and opens the
assistant's (``summary_prompt``), so the transcript is never stray context outside the
conversation. A model without a chat template gets a plain "Instruction: ... Answer:" tail.

(The RWKV engine does not share this: RWKV world models have no template and learned their
own ``User:``/``Assistant:`` turns, see ``workers/engines/rwkv/prompts.py``.)
"""

from __future__ import annotations

from typing import Any

from workers.engines.base import Tokenizer

#: what a stream's user turn starts with, before the first entry
TRANSCRIPT_INTRO = "Here is a live transcript. You will be asked about it.\n\n"

_MARKER = "\u0000TRANSCRIPT\u0000"


def chat_parts(tokenizer: Any) -> tuple[str, str] | None:
    """The chat template around one user message: (text before it, text after it, including
    the opening of the assistant's turn); None without a usable template."""
    if not (getattr(tokenizer, "chat_template", None)
            and hasattr(tokenizer, "apply_chat_template")):
        return None
    text = str(tokenizer.apply_chat_template([{"role": "user", "content": _MARKER}],
                                             add_generation_prompt=True, tokenize=False))
    before, found, after = text.partition(_MARKER)
    return (before, after) if found else None


def stream_prefix(tokenizer: Tokenizer) -> list[int]:
    """Tokens fed before a stream's first entry: the user turn's opening and the intro."""
    parts = chat_parts(tokenizer)
    opening = parts[0] if parts else ""
    return tokenizer.encode(opening + TRANSCRIPT_INTRO)


def summary_prompt(tokenizer: Tokenizer, instruction: str) -> list[int]:
    """Tokens that end the transcript, ask ``instruction`` and leave the model to answer."""
    parts = chat_parts(tokenizer)
    if parts is None:
        return tokenizer.encode(f"\n\nInstruction: {instruction}\nAnswer:")
    return tokenizer.encode(f"\n---\n{instruction}{parts[1]}")
