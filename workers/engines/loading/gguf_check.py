"""Checking a GGUF file against what it must be, before anything loads or converts it.

A downloaded model is trusted only once its size and sha256 match the published ones and its
own metadata names the expected architecture and shape: a truncated download, a part out of
order or a different model is refused with the reason and what to do, never converted into
the cache under the preset's name.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

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


_MAGIC = b"GGUF"
#: little-endian struct formats of GGUF's fixed-size value types, by type id
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_MAX_STRING = 64 << 20  # a longer "string" is a corrupt or foreign file, not a model


class _Header:
    """A forward-only reader of a GGUF header's key/value section (format v2/v3).

    The ``gguf`` package's reader parses every field, the tokenizer's 151,000 strings
    included: ~100 s for the 1.5B preset on a loaded 2-core box. The facts checked here sit
    at the head of the file, before the tokenizer, so this reads only up to them.
    """

    def __init__(self, fh: BinaryIO, path: Path) -> None:
        self.fh, self.path = fh, path

    def _read(self, n: int) -> bytes:
        data = self.fh.read(n)
        if len(data) != n:
            raise GGUFVerifyError(f"{self.path} ends inside its GGUF header")
        return data

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self._read(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        if n > _MAX_STRING:
            raise GGUFVerifyError(f"{self.path} has a corrupt GGUF header")
        return self._read(n).decode("utf-8", "replace")

    def value(self, kind: int) -> Any:
        """A value of type ``kind``; arrays are skipped (None): no checked fact is one."""
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.unpack("<I"), self.unpack("<Q")
            if item in _SCALARS:
                self.fh.seek(struct.calcsize(_SCALARS[item]) * count, 1)
            else:
                for _ in range(count):
                    self.value(item)
            return None
        raise GGUFVerifyError(f"{self.path} has an unknown GGUF value type {kind}")


def read_gguf_facts(path: Path) -> GGUFFacts:
    """Architecture, layer count and KV heads from the file's metadata, reading the header
    only as far as those keys."""
    found: dict[str, Any] = {}
    with path.open("rb") as fh:
        header = _Header(fh, path)
        if fh.read(4) != _MAGIC:
            raise GGUFVerifyError(f"{path} is not a readable GGUF file (no GGUF magic)")
        version = header.unpack("<I")
        if version not in (2, 3):
            raise GGUFVerifyError(f"{path} is not a readable GGUF file (version {version})")
        header.unpack("<Q")  # tensor count
        for _ in range(header.unpack("<Q")):
            key = header.string()
            found[key] = header.value(header.unpack("<I"))
            arch = found.get("general.architecture")
            wanted = ("general.name", f"{arch}.block_count", f"{arch}.attention.head_count_kv")
            if arch and all(k in found for k in wanted):
                break
    arch = str(found.get("general.architecture") or "")
    layers = found.get(f"{arch}.block_count")
    kv_heads = found.get(f"{arch}.attention.head_count_kv")
    return GGUFFacts(
        name=str(found.get("general.name") or ""),
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
