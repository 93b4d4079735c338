"""Every family the sink-KV engine accepts, against the per-token reference after eviction.

One tiny seeded model per family (``workers.engines.tiny``: hidden 64, 2 layers), built from its
transformers config class, on the three paths a stream takes: one token at a time, in chunks,
and in a multi-stream batch of uneven cache lengths; its state must survive the codec bit for
bit. Families the engine refuses are refused by name with the missing piece, never with an
AttributeError from a layout the engine guessed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import torch
from transformers.models.falcon.modeling_falcon import FalconAttention

from tests.unit.workers.engines.test_sinkkv import (
    _through_bytes,
    assert_states_equal,
    engine_logits,
    make_engine,
    max_state_diff,
    reference_logits,
    stream,
)
from workers.engines.base import Sampling, UnsupportedModelError
from workers.engines.sinkkv import SinkKVEngine, SinkKVState
from workers.engines.sinkkv.rotary import SlotRotary
from workers.engines.tiny import FAMILY_ARCHS, tiny_hf_model

TOL = 1e-5
#: one preset per layout family the engine accepts (the Llama layout's four model types too)
ACCEPTED = ("llama", "mistral", "qwen2", "qwen3", *FAMILY_ARCHS)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _keys_diff(engine: SinkKVEngine, state: SinkKVState, want: Sequence[torch.Tensor]) -> float:
    """Largest difference of the state's keys, at their current slots, from the reference's."""
    return max(
        (mine - ref[0]).abs().max().item()
        for mine, ref in zip(engine.rotated_keys(state), want, strict=True)
    )


def single_stream_diff(arch: str) -> float:
    """One token per forward (S=4, R=20, 90 tokens): logits and final keys vs the reference."""
    engine = make_engine(arch, sink_tokens=4, recent_tokens=20, chunk_tokens=1)
    tokens = stream(90, seed=1)
    got, state = engine_logits(engine, tokens)
    want, want_keys = reference_logits(engine.model, tokens, 4, 20, 1)
    assert state.cache_len == 24
    return max((got - want).abs().max().item(), _keys_diff(engine, state, want_keys))


def chunked_diff(arch: str) -> float:
    """Chunks of 8 (S=4, R=28, 160 tokens): what each chunk sees is the reference's too."""
    engine = make_engine(arch, sink_tokens=4, recent_tokens=28, chunk_tokens=8)
    tokens = stream(160, seed=2)
    got, state = engine_logits(engine, tokens)
    want, want_keys = reference_logits(engine.model, tokens, 4, 28, 8)
    return max((got - want).abs().max().item(), _keys_diff(engine, state, want_keys))


def batched_diff(arch: str) -> float:
    """Four streams started at different times (two with equal cache lengths: one group), fed
    a chunk each per ``feed_batch`` round until the longest is done; after each round each
    stream's next-token logits, and at the end its keys, vs its own per-chunk reference."""
    c, S, R = 8, 4, 28
    engine = make_engine(arch, sink_tokens=S, recent_tokens=R, chunk_tokens=c)
    starts = [0, 3 * c, 3 * c, 9 * c]  # tokens each stream was fed alone before the batch
    token_lists = [stream(14 * c, seed=30 + i) for i in range(len(starts))]
    refs = [reference_logits(engine.model, t, S, R, c) for t in token_lists]
    new = engine.new_state()
    states = [engine.feed(new, t[:n]) for t, n in zip(token_lists, starts, strict=True)]
    worst, pos = 0.0, list(starts)
    while any(p < len(t) for p, t in zip(pos, token_lists, strict=True)):
        rows = [i for i, t in enumerate(token_lists) if pos[i] < len(t)]
        fed = engine.feed_batch([states[i] for i in rows],
                                [token_lists[i][pos[i] : pos[i] + c] for i in rows])
        for i, state in zip(rows, fed, strict=True):
            states[i], pos[i] = state, pos[i] + c
            assert state.last_hidden is not None
            logits = engine.family.logits(state.last_hidden).float()
            worst = max(worst, (logits - refs[i][0][pos[i] - 1]).abs().max().item())
    for i, state in enumerate(states):
        solo = engine.feed(engine.new_state(), token_lists[i])
        assert max_state_diff(state, solo) <= TOL
        worst = max(worst, _keys_diff(engine, state, refs[i][1]))
    return worst


