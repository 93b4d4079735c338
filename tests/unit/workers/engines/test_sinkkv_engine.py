"""The sink-KV engine's API on tiny seeded models (``workers/engines/sinkkv/engine.py``):
``feed_batch`` equals solo feeds, ``feed``, ``generate`` and ``score`` never change their input,
unsupported architectures are refused by name, and the text around a stream, stop tokens,
scores, bf16 compute and out-of-vocabulary ids."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from tests.unit.workers.engines.test_sinkkv import (
    _through_bytes,
    assert_states_equal,
    engine_logits,
    make_engine,
    max_state_diff,
    state_tensors,
    stream,
)
from workers.engines.base import Sampling, UnsupportedModelError
from workers.engines.sinkkv import SinkKVEngine
from workers.engines.tiny import REFUSED_ARCHS, tiny_hf_model
from workers.engines.tokenizers import HFTokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----- feed_batch equals solo feeds ---------------------------------------------------------------


def test_feed_batch_equals_solo_feed() -> None:
    engine = make_engine(sink_tokens=4, recent_tokens=24, chunk_tokens=8)
    new = engine.new_state()
    states = [
        new,  # empty
        engine.feed(new, stream(5, 1)),  # pending only
        engine.feed(new, stream(19, 2)),  # partly filled
        engine.feed(new, stream(70, 3)),  # past eviction
        engine.feed(new, stream(33, 4)),
    ]
    token_lists = [stream(45, 10), stream(3, 11), stream(30, 12), stream(64, 13), []]
    batched = engine.feed_batch(states, token_lists)
    for state, tokens, got in zip(states, token_lists, batched, strict=True):
        solo = engine.feed(state, tokens)
        assert max_state_diff(got, solo) <= 1e-5
    assert batched[3].slots.tolist() != list(range(batched[3].cache_len))  # really shifted


# ----- purity: feed, generate and score never change their input -------------------------------


def test_feed_generate_score_leave_state_unchanged() -> None:
    engine = make_engine(storage_dtype="bfloat16")
    state = engine.feed(engine.new_state(), stream(61))
    before = [t.clone() for t in state_tensors(state)]
    meta = (state.tokens_seen, list(state.pending))

    engine.feed(state, stream(40, 5))
    engine.feed_batch([state, state], [stream(9, 6), stream(17, 7)])
    out = engine.generate(state, [10, 20], 30, Sampling(temperature=0.8, top_p=0.9, seed=3))
    again = engine.generate(state, [10, 20], 30, Sampling(temperature=0.8, top_p=0.9, seed=3))
    greedy = engine.generate(state, [], 40, Sampling(stop_token_ids=(255,)))
    engine.score(state, stream(20, 8))

    assert out == again and len(out) == 30 and 255 not in greedy
    assert (state.tokens_seen, state.pending) == meta
    for x, y in zip(before, state_tensors(state), strict=True):
        assert torch.equal(x, y)


def test_generate_evicts_like_feed() -> None:
    """Greedy generation picks the argmax of the logits a feed of prompt + output would give
    (chunk_tokens=1 so that generation's one-token steps follow the stream's chunk grid)."""
    engine = make_engine(sink_tokens=4, recent_tokens=12, chunk_tokens=1)
    state = engine.feed(engine.new_state(), stream(30))
    prompt = [65, 66, 67]
    out = engine.generate(state, prompt, 20, Sampling(repetition_penalty=1.0))
    assert len(out) == 20
    logits = engine.logits(state, prompt + out)[len(prompt) - 1 : -1]  # [20, V]
    assert logits.argmax(dim=-1).tolist() == out


# ----- refusals: architectures the engine does not serve ---------------------------------------


#: the missing piece each refused tiny arch's message must name
_REFUSAL_REASONS = {
    "dynamic-rope": "rope type 'dynamic'",
    "longrope": "rope type 'longrope'",
}


@pytest.mark.parametrize("arch", REFUSED_ARCHS)
def test_unsupported_architectures_are_refused(arch: str) -> None:
    with pytest.raises(UnsupportedModelError) as err:
        make_engine(arch)
    message = str(err.value)
    assert _REFUSAL_REASONS[arch] in message
    assert "supported: decoder-only causal LMs of type llama, mistral, qwen2, qwen3, " in message
    assert "default, linear, llama3, yarn" in message


# ----- text helpers, tokenizers, stops ---------------------------------------------------------


def _chat_tokenizer() -> Any:
    """A byte-level transformers tokenizer with BOS post-processing and a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    bos = ("<s>", hf.convert_tokens_to_ids("<s>"))
    hf._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[bos]
    )
    hf.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return hf


