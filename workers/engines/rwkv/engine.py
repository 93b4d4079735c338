"""RWKV engine: a stream's memory is the model's recurrent state, constant in size.

Built on the ``rwkv`` pip package (0.8.x), whose behaviour shapes this engine (the
process-wide configuration it imposes is ``package.py``'s business):

* **Forward may mutate the state it is given** (the CUDA kernels update it in place; the Python
  path rebinds the list's slots), and the tensors it returns can be views of ``[T, C]`` work
  buffers. So every forward gets a private clone and its outputs are cloned before they are
  kept: the engine stays pure (``feed`` never touches its input) and a failed forward leaves the
  committed state as it was.
* **No batch dimension**: for RWKV-7 on CPU, ``feed_batch`` runs several streams' chunks in
  one pass through our own batched forward (:mod:`workers.engines.rwkv.batched`, which reads
  the package's loaded weights); otherwise it loops over streams (see its docstring).
* **A state alone cannot be sampled from**: the logits after the last processed token travel
  with the state (``RWKVState.logits``, see ``state.py`` for the layout) and are persisted
  with it.

Every stream starts after ``bos_token_id`` (default 0: ``<|endoftext|>`` in RWKV vocabularies,
the separator RWKV-LM puts before every training document). The fresh state is the state after
that token, so the first real token already has a proper next-token distribution (``score``)
and streams are conditioned the way the model was trained. ``bos_token_id=None`` starts from
the zero state instead; see :meth:`RWKVEngine.score` for what the first token then gets.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from state_store.tensors import StateSnapshot
from workers.engines.base import (
    Engine,
    EngineError,
    Sampling,
    Tokenizer,
    UnsupportedModelError,
    aligned_chunks,
)
from workers.engines.rwkv import prompts
from workers.engines.rwkv.batched import batched_forward, supported
from workers.engines.rwkv.checkpoint import inspect_checkpoint
from workers.engines.rwkv.package import load_model, parse_strategy
from workers.engines.rwkv.state import (
    STATE_FORMAT,
    RWKVState,
    export_snapshot,
    import_snapshot,
    state_nbytes,
    zero_state,
)
from workers.engines.rwkv.tiny import write_tiny_rwkv
from workers.engines.rwkv.tokenizer import WORLD_VOCAB_SIZE, world_tokenizer
from workers.engines.sampling import penalized, pick_token
from workers.engines.tensor_bytes import dtype_name
from workers.engines.tokenizers import ByteTokenizer

__all__ = ["RWKVEngine"]


class RWKVEngine(Engine[RWKVState]):
    """An RWKV checkpoint served through the ``rwkv`` package.

    ``model_path``: a raw RWKV-LM ``.pth`` (the suffix may be omitted, as with the package).
    ``strategy``: ``"<cpu|cuda[:N]|mps> <fp32|fp16|bf16>"``; layer-split, streaming and int8
    strategies are refused because the state must live on one device in known dtypes.
    ``tokenizer``: default :class:`ByteTokenizer` for vocab 256 (tiny test models) and the world
    tokenizer for vocab 65,536; any other vocabulary needs one passed in.
    """

    kind = "rwkv"

    def __init__(
        self,
        model_path: str | Path,
        *,
        tokenizer: Tokenizer | None = None,
        strategy: str = "cpu fp32",
        chunk_tokens: int = 64,
        model_name: str | None = None,
        bos_token_id: int | None = 0,
    ) -> None:
        path = Path(model_path).expanduser()
        if path.suffix != ".pth" and path.with_name(path.name + ".pth").is_file():
            path = path.with_name(path.name + ".pth")
        if not path.is_file():
            raise UnsupportedModelError(f"RWKV checkpoint {path} does not exist")
        if path.suffix != ".pth":
            raise UnsupportedModelError(f"RWKV checkpoint {path} must be a .pth file")
        strategy, device, dtype = parse_strategy(strategy)
        if chunk_tokens < 1:
            raise ValueError("chunk_tokens must be >= 1")
        self.path = path.resolve()
        self.strategy = strategy
        self.device = device
        self.dtype = dtype
        self.chunk_tokens = int(chunk_tokens)
        self._info = inspect_checkpoint(self.path)
        self.version = self._info.version
        self.n_layer = self._info.n_layer
        self.n_embd = self._info.n_embd
        self.vocab_size = self._info.vocab_size
        self._model_name = model_name or self.path.stem
        if bos_token_id is not None and not 0 <= bos_token_id < self.vocab_size:
            raise ValueError(f"bos_token_id {bos_token_id} outside vocab {self.vocab_size}")
        self.bos_token_id = bos_token_id
        self.tokenizer = tokenizer if tokenizer is not None else self._default_tokenizer()

        self._model = load_model(
            self.path, strategy, v7=self.version == "7", device=self.device, dtype=self.dtype
        )

        zero = zero_state(self._model, self.version, self.n_layer, self.device, self.dtype)
        # Logits dtype as the package returns it (RWKV-7: strategy dtype; older: fp32).
        probe, _ = self._forward([0], zero)
        self.logits_dtype = probe.dtype
        # template: what import_state validates against and casts to
        self.state_template = [(tuple(t.shape), t.dtype) for t in zero]
        if bos_token_id is None:
            self._fresh = RWKVState(tensors=zero, logits=None)
        else:
            logits, tensors = self._forward([bos_token_id], zero)
            self._fresh = RWKVState(tensors=tensors, logits=logits)

    @classmethod
    def tiny(
        cls,
        directory: str | Path,
        *,
        seed: int = 0,
        version: int = 7,
        strategy: str = "cpu fp32",
        chunk_tokens: int = 64,
    ) -> RWKVEngine:
        """A seeded tiny random RWKV model (vocab 256, ByteTokenizer), written once into
        ``directory`` and loaded from there."""
        path = Path(directory) / f"tiny-rwkv{version}-seed{seed}.pth"
        if not path.is_file():
            tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.pth")
            write_tiny_rwkv(tmp, version=version, seed=seed)
            os.replace(tmp, path)  # atomic: concurrent workers never read half a file
        return cls(
            path,
            strategy=strategy,
            chunk_tokens=chunk_tokens,
            model_name=f"tiny-rwkv{version}:{seed}",
        )

    def _default_tokenizer(self) -> Tokenizer:
        if self.vocab_size == ByteTokenizer.vocab_size:
            return ByteTokenizer()
        if self.vocab_size == WORLD_VOCAB_SIZE:
            return world_tokenizer()
        raise UnsupportedModelError(
            f"{self.path.name} has a {self.vocab_size}-token vocabulary; the world tokenizer "
            f"(65536) and ByteTokenizer (256) do not fit it: pass tokenizer=..."
        )

    # ----- identity ------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self._model_name

    @property
    def fingerprint(self) -> str:
        """sha256 over generation, dimensions and every checkpoint tensor (name, dtype, shape,
        bytes), computed once at load. Independent of strategy: dtype is in ``params``."""
        return self._info.fingerprint

    @property
    def params(self) -> dict[str, Any]:
        return {
            "engine_format": STATE_FORMAT,
            "chunk_tokens": self.chunk_tokens,
            "dtype": dtype_name(self.dtype),
            "rwkv_version": self.version,
            "bos_token_id": self.bos_token_id,
        }

    # ----- model calls ---------------------------------------------------------------------
    def _forward(
        self,
        tokens: list[int],
        tensors: Sequence[torch.Tensor],
        *,
        full_output: bool = False,
        owned: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One package forward over ``tokens`` (``[T]``) from ``tensors``.

        Returns logits (``[V]``, or ``[T, V]`` with ``full_output`` and T > 1) and the new state.
        The input is cloned first unless the caller ``owned`` it (a scratch state), because the
        CUDA kernels update it in place; outputs are cloned because they can be views of
        ``[T, C]`` buffers that would otherwise stay alive inside a stored state.
        """
        work = list(tensors) if owned else [t.clone() for t in tensors]
        logits, new = self._model.forward(list(tokens), work, full_output=full_output)
        return logits.detach().clone(), [t.detach().clone() for t in new]

    def _check_ids(self, ids: Sequence[int], what: str) -> list[int]:
        out = [int(i) for i in ids]
        bad = [i for i in out if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"{what}: token ids {bad[:5]} outside vocab 0..{self.vocab_size - 1}")
        return out

    # ----- state lifecycle -----------------------------------------------------------------
    def new_state(self) -> RWKVState:
        fresh = self._fresh
        return RWKVState(tokens_seen=0, pending=[], tensors=fresh.tensors, logits=fresh.logits)

    def _feed_one(self, state: RWKVState, token_ids: Sequence[int]) -> RWKVState:
        """``state`` after ``token_ids`` through the package's own forward, one chunk at a time
        (the configurations the batched forward does not reproduce)."""
        tokens = self._check_ids(token_ids, "feed")
        chunks, rest = aligned_chunks(state.pending, tokens, self.chunk_tokens)
        tensors, logits = state.tensors, state.logits
        for chunk in chunks:  # always exactly chunk_tokens long: same kernels on every replay
            logits, tensors = self._forward(chunk, tensors)
        return RWKVState(
            tokens_seen=state.tokens_seen + len(tokens),
            pending=rest,
            tensors=list(tensors),
            logits=logits,
        )

    def feed_batch(
        self, states: Sequence[RWKVState], token_lists: Sequence[Sequence[int]]
    ) -> list[RWKVState]:
        """Feed several streams; result i is bit-identical to ``feed(states[i], token_lists[i])``
        whatever else is in the batch, so a stream fed in batches and replayed alone after a
        crash commits the same state.

        The ``rwkv`` package has no batch dimension. For RWKV-7 on CPU (the package's Python
        path) every chunk, a lone stream's included, goes through
        :func:`workers.engines.rwkv.batched.batched_forward` (the package's formulas over
        stacked ``[B, ...]`` states, its rank-1 wkv update applied in O(N^2) instead of an
        O(N^3) matmul): round r feeds the r-th chunk of every stream that has one in a single
        forward. A row's arithmetic does not depend on its neighbours: every op is row-wise
        except the matmuls, whose rows over ``B * T`` inputs round like those over ``T`` on the
        CPU BLAS for T >= 64 (``workers/engines/invariance.py`` checks it on the running
        machine). It rounds differently from the package's own forward (~1e-6 relative), which
        ``generate``/``score`` still use (nothing they compute is committed).
        Every other configuration (v4-v6, CUDA kernels, DeepEmbed) feeds each stream alone
        through the package: invariant too, just not batched.
        """
        if len(states) != len(token_lists):
            raise ValueError(f"{len(states)} states but {len(token_lists)} token lists")
        if not self._batched_ok():
            return [self._feed_one(s, t) for s, t in zip(states, token_lists, strict=True)]
        plans = [
            aligned_chunks(s.pending, self._check_ids(t, "feed"), self.chunk_tokens)
            for s, t in zip(states, token_lists, strict=True)
        ]
        tensors = [list(s.tensors) for s in states]
        logits = [s.logits for s in states]
        rounds = max((len(chunks) for chunks, _ in plans), default=0)
        for r in range(rounds):
            rows = [i for i, (chunks, _) in enumerate(plans) if len(chunks) > r]
            out, new = batched_forward(
                self._model, [plans[i][0][r] for i in rows], [tensors[i] for i in rows]
            )
            for j, i in enumerate(rows):
                logits[i], tensors[i] = out[j].clone(), new[j]
        return [
            RWKVState(
                tokens_seen=s.tokens_seen + len(t),
                pending=rest,
                tensors=tensors[i],
                logits=logits[i],
            )
            for i, (s, t, (_, rest)) in enumerate(zip(states, token_lists, plans, strict=True))
        ]

    def _batched_ok(self) -> bool:
        """Whether :mod:`workers.engines.rwkv.batched` reproduces this model's forward."""
        if self.version != "7" or self.device != "cpu" or os.environ.get("RWKV_CUDA_ON") == "1":
            return False
        return supported(self._model)

    def generate(
        self,
        state: RWKVState,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        sampling: Sampling = Sampling(),
        extra_capacity: int = 0,
    ) -> list[int]:
        """Continue from ``pending + prompt_ids`` on a scratch copy; ``state`` is unchanged.

        ``extra_capacity`` is ignored: a recurrent state has no window to protect.

        Greedy when ``temperature`` is 0, else temperature + top-p sampling from a private
        generator seeded with ``sampling.seed`` (reproducible). The repetition penalty (CTRL
        style: positive logits divided, negative multiplied) applies to tokens generated in
        this call, and to ``pending + prompt_ids`` with ``penalize_prompt``; the stream's
        history is not kept. Generation stops before any of
        ``sampling.stop_token_ids`` or the end-of-text token (``bos_token_id``, 0 for RWKV
        vocabularies), which are not returned.
        """
        prompt = self._check_ids(prompt_ids, "generate")
        if max_new_tokens <= 0:
            return []
        context = [*state.pending, *prompt]
        if context:
            logits, tensors = self._forward(context, state.tensors)
        elif state.logits is not None:
            logits, tensors = state.logits, list(state.tensors)
        else:
            raise EngineError("cannot generate from an empty stream with an empty prompt")
        stops = set(sampling.stop_token_ids)
        if self.bos_token_id is not None:
            stops.add(self.bos_token_id)
        gen = torch.Generator(device="cpu").manual_seed(int(sampling.seed))
        out: list[int] = []
        for step in range(max_new_tokens):
            token = pick_token(logits, penalized(context, out, sampling), sampling, gen)
            if token in stops:
                break
            out.append(token)
            if step + 1 < max_new_tokens:
                # after the first step the scratch state is ours: skip the defensive clone
                logits, tensors = self._forward([token], tensors, owned=bool(context) or step > 0)
        return out

    def score(self, state: RWKVState, token_ids: Sequence[int]) -> list[float]:
        """Natural-log probability of each token given the stream so far and the ones before.

        One forward over ``pending + token_ids[:-1]`` with per-position logits. The first
        token's distribution is the one held in the state (after the last processed token; for
        a fresh stream, after ``bos_token_id``). Only a fresh stream of an engine built with
        ``bos_token_id=None`` has none: its first token gets the uniform ``-log(V)``.
        Per-position logits come from one sequence forward, so they can differ from
        chunk-by-chunk ``feed`` in the last float bits.
        """
        tokens = self._check_ids(token_ids, "score")
        if not tokens:
            return []
        context = [*state.pending, *tokens[:-1]]
        p0 = len(state.pending)  # index of tokens[0] in pending + tokens
        rows: torch.Tensor | None = None
        if context:
            all_logits, _ = self._forward(context, state.tensors, full_output=True)
            rows = torch.log_softmax(all_logits.float().reshape(len(context), -1), dim=-1)
        out: list[float] = []
        for j, tok in enumerate(tokens):
            pos = p0 + j
            if pos > 0:
                assert rows is not None
                out.append(float(rows[pos - 1, tok]))
            elif state.logits is not None:
                out.append(float(torch.log_softmax(state.logits.float(), dim=-1)[tok]))
            else:
                out.append(-math.log(self.vocab_size))
        return out

    # ----- persistence ---------------------------------------------------------------------
    def export_state(self, state: RWKVState) -> StateSnapshot:
        """Tensors ``state.000 ...`` in package order plus ``logits``; identity in scalars
        (see :func:`workers.engines.rwkv.state.export_snapshot`)."""
        return export_snapshot(self, state)

    def import_state(self, snapshot: StateSnapshot) -> RWKVState:
        """Rebuild a state, validating identity, bookkeeping and every shape; tensors are cast
        to this engine's dtypes and moved to its device. Any mismatch raises
        :class:`StateMismatchError` (see :func:`workers.engines.rwkv.state.import_snapshot`)."""
        return import_snapshot(self, snapshot)

    def state_nbytes(self, state: RWKVState) -> int:
        return state_nbytes(state)

    # ----- text helpers --------------------------------------------------------------------
    def summary_prompt(self, instruction: str) -> list[int]:
        """RWKV world chat format: ``"\\n\\nUser: <instruction>\\n\\nAssistant:"``
        (:func:`workers.engines.rwkv.prompts.summary_prompt`)."""
        return prompts.summary_prompt(self.tokenizer, instruction)