# ----- accepted families: exact on every path ------------------------------------------------


@pytest.mark.parametrize("arch", ACCEPTED)
def test_single_stream_matches_per_token_reference(arch: str) -> None:
    assert single_stream_diff(arch) <= TOL


@pytest.mark.parametrize("arch", ACCEPTED)
def test_chunked_matches_per_token_reference(arch: str) -> None:
    assert chunked_diff(arch) <= TOL


@pytest.mark.parametrize("arch", ACCEPTED)
def test_batched_streams_match_per_token_reference(arch: str) -> None:
    assert batched_diff(arch) <= TOL


@pytest.mark.parametrize("arch", ACCEPTED)
def test_state_round_trips_the_codec_bit_identically(arch: str) -> None:
    engine = make_engine(arch)
    state = engine.feed(engine.new_state(), stream(77))  # past eviction, 5 pending
    restored = engine.import_state(_through_bytes(engine, engine.export_state(state)))
    assert_states_equal(restored, state)
    more = stream(50, seed=9)
    assert_states_equal(engine.feed(restored, more), engine.feed(state, more))


@pytest.mark.parametrize("arch", FAMILY_ARCHS)
def test_generate_evicts_like_feed(arch: str) -> None:
    """The decode window (whole-width re-rotation, partial rotary included) picks the argmax
    of the logits a feed of prompt + output gives (chunk_tokens=1: the same grid)."""
    engine = make_engine(arch, sink_tokens=4, recent_tokens=12, chunk_tokens=1)
    state = engine.feed(engine.new_state(), stream(30))
    prompt = [65, 66, 67]
    out = engine.generate(state, prompt, 20, Sampling(repetition_penalty=1.0))
    logits = engine.logits(state, prompt + out)[len(prompt) - 1 : -1]  # [20, V]
    assert logits.argmax(dim=-1).tolist() == out


def test_falcon_batches_one_forward_per_cache_length(monkeypatch: pytest.MonkeyPatch) -> None:
    """Falcon's attention takes no ragged rows, so rows of one cache length share a forward:
    full windows (all S + R long) are one forward, as on the ragged path."""
    engine = make_engine("falcon")
    full = [engine.feed(engine.new_state(), stream(64, seed=i)) for i in range(3)]
    calls: list[int] = []
    run = engine._run_decoder

    def counted(view: Any, pieces: Any) -> torch.Tensor:
        calls.append(len(pieces))
        return run(view, pieces)

    monkeypatch.setattr(engine, "_run_decoder", counted)
    engine.feed_batch(full, [stream(8, seed=10 + i) for i in range(3)])
    assert calls == [3]
    calls.clear()
    engine.feed_batch([full[0], engine.new_state(), full[1]], [stream(8)] * 3)
    assert sorted(calls) == [1, 2]


def test_family_pieces_are_found_where_transformers_5_keeps_them() -> None:
    """The layouts, head sizes and transforms the adapters find on the tiny models."""
    found = {arch: make_engine(arch) for arch in ("gpt-neox", "falcon", "falcon-new", "granite",
                                                   "phi3-partial")}
    neox, falcon, falcon40, granite, phi = (found[a] for a in found)
    neox_model: Any = neox.model
    falcon_model: Any = falcon.model
    assert neox.family.decoder is neox_model.gpt_neox
    assert (neox.kv_heads, neox.head_dim, neox.rotary.rotary_dim) == (4, 16, 4)  # rotary 0.25
    assert falcon.family.layers is falcon_model.transformer.h
    assert falcon.kv_heads == 1  # multi-query: one shared key/value head
    # the new decoder architecture caches its 2 kv groups from transformers 5.25 on; before,
    # it broadcast them to its 4 query heads first
    assert falcon40.kv_heads == (4 if hasattr(FalconAttention, "_split_heads") else 2)
    assert granite.family.logits_divisor == 8.0
    assert phi.rotary.rotary_dim == 12  # 0.75 of 16


