"""RWKV engine: a stream's memory is the model's recurrent state, constant in size.

Built on the ``rwkv`` pip package (0.8.x), whose behaviour shapes this module:

* **One model configuration per process.** ``rwkv.model`` picks its code path at import time
  (``RWKV_V7_ON=1`` swaps the ``RWKV`` class for the RWKV-7 one, and the older v4/v5/v6 class
  is then unreachable), and RWKV-7 keeps ``DTYPE``/``DEVICE`` as module globals that every
  model construction overwrites. So a process serves either RWKV-7 or v4-v6 checkpoints, and
  for RWKV-7 one (device, dtype) pair; a conflicting request raises :class:`RWKVConfigError`
  instead of silently corrupting the first model. Several checkpoints with the same
  configuration may share a process.
* **Forward may mutate the state it is given** (the CUDA kernels update it in place; the Python
  path rebinds the list's slots), and the tensors it returns can be views of ``[T, C]`` work
  buffers. So every forward gets a private clone and its outputs are cloned before they are
  kept: the engine stays pure (``feed`` never touches its input) and a failed forward leaves the
  committed state as it was.
* **No batch dimension**: for RWKV-7 on CPU, ``feed_batch`` runs several streams' chunks in
  one pass through our own batched forward (:mod:`workers.engines.rwkv_batched`, which reads
  the package's loaded weights); otherwise it loops over streams (see its docstring).
* **A state alone cannot be sampled from**: the logits after the last processed token travel
  with the state (``RWKVState.logits``) and are persisted with it.

State layout (package order, ``L`` layers, ``C`` channels, ``H`` heads of size ``N``):

* RWKV-7 and v5/v6: 3 tensors per layer: ``[C]`` att token-shift (strategy dtype),
  ``[H, N, N]`` wkv state (always fp32), ``[C]`` ffn token-shift (strategy dtype).
* RWKV-4: 5 per layer: ``[C]`` (strategy dtype), ``aa, bb, pp [C]`` (fp32), ``[C]``.

Every stream starts after ``bos_token_id`` (default 0: ``<|endoftext|>`` in RWKV vocabularies,
the separator RWKV-LM puts before every training document). The fresh state is the state after
that token, so the first real token already has a proper next-token distribution (``score``)
and streams are conditioned the way the model was trained. ``bos_token_id=None`` starts from
the zero state instead; see :meth:`RWKVEngine.score` for what the first token then gets.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import importlib.resources
import io
import math
import os
import re
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from state_store.tensors import StateSnapshot
from workers.engines.base import (
    Engine,
    EngineError,
    EngineState,
    Sampling,
    StateMismatchError,
    Tokenizer,
    UnsupportedModelError,
    aligned_chunks,
)
from workers.engines.sampling import penalized, pick_token
from workers.engines.tensor_bytes import dtype_name, from_raw, to_raw
from workers.engines.tokenizers import ByteTokenizer

__all__ = [
    "RWKVConfigError",
    "RWKVEngine",
    "RWKVState",
    "WorldTokenizer",
    "rwkv_strategy",
    "world_tokenizer",
]

#: bumped when the exported layout changes; stored in every snapshot's scalars
STATE_FORMAT = 1

WORLD_VOCAB_FILE = "rwkv_vocab_v20230424.txt"
WORLD_VOCAB_SIZE = 65536

_STRATEGY = re.compile(r"^(cpu|mps|cuda(?::\d+)?) (fp32|fp16|bf16)$")
_STRATEGY_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DTYPE_STRATEGY = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


class RWKVConfigError(EngineError):
    """This process is already set up for another RWKV generation, device or dtype."""


def rwkv_strategy(device: str = "cpu", dtype: str = "float32") -> str:
    """Map the project's (device, torch dtype name) settings to an ``rwkv`` strategy string."""
    try:
        return f"{device} {_DTYPE_STRATEGY[dtype]}"
    except KeyError:
        raise ValueError(f"RWKV serves float32, float16 or bfloat16, not {dtype!r}") from None


# ----- tokenizer ---------------------------------------------------------------------------


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


# ----- process-wide package configuration --------------------------------------------------


@dataclass(frozen=True)
class _ProcessConfig:
    v7: bool
    device: str
    dtype: torch.dtype


