"""The engine interface the workers use for any model.

An engine owns a model and a tokenizer and turns a stream's text into a bounded *state*
(a sink-KV cache, or an RWKV recurrent state). Engines are pure with respect to states:
``feed`` returns a new state and never mutates its input, so a batch that fails half-way leaves
the committed state untouched and the worker can simply retry.

Replay determinism: a stream's tokens are processed in fixed chunks of ``chunk_tokens``
counted from the start of the stream. Tokens that do not yet fill a chunk wait in
``state.pending``; they are folded into temporary copies for ``generate``/``score``, and into
the state itself once the chunk fills. So the state after N tokens is bit-identical whatever
batch sizes the workers happened to use on the way.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from state_store.tensors import StateSnapshot


class EngineError(RuntimeError):
    """Base for engine errors that a worker reports instead of crashing."""


class UnsupportedModelError(EngineError):
    """The model's architecture cannot be served exactly by this engine."""


class StateMismatchError(EngineError):
    """A stored state belongs to another model, engine or parameter set."""


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass(frozen=True)
class Sampling:
    """How ``generate`` picks tokens. temperature 0 means greedy (deterministic).

    ``penalize_prompt`` extends the repetition penalty from the generated tokens to the
    context (the state's pending tokens and the prompt): it keeps a summary from copying its
    notes verbatim, and hurts an answer, which should reuse the question's words.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    repetition_penalty: float = 1.1
    stop_token_ids: tuple[int, ...] = ()
    penalize_prompt: bool = False


@dataclass
class EngineState:
    """Common fields of every engine state. Subclasses add the model memory.

    ``tokens_seen`` counts every token fed, including the ``pending`` ones still waiting for
    their chunk to fill.
    """

    tokens_seen: int = 0
    pending: list[int] = field(default_factory=list)


S = TypeVar("S", bound=EngineState)


class Engine(abc.ABC, Generic[S]):
    """A model plus the rules for carrying its memory of one stream."""

    #: short engine name stored in every state envelope ("sinkkv", "rwkv")
    kind: str
    tokenizer: Tokenizer
    chunk_tokens: int

    # ----- identity ------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def model_name(self) -> str:
        """Human-readable model name (for metrics labels and output entries)."""

    @property
    @abc.abstractmethod
    def fingerprint(self) -> str:
        """Hex digest of architecture, config and weights: a state only loads into its model."""

    @property
    @abc.abstractmethod
    def params(self) -> dict[str, Any]:
        """Engine parameters a stored state must match (sinks, window, chunk, dtype...)."""

    # ----- state lifecycle -----------------------------------------------------------------
    @abc.abstractmethod
    def new_state(self) -> S:
        """The state of a stream that has seen nothing."""

    def feed(self, state: S, token_ids: Sequence[int]) -> S:
        """Return the state after ``token_ids``; ``state`` is left as it was."""
        return self.feed_batch([state], [token_ids])[0]

    @abc.abstractmethod
    def feed_batch(self, states: Sequence[S], token_lists: Sequence[Sequence[int]]) -> list[S]:
        """Feed several streams at once; result i equals ``feed(states[i], token_lists[i])``,
        bit for bit unless ``batch_variance`` says why not (``workers/engines/invariance.py``)."""

    @abc.abstractmethod
    def generate(
        self,
        state: S,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        sampling: Sampling = Sampling(),
        extra_capacity: int = 0,
    ) -> list[int]:
        """Continue the stream with ``prompt_ids`` and return new token ids; state unchanged.

        ``extra_capacity``: tokens a windowed engine may hold beyond its window during this
        call only, so a long temporary prompt (e.g. retrieved text) does not evict the
        stream's recent window. At most ``max_extra_capacity()``; engines without a window
        ignore it.
        """

    def max_extra_capacity(self) -> int:
        """The most ``extra_capacity`` that ``generate`` accepts (the model's position limit
        minus the window); unbounded for engines without a window."""
        return 1 << 30

    def window_tokens(self) -> int | None:
        """How many of the stream's latest tokens the state holds verbatim (the recent
        window), or None when the state has no window and summarizes everything (RWKV).

        Text before that has left the model's view: it is what retrieval brings back.
        """
        return None

    def batch_variance(self) -> str | None:
        """Why this engine's batched feeds cannot equal its solo ones bit for bit, whatever the
        machine (None: nothing in its design; ``workers/engines/invariance.py`` then checks
        the machine's kernels)."""
        return None

    def scaled_down(self) -> Engine[S]:
        """This engine with its smallest window that still takes every path of a feed (sinks,
        eviction, re-rotation): the same model, forward and chunk size, for quick
        self-checks. An engine without a window returns itself."""
        return self

    @abc.abstractmethod
    def score(self, state: S, token_ids: Sequence[int]) -> list[float]:
        """Log-probability of each of ``token_ids`` given the state and the tokens before it."""

    # ----- persistence ---------------------------------------------------------------------
    @abc.abstractmethod
    def export_state(self, state: S) -> StateSnapshot:
        """The state as named raw tensors plus small scalars (no torch types)."""

    @abc.abstractmethod
    def import_state(self, snapshot: StateSnapshot) -> S:
        """Rebuild a state from ``export_state`` output, cast to the model's dtypes/device."""

    @abc.abstractmethod
    def state_nbytes(self, state: S) -> int:
        """Bytes of tensor memory the state holds (for hot-cache budgets and metrics)."""

    # ----- text helpers --------------------------------------------------------------------
    def stream_prefix(self) -> list[int]:
        """Tokens fed before a stream's first entry (they also become its attention sinks).

        Chat models get the opening of a user turn here, so the transcript that follows is
        *inside* the conversation and ``summary_prompt`` only has to close the turn.
        """
        return []

    @abc.abstractmethod
    def summary_prompt(self, instruction: str) -> list[int]:
        """Token ids that ask the model, after the stream so far, to follow ``instruction``.

        Uses the model's chat template when it has one.
        """


def aligned_chunks(
    pending: Sequence[int], new_tokens: Sequence[int], chunk_tokens: int
) -> tuple[list[list[int]], list[int]]:
    """Split ``pending + new_tokens`` into full chunks and the remainder still waiting.

    ``pending`` is always shorter than one chunk and starts on a chunk boundary, so every
    returned chunk starts at a multiple of ``chunk_tokens`` from the start of the stream.
    """
    tokens = [*pending, *new_tokens]
    full = len(tokens) - len(tokens) % chunk_tokens
    chunks = [tokens[i : i + chunk_tokens] for i in range(0, full, chunk_tokens)]
    return chunks, tokens[full:]
