"""RWKV engine against the ``rwkv`` package itself, on tiny seeded checkpoints.

The ``rwkv`` package fixes generation and (for RWKV-7) dtype/device once per process, so this
pytest process serves "cpu fp32" RWKV-7 only; the bf16 and RWKV-6 checks run this very module
in a child process (``python -m tests.unit.workers.engines.test_rwkv <mode> <dir>``, see
``_child_main``).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from state_store.tensors import RawTensor, StateSnapshot
from workers.engines.base import Sampling, StateMismatchError
from workers.engines.rwkv import RWKVConfigError, RWKVEngine, RWKVState, write_tiny_rwkv
from workers.engines.tensor_bytes import from_raw, to_raw

REPO = Path(__file__).resolve().parents[4]
CHUNK = 16
TEXT = "Alice: we ship on friday.\nBob: only if the tests pass! Carol: agreed. "


def _tokens(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 256) for _ in range(n)]


def _same(a: RWKVState, b: RWKVState) -> bool:
    """Bit-identical states (tensors, logits, bookkeeping)."""
    return (
        a.tokens_seen == b.tokens_seen
        and a.pending == b.pending
        and len(a.tensors) == len(b.tensors)
        and all(torch.equal(x, y) for x, y in zip(a.tensors, b.tensors, strict=True))
        and (a.logits is None) == (b.logits is None)
        and (a.logits is None or b.logits is None or torch.equal(a.logits, b.logits))
    )


def _copy(s: RWKVState) -> RWKVState:
    return RWKVState(
        tokens_seen=s.tokens_seen,
        pending=list(s.pending),
        tensors=[t.clone() for t in s.tensors],
        logits=None if s.logits is None else s.logits.clone(),
    )


def _snapshot_roundtrip(snap: StateSnapshot) -> StateSnapshot:
    """What the store does: bytes out, bytes back (fresh RawTensor objects)."""
    return StateSnapshot(
        tensors={k: RawTensor(v.dtype, v.shape, bytes(v.data)) for k, v in snap.tensors.items()},
        scalars=json.loads(json.dumps(snap.scalars)),
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("rwkv")
    write_tiny_rwkv(d / "tiny7-a.pth", version=7, seed=1)
    write_tiny_rwkv(d / "tiny7-b.pth", version=7, seed=2)
    return d


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> RWKVEngine:
    return RWKVEngine(model_dir / "tiny7-a.pth", strategy="cpu fp32", chunk_tokens=CHUNK)


def test_logits_match_the_package_forward(engine: RWKVEngine, model_dir: Path) -> None:
    import rwkv.model

    ref = rwkv.model.RWKV(str(model_dir / "tiny7-a"), "cpu fp32")  # package appends .pth
    tokens = engine.tokenizer.encode(TEXT)[: 2 * CHUNK]
    assert len(tokens) == 2 * CHUNK
    state = engine.feed(engine.new_state(), tokens)
    assert state.pending == [] and state.logits is not None

    # the package's own chunked forward, its own state handling: bit-identical to the
    # package path (``_feed_one``, used where the batched forward does not apply); the
    # batched re-implementation every RWKV-7 CPU feed takes rounds its sums differently
    out, st = ref.forward([0], None)  # the engine's stream-start token
    for i in range(0, len(tokens), CHUNK):
        out, st = ref.forward(tokens[i : i + CHUNK], st)
    package = engine._feed_one(engine.new_state(), tokens)
    assert package.logits is not None and torch.equal(package.logits, out)
    assert all(torch.equal(a, b) for a, b in zip(package.tensors, st, strict=True))
    torch.testing.assert_close(state.logits, out, rtol=1e-5, atol=1e-5)
    for a, b in zip(state.tensors, st, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    # token by token (the package's RNN mode): same up to float rounding
    outs, st1 = [], None
    for t in [0, *tokens]:
        o, st1 = ref.forward([t], st1)
        outs.append(o)
    assert torch.allclose(state.logits, outs[-1], atol=1e-4, rtol=1e-4)
    assert (state.logits - outs[-1]).abs().max() < 1e-4 < state.logits.std()

    # score: per-token log-probs agree with the token-by-token reference
    scores = torch.tensor(engine.score(engine.new_state(), tokens))
    want = torch.stack([torch.log_softmax(o, -1)[t] for o, t in zip(outs, tokens, strict=False)])
    assert torch.allclose(scores, want, atol=1e-4)
    # from a fed state the first token's log-prob comes from the logits held in the state
    nxt = _tokens(3, seed=9)
    assert engine.score(state, nxt)[0] == pytest.approx(
        float(torch.log_softmax(state.logits, -1)[nxt[0]]), abs=1e-6
    )


def test_export_import_continues_bit_identically_fp32(engine: RWKVEngine) -> None:
    tokens = _tokens(2 * CHUNK + 5)
    state = engine.feed(engine.new_state(), tokens)
    assert len(state.pending) == 5
    snap = _snapshot_roundtrip(engine.export_state(state))
    assert set(snap.tensors) == {f"state.{i:03d}" for i in range(6)} | {"logits"}
    back = engine.import_state(snap)
    assert _same(back, state)
    more = _tokens(2 * CHUNK, seed=1)
    assert _same(engine.feed(back, more), engine.feed(state, more))
    assert engine.generate(back, [], 8) == engine.generate(state, [], 8)


def _run_child(mode: str, directory: Path) -> dict[str, object]:
    env = dict(os.environ)
    env.pop("RWKV_V7_ON", None)  # the child's engine decides
    proc = subprocess.run(
        [sys.executable, "-m", "tests.unit.workers.engines.test_rwkv", mode, str(directory)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_export_import_continues_bit_identically_bf16(engine: RWKVEngine, model_dir: Path) -> None:
    result = _run_child("bf16", model_dir)
    assert result["roundtrip_identical"] is True
    assert result["continued_identical"] is True
    # v7 state: token-shift vectors in the strategy dtype, wkv in fp32; logits in bf16
    assert result["state_dtypes"] == ["bfloat16", "float32", "bfloat16"] * 2
    assert result["logits_dtype"] == "bfloat16"
    # a state stored in fp32 is cast back to the model's dtypes on import (exactly, here)
    assert result["cast_dtypes"] == result["state_dtypes"]
    assert result["cast_identical"] is True
    # same model in another precision: bf16 logits track the fp32 engine's
    fp32 = engine.feed(engine.new_state(), _tokens(2 * CHUNK + 5)).logits
    assert fp32 is not None
    bf16 = torch.tensor(result["logits"])
    assert (bf16 - fp32).abs().max() < 0.25 * fp32.std()
    assert not torch.equal(bf16, fp32)
    assert "already serves RWKV v7 on cpu bfloat16" in str(result["conflict_error"])


def test_rwkv6_checkpoint_in_its_own_process(tmp_path: Path) -> None:
    result = _run_child("v6", tmp_path)
    assert result["version"] == "6"
    assert result["matches_package"] is True
    assert result["roundtrip_identical"] is True
    assert result["state_dtypes"] == ["float32"] * 6


def test_generate_leaves_state_unchanged(engine: RWKVEngine) -> None:
    state = engine.feed(engine.new_state(), _tokens(CHUNK + 7))
    before = _copy(state)
    prompt = engine.summary_prompt("Summarize the stream.")
    sampled = Sampling(temperature=0.9, top_p=0.9, seed=5, repetition_penalty=1.2)
    out = engine.generate(state, prompt, 12, sampled)
    assert _same(state, before)
    assert out == engine.generate(state, prompt, 12, sampled)  # seeded: reproducible
    assert 0 < len(out) <= 12 and all(0 <= t < 256 for t in out)
    greedy = engine.generate(state, prompt, 12, Sampling(repetition_penalty=1.0))
    assert _same(state, before)
    assert len(greedy) == 12
    # greedy's first token is the argmax after pending + prompt
    logits, _ = engine._forward([*state.pending, *prompt], state.tensors)
    assert greedy[0] == int(torch.argmax(logits))
    # stop tokens end generation before they are emitted
    stop = Sampling(repetition_penalty=1.0, stop_token_ids=(greedy[2],))
    assert engine.generate(state, prompt, 12, stop) == greedy[: greedy.index(greedy[2])]


def test_feed_never_mutates_its_input(engine: RWKVEngine) -> None:
    state = engine.feed(engine.new_state(), _tokens(CHUNK + 3))
    before, pending_obj = _copy(state), state.pending
    new = engine.feed(state, _tokens(3 * CHUNK, seed=4))
    assert _same(state, before) and state.pending is pending_obj
    assert not _same(new, state)
    fresh = engine.new_state()
    engine.feed(fresh, _tokens(CHUNK))
    assert _same(fresh, engine.new_state())  # the cached fresh state is never written either


class _InPlaceModel:
    """Wraps the package model so forward writes into the state it was given, as the CUDA
    kernels do (``RWKV_CUDA_ON=1``), and optionally fails afterwards."""

    def __init__(self, real: Any, fail: bool = False) -> None:
        self.real, self.fail, self.calls = real, fail, 0

    def forward(
        self, tokens: list[int], state: list[torch.Tensor], full_output: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        originals = list(state)
        logits, new = self.real.forward(tokens, state, full_output=full_output)
        for t in originals:
            t.add_(1.0)
        self.calls += 1
        if self.fail and self.calls == 2:
            raise RuntimeError("simulated device fault")
        return logits, new


def test_in_place_forward_and_failures_never_reach_committed_states(
    engine: RWKVEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokens = _tokens(3 * CHUNK + 2)
    state = engine.feed(engine.new_state(), _tokens(CHUNK + 1, seed=3))
    before = _copy(state)
    clean = engine._feed_one(state, tokens)  # the package path, which the wrapper forces
    monkeypatch.setattr(engine, "_model", _InPlaceModel(engine._model))
    assert _same(engine.feed(state, tokens), clean)
    engine.generate(state, [1, 2, 3], 4)
    engine.score(state, [4, 5, 6])
    assert _same(state, before)
    monkeypatch.setattr(engine, "_model", _InPlaceModel(engine._model.real, fail=True))
    with pytest.raises(RuntimeError, match="simulated"):
        engine.feed(state, tokens)
    assert _same(state, before)


@pytest.mark.parametrize("seed", [0, 1])
def test_replay_is_bit_identical_whatever_the_batch_split(engine: RWKVEngine, seed: int) -> None:
    tokens = _tokens(5 * CHUNK + 9, seed=seed)
    whole = engine.feed(engine.new_state(), tokens)
    rng = random.Random(seed)
    state, i = engine.new_state(), 0
    while i < len(tokens):
        n = rng.choice([0, 1, 3, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 5])
        state = engine.feed(state, tokens[i : i + n])
        i += n
    assert _same(state, whole)
    assert whole.tokens_seen == len(tokens) and len(whole.pending) == 9


def test_feed_batch_equals_per_stream_feed(engine: RWKVEngine) -> None:
    starts = [
        engine.new_state(),
        engine.feed(engine.new_state(), _tokens(5, seed=2)),
        engine.feed(engine.new_state(), _tokens(2 * CHUNK + 1, seed=3)),
    ]
    news = [_tokens(40, seed=4), [], _tokens(CHUNK - 1, seed=5)]
    batched = engine.feed_batch(starts, news)
    for s, t, b in zip(starts, news, batched, strict=True):
        solo = engine.feed(s, t)
        # batched rows go through workers.engines.rwkv_batched: equal to fp32 rounding
        assert (b.tokens_seen, b.pending) == (solo.tokens_seen, solo.pending)
        for x, y in zip([*b.tensors, b.logits], [*solo.tensors, solo.logits], strict=True):
            assert x is not None and y is not None and x.dtype == y.dtype
            torch.testing.assert_close(x, y, rtol=0, atol=1e-5)
    with pytest.raises(ValueError):
        engine.feed_batch(starts, news[:2])


def test_foreign_or_misshapen_states_are_refused(engine: RWKVEngine, model_dir: Path) -> None:
    other = RWKVEngine(model_dir / "tiny7-b.pth", strategy="cpu fp32", chunk_tokens=CHUNK)
    assert other.fingerprint != engine.fingerprint
    snap = engine.export_state(engine.feed(engine.new_state(), _tokens(CHUNK + 2)))
    with pytest.raises(StateMismatchError, match="belongs to model"):
        other.import_state(snap)

    bad_shape = dict(snap.tensors)
    wkv = from_raw(snap.tensors["state.001"])  # [H, N, N] = [2, 64, 64]
    bad_shape["state.001"] = RawTensor("float32", (1, 64, 64), wkv[:1].numpy().tobytes())
    with pytest.raises(StateMismatchError, match=r"state\.001 has shape \(1, 64, 64\)"):
        engine.import_state(StateSnapshot(bad_shape, snap.scalars))

    missing = {k: v for k, v in snap.tensors.items() if k != "state.005"}
    with pytest.raises(StateMismatchError, match="state.005"):
        engine.import_state(StateSnapshot(missing, snap.scalars))

    bad_logits = dict(snap.tensors)
    bad_logits["logits"] = RawTensor("float32", (255,), bytes(255 * 4))
    with pytest.raises(StateMismatchError, match="logits"):
        engine.import_state(StateSnapshot(bad_logits, snap.scalars))

    with pytest.raises(StateMismatchError, match="chunks of"):
        engine.import_state(StateSnapshot(snap.tensors, {**snap.scalars, "chunk_tokens": 32}))


def test_conflicting_config_in_one_process_fails_clearly(
    engine: RWKVEngine, model_dir: Path
) -> None:
    with pytest.raises(RWKVConfigError, match="already serves RWKV v7 on cpu float32"):
        RWKVEngine(model_dir / "tiny7-a.pth", strategy="cpu bf16")
    v6 = write_tiny_rwkv(model_dir / "tiny6.pth", version=6, seed=1)
    with pytest.raises(RWKVConfigError, match="separate worker process|already serves"):
        RWKVEngine(v6)
    # the refused requests did not disturb the configured engine
    tokens = _tokens(CHUNK)
    assert _same(engine.feed(engine.new_state(), tokens), engine.feed(engine.new_state(), tokens))
    with pytest.raises(ValueError, match="strategy"):
        RWKVEngine(model_dir / "tiny7-a.pth", strategy="cuda fp16 -> cpu fp32")


def test_state_size_is_constant_whatever_the_stream_length(engine: RWKVEngine) -> None:
    short = engine.feed(engine.new_state(), _tokens(CHUNK))
    long = engine.feed(engine.new_state(), _tokens(20 * CHUNK, seed=7))
    n_layer, c, h = 2, 128, 2
    want = n_layer * (2 * c * 4 + h * 64 * 64 * 4) + 256 * 4  # fp32 shifts + wkv + logits
    assert engine.state_nbytes(short) == engine.state_nbytes(long) == want
    assert engine.export_state(short).nbytes == engine.export_state(long).nbytes == want
    # and each stored tensor owns exactly its bytes (no views of [T, C] work buffers)
    for t in long.tensors:
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()


def test_summary_prompt_uses_the_world_chat_format(engine: RWKVEngine) -> None:
    ids = engine.summary_prompt("Summarize\n\n\nbriefly.")
    assert engine.tokenizer.decode(ids) == "\n\nUser: Summarize\nbriefly.\n\nAssistant:"


def test_world_tokenizer_roundtrip() -> None:
    from workers.engines.rwkv import world_tokenizer

    tok = world_tokenizer()
    text = "\n\nUser: résumé the 会议?\n\nAssistant:"
    ids = tok.encode(text)
    assert ids[0] == 261 and tok.decode(ids) == text  # "\n\n" is one token
    cut = tok.encode("会")  # a 3-byte character; decoding a cut-off id list must not raise
    assert tok.decode([*ids[:3], 0]) == tok.decode(ids[:3])
    assert world_tokenizer() is tok and len(cut) >= 1


# ----- child processes (one rwkv configuration each) -------------------------------------


def _child_main(mode: str, directory: Path) -> dict[str, object]:
    if mode == "bf16":
        eng = RWKVEngine(directory / "tiny7-a.pth", strategy="cpu bf16", chunk_tokens=CHUNK)
        state = eng.feed(eng.new_state(), _tokens(2 * CHUNK + 5))
        back = eng.import_state(_snapshot_roundtrip(eng.export_state(state)))
        more = _tokens(2 * CHUNK, seed=1)
        try:
            RWKVEngine(directory / "tiny7-a.pth", strategy="cpu fp32")
            conflict = ""
        except RWKVConfigError as exc:
            conflict = str(exc)
        assert state.logits is not None
        snap32 = eng.export_state(state)
        as32 = {k: to_raw(from_raw(v).float()) for k, v in snap32.tensors.items()}
        cast = eng.import_state(StateSnapshot(as32, snap32.scalars))
        return {
            "cast_dtypes": [str(t.dtype).removeprefix("torch.") for t in cast.tensors],
            "cast_identical": _same(cast, state),
            "roundtrip_identical": _same(back, state),
            "continued_identical": _same(eng.feed(back, more), eng.feed(state, more)),
            "state_dtypes": [str(t.dtype).removeprefix("torch.") for t in back.tensors],
            "logits_dtype": str(state.logits.dtype).removeprefix("torch."),
            "logits": state.logits.float().tolist(),
            "conflict_error": conflict,
        }
    if mode == "v6":
        path = write_tiny_rwkv(directory / "tiny6.pth", version=6, seed=3)
        eng = RWKVEngine(path, strategy="cpu fp32", chunk_tokens=CHUNK)
        tokens = _tokens(2 * CHUNK, seed=2)
        state = eng.feed(eng.new_state(), tokens)
        ref = sys.modules["rwkv.model"].RWKV(str(path), "cpu fp32", verbose=False)
        out, st = ref.forward([0], None)
        for i in range(0, len(tokens), CHUNK):
            out, st = ref.forward(tokens[i : i + CHUNK], st)
        assert state.logits is not None
        matches = torch.equal(state.logits, out) and all(
            torch.equal(a, b) for a, b in zip(state.tensors, st, strict=True)
        )
        back = eng.import_state(_snapshot_roundtrip(eng.export_state(state)))
        return {
            "version": eng.version,
            "matches_package": matches,
            "roundtrip_identical": _same(back, state),
            "state_dtypes": [str(t.dtype).removeprefix("torch.") for t in back.tensors],
        }
    raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    result = _child_main(sys.argv[1], Path(sys.argv[2]))
    print(json.dumps(result))
