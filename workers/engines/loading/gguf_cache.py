"""The GGUF -> safetensors conversion cache: a GGUF file made loadable fast, once.

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
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from workers.engines.loading.offline import hub_offline
from workers.engines.loading.prepared import PreparedModel
from workers.engines.loading.specs import ModelLoadError

__all__ = [
    "CACHE_MARKER",
    "ensure_gguf_cache",
    "file_identity",
    "file_lock",
    "gguf_cache_dir",
    "is_cache_complete",
]

#: the logger these lines had before the loading package was split: log output is unchanged
log = logging.getLogger("workers.engines.loading")

#: name of the marker written last into a converted cache directory
CACHE_MARKER = "sinkstream-cache.json"


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


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
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


def ensure_gguf_cache(
    gguf_path: Path, cache_root: Path, name: str | None = None, directory: Path | None = None
) -> PreparedModel:
    """Convert ``gguf_path`` into a safetensors HF directory under ``cache_root`` once.

    ``directory`` names the cache directory when the caller knows it in advance (a preset's,
    named by the source's published sha256); by default it is named by the file's identity.
    Returns the cache directory; ``converted`` says whether this call did the conversion.
    """
    started = time.perf_counter()
    gguf_path = Path(gguf_path)
    final = directory if directory is not None else gguf_cache_dir(gguf_path, cache_root, name)
    if is_cache_complete(final):
        return _prepared(final, False, started, gguf_path)
    with contextlib.ExitStack() as stack:
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            stack.enter_context(file_lock(final.with_name(final.name + ".lock")))
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
    with hub_offline():
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