_CONFIG_LOCK = threading.Lock()
_PROCESS_CONFIG: _ProcessConfig | None = None


def _rwkv_model_module(v7: bool) -> ModuleType:
    """Import ``rwkv.model`` in the mode the checkpoint needs, or fail if it is too late."""
    mod = sys.modules.get("rwkv.model")
    if mod is None:
        os.environ["RWKV_V7_ON"] = "1" if v7 else "0"
        with contextlib.redirect_stdout(io.StringIO()):  # it prints a banner
            mod = importlib.import_module("rwkv.model")
    imported_v7 = hasattr(mod, "RWKV_x070")
    if imported_v7 != v7:
        raise RWKVConfigError(
            f"rwkv.model was imported in {'RWKV-7' if imported_v7 else 'RWKV-4/5/6'} mode "
            f"(RWKV_V7_ON={'1' if imported_v7 else 'unset'}) but this checkpoint is "
            f"{'RWKV-7' if v7 else 'RWKV-4/5/6'}; the package picks its code path once per "
            f"process, so serve this model from a separate worker process"
        )
    return mod


def _claim_config(want: _ProcessConfig) -> _ProcessConfig | None:
    """Reserve the process configuration; returns the previous one (to undo on failure)."""
    global _PROCESS_CONFIG
    have = _PROCESS_CONFIG
    if have is not None:
        conflict = have.v7 != want.v7 or (
            want.v7 and (have.device != want.device or have.dtype != want.dtype)
        )
        if conflict:
            raise RWKVConfigError(
                f"this process already serves RWKV {_describe(have)}; cannot also load "
                f"{_describe(want)}: the rwkv package keeps the generation (RWKV_V7_ON) and, "
                f"for RWKV-7, the device and dtype as module globals. Run one worker process "
                f"per model configuration"
            )
    _PROCESS_CONFIG = want
    return have


def _restore_config(previous: _ProcessConfig | None) -> None:
    global _PROCESS_CONFIG
    _PROCESS_CONFIG = previous


def _describe(cfg: _ProcessConfig) -> str:
    gen = "v7" if cfg.v7 else "v4-v6"
    return f"{gen} on {cfg.device} {str(cfg.dtype).removeprefix('torch.')}"


# ----- checkpoint inspection ---------------------------------------------------------------


@dataclass(frozen=True)
class _CheckpointInfo:
    version: str  # "7", "6", "5.2", "5.1", "5", "4" (the package's detection)
    n_layer: int
    n_embd: int
    vocab_size: int
    n_head: int
    head_size: int
    fingerprint: str


def _detect_version(sd: dict[str, torch.Tensor]) -> float:
    """The package's own generation detection, plus RWKV-7 (which it only knows by env var)."""
    if any(k.endswith("att.r_k") or k.endswith("att.x_r") for k in sd):
        return 7.0
    version = 4.0
    for k, v in sd.items():
        if "ln_x" in k:
            version = max(5.0, version)
        if "gate.weight" in k:
            version = max(5.1, version)
        if int(version) == 5 and "att.time_decay" in k and v.dim() > 1 and v.shape[1] > 1:
            version = max(5.2, version)
        if "time_maa" in k:
            version = max(6.0, version)
    return version