def test_transcript_is_the_user_turn_that_the_summary_prompt_closes() -> None:
    plain = make_engine()
    intro = b"Here is a live transcript. You will be asked about it.\n\n"
    assert plain.stream_prefix() == list(intro)
    assert plain.summary_prompt("Summarize.") == list(b"\n\nInstruction: Summarize.\nAnswer:")

    hf = _chat_tokenizer()
    model = tiny_hf_model("llama", 0, vocab_size=len(hf))
    engine = SinkKVEngine(model, hf, model_name="chat", recent_tokens=24, chunk_tokens=8)
    assert isinstance(engine.tokenizer, HFTokenizer)  # wrapped automatically
    assert engine.tokenizer.encode("hi") == hf.encode("hi", add_special_tokens=False)
    assert hf.encode("hi")[0] == hf.bos_token_id  # the raw tokenizer would add a BOS
    assert hf.eos_token_id in engine.eos_token_ids
    prefix = engine.stream_prefix()
    assert engine.tokenizer.decode(prefix).endswith(
        "user\nHere is a live transcript. You will be asked about it.\n\n")
    assert hf.convert_tokens_to_ids("<|im_start|>") in prefix
    ids = engine.summary_prompt("Summarize.")
    text = "\n---\nSummarize.<|im_end|>\n<|im_start|>assistant\n"
    assert ids == hf.encode(text, add_special_tokens=False)
    assert engine.tokenizer.decode([*ids, hf.eos_token_id]) == "\n---\nSummarize.\nassistant\n"
    transcript = engine.tokenizer.encode("Alice: ship it friday.")
    state = engine.feed(engine.new_state(), [*prefix, *transcript])
    assert all(0 <= t < len(hf) for t in engine.generate(state, ids, 5))


def test_generation_stops_at_stop_tokens() -> None:
    engine = make_engine()
    state = engine.feed(engine.new_state(), stream(50))
    free = engine.generate(state, [1, 2], 12, Sampling(repetition_penalty=1.0))
    stop = free[5]
    cut = free.index(stop)
    assert (
        engine.generate(state, [1, 2], 12, Sampling(repetition_penalty=1.0, stop_token_ids=(stop,)))
        == free[:cut]
    )


def test_score_is_log_softmax_of_logits() -> None:
    engine = make_engine()
    fresh = engine.score(engine.new_state(), [5, 6, 7])
    assert math.isnan(fresh[0])  # nothing to condition the first token of a stream on
    tokens = stream(41)
    before = engine.feed(engine.new_state(), tokens[:40])
    state = engine.feed(before, tokens[40:])  # one token pending
    got = engine.score(state, [9, 10])
    after_pending = torch.log_softmax(engine.logits(before, tokens[40:])[0], dim=-1)
    after_9 = torch.log_softmax(engine.logits(state, [9])[0], dim=-1)
    assert got == pytest.approx([after_pending[9].item(), after_9[10].item()], abs=1e-6)
    # with nothing pending, the first token is predicted from the state's last hidden state
    state39 = engine.feed(engine.new_state(), tokens[:39])  # 7 pending
    after_39 = torch.log_softmax(engine.logits(state39, tokens[39:40])[0], dim=-1)
    assert engine.score(before, tokens[40:41]) == pytest.approx(
        [after_39[tokens[40]].item()], abs=1e-5
    )


def test_bf16_compute_stays_close_to_fp32() -> None:
    tokens = stream(80, seed=3)
    fp32 = make_engine(recent_tokens=20, chunk_tokens=4)
    bf16 = make_engine(recent_tokens=20, chunk_tokens=4, compute_dtype="bfloat16")
    want, _ = engine_logits(fp32, tokens)
    got, state = engine_logits(bf16, tokens)
    assert state.keys[0].dtype == torch.bfloat16 and state.cache_len == 24
    assert (got - want).abs().max().item() < 0.2  # bf16 arithmetic, not a position error
    restored = bf16.import_state(_through_bytes(bf16, bf16.export_state(state)))
    assert_states_equal(bf16.feed(restored, tokens[:9]), bf16.feed(state, tokens[:9]))


def test_token_ids_outside_the_vocabulary_are_refused_by_value() -> None:
    engine = make_engine()
    for bad in (256, -1):
        with pytest.raises(ValueError, match=f"token id {bad} outside the model's vocabulary"):
            engine.feed(engine.new_state(), [1, 2, bad, 3])
    assert engine.feed(engine.new_state(), [0, 255]).tokens_seen == 2
