"""The text that asks an RWKV model about its stream: the RWKV world chat format.

RWKV world models have no chat template; they learned ``User:``/``Assistant:`` turns separated
by a blank line. (Transformer models get their own template: ``workers/engines/sinkkv/prompts.py``.)
"""

from __future__ import annotations

import re

from workers.engines.base import Tokenizer

__all__ = ["summary_prompt"]


def summary_prompt(tokenizer: Tokenizer, instruction: str) -> list[int]:
    """RWKV world chat format: ``"\\n\\nUser: <instruction>\\n\\nAssistant:"``.

    The leading blank line ends whatever the stream said; blank lines inside the
    instruction are collapsed because "\\n\\n" is the turn separator the models learned.
    Callers usually stop generation at the next "\\n\\n" (``User:`` turn).
    """
    text = re.sub(r"\n\s*\n+", "\n", instruction.strip())
    return tokenizer.encode(f"\n\nUser: {text}\n\nAssistant:")