# ----- partial rotary: the first rotary_dim dims turn, the rest stay ------------------------


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_partial_rotation_turns_only_the_rotary_dims(dtype: torch.dtype,
                                                     interleaved: bool) -> None:
    """``rotate_into`` (feeds) and ``rotate_whole_into`` (decode) agree bit for bit on a
    partial rotary table, rotate-half or interleaved (Cohere's pairs), copy the unrotated dims
    exactly, and a zero rotation is exact."""
    torch.manual_seed(0)
    D, r = 16, 4
    inv_freq = 1.0 / (10000 ** (torch.arange(0, r, 2).float() / r))
    rotary = SlotRotary(inv_freq, 64, torch.device("cpu"), interleaved)
    assert rotary.rotary_dim == r
    stored = torch.randn(2, 40, D).to(dtype)
    cos, sin = rotary.cos_sin(torch.arange(20, 60), torch.arange(40))
    half, whole = torch.empty(2, 40, D), torch.empty(2, 40, D)
    rotary.rotate_into(stored, cos, sin, half)
    SlotRotary.rotate_whole_into(stored, rotary.half_partner(stored), rotary.whole(cos),
                                 rotary.whole(sin), whole)
    assert torch.equal(half, whole)
    assert torch.equal(half[..., r:], stored[..., r:].float())
    assert not torch.equal(half[..., :r], stored[..., :r].float())
    same = torch.empty(2, 40, D)
    rotary.rotate_into(stored, *rotary.cos_sin(torch.arange(40), torch.arange(40)), same)
    assert torch.equal(same, stored.float())
    if interleaved:  # pair (0, 1) turned by the first frequency, as Cohere's rotate_half pairs
        c, s_ = cos[:, 0], sin[:, 0]
        k = stored.float()
        assert torch.allclose(half[..., 0], k[..., 0] * c - k[..., 1] * s_)
        assert torch.allclose(half[..., 1], k[..., 1] * c + k[..., 0] * s_)


# ----- refusals: named, with the missing piece -----------------------------------------------


def test_a_sliding_window_shorter_than_the_sink_window_is_accepted() -> None:
    """Phi-3 mini 4k ships ``sliding_window`` 2047 and lists no layer types: every layer
    slides. A window shorter than S + R + T was refused; now each layer keeps its own window
    (masked by slot, as Hugging Face does), and the per-layer windows say so."""
    from workers.engines.sinkkv.info import layer_windows

    engine = make_engine("phi3", recent_tokens=21, chunk_tokens=8,
                         model_overrides={"sliding_window": 16})
    assert engine.sliding == (16, 16)
    assert layer_windows(engine) == {
        "0-1": "its last 16 slots only (sliding window 16, no sinks) of "
               "4 sinks + 21 recent (+8-token chunks)"}


def test_a_base_model_without_its_head_is_refused_by_name() -> None:
    """The support check used to reach into ``decoder.layers`` and crash on Falcon
    (``'FalconModel' object has no attribute 'layers'``); now each missing piece is named."""
    for arch, missing in (("falcon", "falcon decoder at transformer"),
                          ("gpt-neox", "gpt-neox decoder at gpt_neox"),
                          ("llama", "llama decoder at model")):
        base: Any = tiny_hf_model(arch).base_model
        with pytest.raises(UnsupportedModelError, match=missing):
            SinkKVEngine(base, None, model_name=arch)


def test_a_missing_piece_is_named_not_raised_as_attribute_error() -> None:
    model: Any = tiny_hf_model("falcon")
    del model.transformer.rotary_emb
    with pytest.raises(UnsupportedModelError,
                       match="lacks a rotary position embedding at transformer.rotary_emb"):
        SinkKVEngine(model, None, model_name="falcon")
    model = tiny_hf_model("gpt-neox")
    model.gpt_neox.layers = torch.nn.ModuleList()
    with pytest.raises(UnsupportedModelError, match="lacks decoder layers at gpt_neox.layers"):
        SinkKVEngine(model, None, model_name="gpt-neox")
    model = tiny_hf_model("gemma3")
    model.config.model_type = "gemma3"  # the multimodal wrapper's type: refused by name
    with pytest.raises(UnsupportedModelError, match="needs an adapter for the multimodal Gemma 3"):
        SinkKVEngine(model, None, model_name="gemma3")
    model.config.model_type = "gemma3_text"
    model.config.attn_logit_softcapping = 50.0  # Gemma 3 with a softcap: SDPA cannot
    with pytest.raises(UnsupportedModelError, match="softcap under sdpa"):
        SinkKVEngine(model, None, model_name="gemma3")
    with pytest.raises(UnsupportedModelError, match="ALiBi table of max_seq_len=16 keys"):
        make_engine("mpt", model_overrides={"max_position_embeddings": 16})  # S + R + T = 36
    model.config.model_type = "t5gemma"
    with pytest.raises(UnsupportedModelError, match="'t5gemma' has no architecture adapter"):
        SinkKVEngine(model, None, model_name="t5gemma")


