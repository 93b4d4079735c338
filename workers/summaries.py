"""What the model is asked, and what a published summary looks like.

Summaries are generated from a *copy* of a stream's state: the stream's memory already holds the
transcript (sinks + recent window, or the RWKV state), so a summary costs only the prompt and
the new tokens, never a re-read of the transcript.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import Enum

from workers.engines.base import Sampling


class SummaryKind(str, Enum):
    ROLLING = "rolling"
    FINAL = "final"
    ON_DEMAND = "on_demand"
    ANSWER = "answer"


# Short, single-task instructions: small instruct models (SmolLM2-135M) follow these and
# ramble on long multi-part ones (checked by hand on the demo transcript).
ROLLING_INSTRUCTION = (
    "Summarize the conversation above in three sentences. Mention who does what."
)
FINAL_INSTRUCTION = (
    "The meeting is over. Write short meeting notes for the conversation above: what was "
    "decided, who does what, and what is still open."
)
#: sampling for summaries: greedy, with a penalty that keeps small models from looping
SUMMARY_SAMPLING = Sampling(repetition_penalty=1.3)


def answer_instruction(question: str) -> str:
    return f"Answer this question about the conversation above: {question}"


def format_turn(text: str, speaker: str | None) -> str:
    """How one input entry enters the model: ``Speaker: text`` on its own line."""
    text = text.strip()
    return f"{speaker}: {text}\n" if speaker else f"{text}\n"


@dataclass(frozen=True)
class OutputEntry:
    """One entry of ``sinkstream:{id}:out`` (contract: see README "Output entries")."""

    kind: SummaryKind
    text: str
    covers: str  # id of the last input entry applied to the state summarized
    tokens_seen: int
    model: str
    ts: float
    request: str = ""

    def fields(self) -> dict[str, str]:
        out = {
            "kind": self.kind.value,
            "text": self.text,
            "covers": self.covers,
            "tokens_seen": str(self.tokens_seen),
            "model": self.model,
            "ts": f"{self.ts:.3f}",
        }
        if self.request:
            out["request"] = self.request
        return out

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> OutputEntry:
        return cls(
            kind=SummaryKind(fields["kind"]),
            text=fields.get("text", ""),
            covers=fields.get("covers", ""),
            tokens_seen=int(fields.get("tokens_seen", "0")),
            model=fields.get("model", ""),
            ts=float(fields.get("ts", "0")),
            request=fields.get("request", ""),
        )


def make_output(
    kind: SummaryKind, text: str, covers: str, tokens_seen: int, model: str, request: str = ""
) -> OutputEntry:
    return OutputEntry(kind, text.strip(), covers, tokens_seen, model, time.time(), request)


def rolling_summary_due(tokens_before: int, tokens_after: int, every: int) -> bool:
    """True when this batch crossed a multiple of ``every`` tokens (0 disables)."""
    return every > 0 and tokens_after // every > tokens_before // every
