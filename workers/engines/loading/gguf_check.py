"""Checking a GGUF file against what it must be, before anything loads or converts it.

A downloaded model is trusted only once its size and sha256 match the published ones and its
own metadata names the expected architecture and shape: a truncated download, a part out of
order or a different model is refused with the reason and what to do, never converted into
the cache under the preset's name.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from workers.engines.loading.presets import GGUFExpectation
from workers.engines.loading.specs import ModelLoadError

__all__ = ["GGUFFacts", "GGUFVerifyError", "read_gguf_facts", "sha256_file", "verify_gguf"]

#: called with (bytes done, bytes in all) while a long check runs
Progress = Callable[[int, int], None]

_BLOCK = 8 << 20


class GGUFVerifyError(ModelLoadError):
    """The file is not the model it should be."""


@dataclass(frozen=True)
class GGUFFacts:
    """What a GGUF file's metadata says it is."""

    name: str
    architecture: str
    layers: int
    kv_heads: int


def sha256_file(path: Path, progress: Progress | None = None) -> str:
    """The file's sha256, read in blocks (constant memory however large the file)."""
    total = path.stat().st_size
    digest = hashlib.sha256()
    done = 0
    with path.open("rb") as fh:
        while block := fh.read(_BLOCK):
            digest.update(block)
            done += len(block)
            if progress is not None:
                progress(done, total)
    return digest.hexdigest()


def read_gguf_facts(path: Path) -> GGUFFacts:
    """Architecture, layer count and KV heads from the file's metadata (the ``gguf`` package
    maps the file; only the header is read)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError, struct errors ... on foreign files
        raise GGUFVerifyError(f"{path} is not a readable GGUF file: {exc}") from exc

    def field(key: str) -> object:
        found = reader.get_field(key)
        return None if found is None else found.contents()

    arch = str(field("general.architecture") or "")
    layers = field(f"{arch}.block_count")
    kv_heads = field(f"{arch}.attention.head_count_kv")
    return GGUFFacts(
        name=str(field("general.name") or ""),
        architecture=arch,
        layers=int(layers) if isinstance(layers, int) else -1,
        kv_heads=int(kv_heads) if isinstance(kv_heads, int) else -1,
    )


def verify_gguf(
    path: Path,
    expected: GGUFExpectation,
    *,
    sha256: str | None = None,
    progress: Progress | None = None,
    remedy: str = "",
) -> GGUFFacts:
    """Refuse ``path`` unless its size, sha256 (``sha256`` if the caller hashed it while
    writing, else read now) and architecture are the expected ones; ``remedy`` ends each
    error with what to do."""
    hint = f"; {remedy}" if remedy else ""
    size = path.stat().st_size
    if size != expected.size:
        raise GGUFVerifyError(
            f"{path} has {size:,} bytes, not the expected {expected.size:,}{hint}"
        )
    digest = sha256 if sha256 is not None else sha256_file(path, progress)
    if digest != expected.sha256:
        raise GGUFVerifyError(
            f"{path} has sha256 {digest}, not the expected {expected.sha256}{hint}"
        )
    facts = read_gguf_facts(path)
    seen = (facts.architecture, facts.layers, facts.kv_heads)
    wanted = (expected.architecture, expected.layers, expected.kv_heads)
    if seen != wanted:
        raise GGUFVerifyError(
            f"{path} is a {facts.architecture or 'unknown'} model with {facts.layers} layers "
            f"and {facts.kv_heads} KV heads, not the expected {expected.architecture} with "
            f"{expected.layers} layers and {expected.kv_heads} KV heads{hint}"
        )
    return facts