# ----- sinkstream model info ------------------------------------------------------------------


def test_layout_info_names_family_scheme_windows_and_bytes() -> None:
    from workers.engines.loading import full_state_nbytes
    from workers.engines.sinkkv.info import describe_layout

    neox = describe_layout(make_engine("gpt-neox"))
    assert neox["family"] == "gpt-neox"
    assert neox["position_scheme"].startswith("partial rotary, first 4 of 16 dims")
    assert neox["layer_windows"] == {"0-1": "4 sinks + 24 recent (+8-token chunks)"}
    assert neox["state_bytes_per_token"] == 2 * 2 * 4 * 16 * 4 + 8  # layers, k+v, H_kv, D, fp32
    assert describe_layout(make_engine("granite"))["logits"] == "head output / 8"
    falcon = make_engine("falcon", storage_dtype="bfloat16")
    info = describe_layout(falcon)
    assert info["batched_attention"] == "one forward per cache length"
    assert info["state_bytes_per_token"] == 2 * 2 * 1 * 16 * 2 + 8
    cap, hidden = falcon.window.capacity, falcon.hidden_size * 4
    assert full_state_nbytes(falcon) == cap * info["state_bytes_per_token"] + hidden
    slides = describe_layout(make_engine("phi3", recent_tokens=20,
                                         model_overrides={"sliding_window": 32}))
    assert slides["layer_windows"] == {
        "0-1": "4 sinks + 20 recent (+8-token chunks), inside a sliding window of 32"}
    gemma2 = describe_layout(make_engine("gemma2"))
    assert gemma2["layer_windows"] == {
        "0": "its last 12 slots only (sliding window 12, no sinks) of "
             "4 sinks + 24 recent (+8-token chunks)",
        "1": "4 sinks + 24 recent (+8-token chunks)"}
    assert gemma2["logits"] == "softcap 3 * tanh(head output / 3)"
    assert gemma2["layer_positions"] == {"0-1": "rotary"}
    gemma3 = describe_layout(make_engine("gemma3"))
    assert gemma3["layer_positions"] == {"0": "rotary, sliding_attention table",
                                         "1": "rotary, full_attention table"}
    cohere2 = describe_layout(make_engine("cohere2"))
    assert cohere2["layer_positions"] == {"0": "rotary", "1": "NoPE (keys never re-rotated)"}
    assert "interleaved pairs" in cohere2["position_scheme"]
    assert cohere2["logits"] == "head output * 0.0625"
    mpt = describe_layout(make_engine("mpt"))
    assert mpt["position_scheme"].startswith("ALiBi bias by cache-slot distance")
    assert mpt["layer_positions"] == {"0-1": "ALiBi bias (keys never re-rotated)"}


def test_cli_model_info_prints_the_family(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from typer.testing import CliRunner

    from sinkstream.cli import app as cli
    from sinkstream.cli import common as cli_common

    monkeypatch.setenv("SINKSTREAM_MODEL_CACHE_DIR", str(tmp_path / "models"))
    monkeypatch.setattr(cli_common.state, "settings", None)
    result = CliRunner().invoke(cli.app, ["model", "info", "tiny-gpt-neox", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["family"] == "gpt-neox" and payload["model_type"] == "gpt_neox"
    assert "partial rotary" in payload["position_scheme"]
    assert payload["state_bytes_per_token"] > 0 and payload["layer_windows"]
