"""Model specs (``workers/engines/loading/specs.py``): the default and tiny names, paths, hub ids,
and bad specs that name the valid forms."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from workers.engines.loading import ModelSpec, ModelSpecError, parse_spec

pytestmark = pytest.mark.usefixtures("no_hub")


# ----- spec parsing ----------------------------------------------------------------------------


def test_parse_default_and_tiny_specs() -> None:
    assert parse_spec("smollm2").kind == "smollm2"
    assert parse_spec(" SmolLM2 ").kind == "smollm2"
    spec = parse_spec("tiny-llama:7")
    assert (spec.kind, spec.name, spec.seed) == ("tiny", "tiny-llama", 7)
    assert spec.engine_kind == "sinkkv"
    assert parse_spec("tiny-qwen2") == ModelSpec("tiny", "tiny-qwen2", name="tiny-qwen2", seed=0)
    rwkv = parse_spec("tiny-rwkv:3")
    assert (rwkv.name, rwkv.seed, rwkv.engine_kind) == ("tiny-rwkv", 3, "rwkv")


def test_parse_paths(tmp_path: Path, tiny_gguf: Path) -> None:
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    assert parse_spec(str(model_dir)) == ModelSpec(
        "hf-dir", str(model_dir), path=model_dir.resolve(), name="my-model"
    )
    gguf_spec = parse_spec(str(tiny_gguf))
    assert (gguf_spec.kind, gguf_spec.path, gguf_spec.engine_kind) == ("gguf", tiny_gguf, "sinkkv")

    pth = tmp_path / "RWKV-x070-World-0.1B.pth"
    pth.write_bytes(b"x")
    spec = parse_spec(f"rwkv:{pth}")
    assert (spec.kind, spec.path, spec.engine_kind) == ("rwkv", pth, "rwkv")
    # the rwkv package convention of naming the checkpoint without .pth works too
    assert parse_spec(f"rwkv:{pth.with_suffix('')}").path == pth


def test_parse_hub_ids() -> None:
    assert parse_spec("HuggingFaceTB/SmolLM2-360M-Instruct") == ModelSpec(
        "hub", "HuggingFaceTB/SmolLM2-360M-Instruct", name="HuggingFaceTB/SmolLM2-360M-Instruct"
    )
    assert parse_spec("hf:gpt2").name == "gpt2"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty model spec"),
        ("smolm2", "unknown model spec"),  # a typo must not reach for a hub
        ("tiny-gpt", "unknown tiny model"),
        ("tiny-llama:x", "must be a non-negative integer"),
        ("tiny-rwkv:-1", "must be a non-negative integer"),
        ("rwkv:", "missing path"),
        ("rwkv:/nonexistent/model.pth", "does not exist"),
        ("/nonexistent/model.gguf", "does not exist"),
        ("/nonexistent/dir/", "no such file or directory"),
        ("./relative/missing", "no such file or directory"),
        ("hf:bad..id", "not a valid hub id"),
        ("org/na me", "unknown model spec"),
    ],
)
def test_bad_specs_name_the_valid_forms(text: str, message: str) -> None:
    with pytest.raises(ModelSpecError, match=re.escape(message)) as info:
        parse_spec(text)
    if message not in ("does not exist", "not a valid hub id"):
        assert "valid model specs" in str(info.value)
        assert "rwkv:/path/to/model.pth" in str(info.value)


def test_directory_without_config_and_non_gguf_file(tmp_path: Path) -> None:
    with pytest.raises(ModelSpecError, match="no config.json"):
        parse_spec(str(tmp_path))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"x")
    with pytest.raises(ModelSpecError, match="not a .gguf"):
        parse_spec(str(weights))