def _inspect_checkpoint(path: Path) -> _CheckpointInfo:
    """Read shapes and hash the weights. ``weights_only``: a model file is still untrusted."""
    try:
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:  # torch raises many types for bad files
        raise UnsupportedModelError(
            f"cannot read RWKV checkpoint {path}: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(sd, dict) or "emb.weight" not in sd or "head.weight" not in sd:
        raise UnsupportedModelError(f"{path} is not an RWKV checkpoint (no emb/head weights)")
    if "_strategy" in sd:
        raise UnsupportedModelError(
            f"{path} is pre-converted for strategy {sd['_strategy']!r}; give the raw checkpoint"
        )
    version = _detect_version(sd)
    vocab_size, n_embd = sd["emb.weight"].shape
    n_layer = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    if version == 7.0:
        n_head, head_size = sd["blocks.0.att.r_k"].shape
    elif version >= 5.0:  # the package takes H from time_faaaa (v6) or time_decay (v5)
        key = "blocks.0.att.time_faaaa" if version >= 6.0 else "blocks.0.att.time_decay"
        n_head = sd[key].shape[0]
        head_size = sd["blocks.0.att.key.weight"].shape[0] // n_head
    else:
        n_head, head_size = 1, sd["blocks.0.att.key.weight"].shape[0]
    vstr = "7" if version == 7.0 else f"{version:g}"

    h = hashlib.sha256()
    header = f"rwkv-fingerprint-v1|version={vstr}|n_layer={n_layer}|n_embd={n_embd}|"
    header += f"vocab={vocab_size}|n_head={n_head}|head_size={head_size}"
    h.update(header.encode())
    for key in sorted(sd):
        t = sd[key]
        if not isinstance(t, torch.Tensor):
            raise UnsupportedModelError(f"{path}: entry {key!r} is not a tensor")
        t = t.detach().contiguous()
        h.update(f"|{key}|{dtype_name(t.dtype)}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return _CheckpointInfo(
        vstr, n_layer, int(n_embd), int(vocab_size), int(n_head), int(head_size), h.hexdigest()
    )


# ----- the engine --------------------------------------------------------------------------


@dataclass
class RWKVState(EngineState):
    """A stream's RWKV memory.

    ``tensors`` are in the package's layout (see the module docstring) and are treated as
    immutable: the engine never writes into them, so states may share them safely.
    ``logits`` (``[V]``, the package's output dtype) predict the token after the last one
    *processed* (pending tokens are not yet processed); ``None`` only for a fresh stream of
    an engine without ``bos_token_id``.
    """

    tensors: list[torch.Tensor] = field(default_factory=list)
    logits: torch.Tensor | None = None


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
        strategy = " ".join(strategy.split())
        m = _STRATEGY.match(strategy)
        if m is None:
            raise ValueError(
                f"unsupported RWKV strategy {strategy!r}: use '<cpu|cuda[:N]|mps> "
                f"<fp32|fp16|bf16>' (the state must live on one device)"
            )
        if chunk_tokens < 1:
            raise ValueError("chunk_tokens must be >= 1")
        self.path = path.resolve()
        self.strategy = strategy
        self.device = m.group(1)
        self.dtype = _STRATEGY_DTYPES[m.group(2)]
        self.chunk_tokens = int(chunk_tokens)
        self._info = _inspect_checkpoint(self.path)
        self.version = self._info.version
        self.n_layer = self._info.n_layer
        self.n_embd = self._info.n_embd
        self.vocab_size = self._info.vocab_size
        self._model_name = model_name or self.path.stem
        if bos_token_id is not None and not 0 <= bos_token_id < self.vocab_size:
            raise ValueError(f"bos_token_id {bos_token_id} outside vocab {self.vocab_size}")
        self.bos_token_id = bos_token_id
        self.tokenizer = tokenizer if tokenizer is not None else self._default_tokenizer()

        v7 = self.version == "7"
        with _CONFIG_LOCK:
            previous = _claim_config(_ProcessConfig(v7, self.device, self.dtype))
            try:
                mod = _rwkv_model_module(v7)
                with contextlib.redirect_stdout(io.StringIO()):  # loaders print progress
                    if v7:  # RWKV_x070(model, strategy) appends ".pth" itself
                        self._model = mod.RWKV(str(self.path)[: -len(".pth")], strategy)
                    else:
                        self._model = mod.RWKV(str(self.path), strategy, verbose=False)
            except BaseException:
                _restore_config(previous)
                raise

        zero = self._zero_state()
        # Logits dtype as the package returns it (RWKV-7: strategy dtype; older: fp32).
        probe, _ = self._forward([0], zero)
        self._logits_dtype = probe.dtype
        # template: what import_state validates against and casts to
        self._template = [(tuple(t.shape), t.dtype) for t in zero]
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
        from workers.engines.rwkv_tiny import write_tiny_rwkv

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
    def _zero_state(self) -> list[torch.Tensor]:
        """The package's initial state for this model (its own code path where it has one)."""
        if self.version == "7":
            # Uses the module-global DTYPE/DEVICE, which _claim_config keeps consistent.
            return list(self._model.generate_zero_state())
        # v4-v6 only build it inside forward(tokens, None): mirror that code.
        args, w = self._model.args, self._model.w
        C, A, dev = args.n_embd, args.n_att, self.device
        state: list[torch.Tensor] = []
        for i in range(self.n_layer):
            if self.version == "4":
                f32 = torch.float32
                state += [
                    torch.zeros(C, dtype=self.dtype, device=dev),
                    torch.zeros(A, dtype=f32, device=dev),  # aa
                    torch.zeros(A, dtype=f32, device=dev),  # bb
                    torch.zeros(A, dtype=f32, device=dev) - 1e30,  # pp
                    torch.zeros(C, dtype=self.dtype, device=dev),
                ]
                continue
            H = args.n_head
            if getattr(args, "time_state", False):
                wkv = w[f"blocks.{i}.att.time_state"].transpose(1, 2).to(torch.float32, device=dev)
            else:
                wkv = torch.zeros((H, A // H, A // H), dtype=torch.float32, device=dev)
            state += [
                torch.zeros(C, dtype=self.dtype, device=dev),
                wkv.contiguous(),
                torch.zeros(C, dtype=self.dtype, device=dev),
            ]
        return state

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
        """Feed several streams; result i equals ``feed(states[i], token_lists[i])`` to fp32
        rounding (~1e-6 on logits), not bit for bit, when rows are batched.

        The ``rwkv`` package has no batch dimension. For RWKV-7 on CPU (the package's Python
        path) round r feeds the r-th chunk of every stream that has one in a single batched
        forward (:func:`workers.engines.rwkv_batched.batched_forward`: the package's formulas
        over stacked ``[B, ...]`` states, its rank-1 wkv update applied in O(N^2) instead of
        an O(N^3) matmul); it rounds differently from the package (~1e-6 relative).
        A round with one row, a single-stream ``feed``, and every other configuration (v4-v6,
        CUDA kernels, DeepEmbed) use the package forward, so solo feeding stays bit-identical
        to the package and replays of a stream fed alone are unchanged. A stream fed batched
        and replayed alone after a crash matches only to that rounding, which is why workers
        batch streams only when ``batch_streams`` > 1 (``workers/processing/multistream.py``).
        """
        if len(states) != len(token_lists):
            raise ValueError(f"{len(states)} states but {len(token_lists)} token lists")
        if len(states) < 2 or not self._batched_ok():
            return [self._feed_one(s, t) for s, t in zip(states, token_lists, strict=True)]
        from workers.engines.rwkv_batched import batched_forward

        plans = [
            aligned_chunks(s.pending, self._check_ids(t, "feed"), self.chunk_tokens)
            for s, t in zip(states, token_lists, strict=True)
        ]
        tensors = [list(s.tensors) for s in states]
        logits = [s.logits for s in states]
        rounds = max((len(chunks) for chunks, _ in plans), default=0)
        for r in range(rounds):
            rows = [i for i, (chunks, _) in enumerate(plans) if len(chunks) > r]
            if len(rows) == 1:
                i = rows[0]
                logits[i], tensors[i] = self._forward(plans[i][0][r], tensors[i])
                continue
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
        """Whether :mod:`workers.engines.rwkv_batched` reproduces this model's forward."""
        if self.version != "7" or self.device != "cpu" or os.environ.get("RWKV_CUDA_ON") == "1":
            return False
        from workers.engines.rwkv_batched import supported

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
        """Tensors ``state.000 ...`` in package order plus ``logits``; identity in scalars.

        The scalars repeat kind/fingerprint/version so ``import_state`` can refuse a foreign
        state by itself, whatever envelope the store wraps around it.
        """
        tensors = {f"state.{i:03d}": to_raw(t) for i, t in enumerate(state.tensors)}
        if state.logits is not None:
            tensors["logits"] = to_raw(state.logits)
        scalars: dict[str, object] = {
            "kind": self.kind,
            "format": STATE_FORMAT,
            "fingerprint": self.fingerprint,
            "rwkv_version": self.version,
            "chunk_tokens": self.chunk_tokens,
            "tokens_seen": int(state.tokens_seen),
            "pending": [int(t) for t in state.pending],
        }
        return StateSnapshot(tensors=tensors, scalars=scalars)

    def import_state(self, snapshot: StateSnapshot) -> RWKVState:
        """Rebuild a state, validating identity, bookkeeping and every shape; tensors are cast
        to this engine's dtypes (strategy dtype for token-shift vectors and logits, fp32 for
        wkv) and moved to its device. Any mismatch raises :class:`StateMismatchError`."""
        sc = snapshot.scalars
        if sc.get("kind") != self.kind:
            raise StateMismatchError(f"state is for engine {sc.get('kind')!r}, not 'rwkv'")
        if sc.get("format") != STATE_FORMAT:
            raise StateMismatchError(
                f"RWKV state format {sc.get('format')!r}; this engine reads {STATE_FORMAT}"
            )
        fp = sc.get("fingerprint")
        if fp != self.fingerprint:
            raise StateMismatchError(
                f"state belongs to model {str(fp)[:16]}..., this engine serves "
                f"{self.model_name} ({self.fingerprint[:16]}...)"
            )
        if sc.get("chunk_tokens") != self.chunk_tokens:
            raise StateMismatchError(
                f"state was fed in chunks of {sc.get('chunk_tokens')!r} tokens, this engine "
                f"uses {self.chunk_tokens}: replay would not be identical"
            )
        seen, pending = sc.get("tokens_seen"), sc.get("pending")
        if not isinstance(seen, int) or not isinstance(pending, list):
            raise StateMismatchError("state scalars lack tokens_seen/pending")
        pending_ids = [int(t) for t in pending]
        if len(pending_ids) >= self.chunk_tokens or (seen - len(pending_ids)) % self.chunk_tokens:
            raise StateMismatchError(
                f"state bookkeeping is inconsistent: {seen} tokens seen, {len(pending_ids)} "
                f"pending, chunk {self.chunk_tokens}"
            )
        if any(not 0 <= t < self.vocab_size for t in pending_ids):
            raise StateMismatchError("pending token ids outside the vocabulary")

        names = [f"state.{i:03d}" for i in range(len(self._template))]
        expected = set(names) | {"logits"}
        extra = sorted(set(snapshot.tensors) - expected)
        missing = [n for n in names if n not in snapshot.tensors]
        if extra or missing:
            raise StateMismatchError(
                f"RWKV state tensors do not match the model ({len(names)} expected): "
                f"missing {missing[:4]}, unexpected {extra[:4]}"
            )
        tensors: list[torch.Tensor] = []
        for name, (shape, dtype) in zip(names, self._template, strict=True):
            raw = snapshot.tensors[name]
            if tuple(raw.shape) != shape:
                raise StateMismatchError(
                    f"RWKV state tensor {name} has shape {tuple(raw.shape)}, model needs {shape}"
                )
            tensors.append(from_raw(raw, self.device).to(dtype))
        logits: torch.Tensor | None = None
        raw_logits = snapshot.tensors.get("logits")
        if raw_logits is not None:
            if tuple(raw_logits.shape) != (self.vocab_size,):
                raise StateMismatchError(
                    f"RWKV state logits have shape {tuple(raw_logits.shape)}, "
                    f"model needs ({self.vocab_size},)"
                )
            logits = from_raw(raw_logits, self.device).to(self._logits_dtype)
        elif self.bos_token_id is not None or seen - len(pending_ids) > 0:
            raise StateMismatchError("RWKV state has no logits after processing tokens")
        return RWKVState(tokens_seen=seen, pending=pending_ids, tensors=tensors, logits=logits)

    def state_nbytes(self, state: RWKVState) -> int:
        n = sum(t.numel() * t.element_size() for t in state.tensors)
        if state.logits is not None:
            n += state.logits.numel() * state.logits.element_size()
        return n

    # ----- text helpers --------------------------------------------------------------------
    def summary_prompt(self, instruction: str) -> list[int]:
        """RWKV world chat format: ``"\\n\\nUser: <instruction>\\n\\nAssistant:"``.

        The leading blank line ends whatever the stream said; blank lines inside the
        instruction are collapsed because "\\n\\n" is the turn separator the models learned.
        Callers usually stop generation at the next "\\n\\n" (``User:`` turn).
        """
        text = re.sub(r"\n\s*\n+", "\n", instruction.strip())
        return self.tokenizer.encode(f"\n\nUser: {text}\n\nAssistant:")
