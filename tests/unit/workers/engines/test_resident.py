"""Loaded weights are resident in the worker's own memory, so the memory budget's ready
baseline (taken after the model is loaded) already holds them (issue 18: a 1.5B model's weights,
paged in from a file mapping by the first forwards, counted as 6.8 GB of growth and switched
the hot cache off)."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch

from workers.engines.loading import load_hf_model
from workers.memory_budget import RssBudget
from workers.processing.hot_cache import HotStateCache

MiB = 1 << 20

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.skipif(platform.system() != "Linux", reason="reads /proc/self/maps"),
]


def _saved_model(directory: Path) -> int:
    """A small Llama saved as safetensors (the layout a converted GGUF cache has); returns its
    weight bytes (~16 MiB: enough to see in RSS, quick to write)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=1024,
                         num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(directory)
    vocab = {c: i for i, c in enumerate(bytes_to_unicode()[b] for b in range(256))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(directory)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _file_mappings(suffix: str) -> list[tuple[int, int]]:
    spans = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5].endswith(suffix):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            spans.append((start, end))
    return spans


def _warm_up_torch() -> None:
    """One forward of another model first: torch's kernels and allocator pools then count in
    the baseline, as they do in a worker that has run a batch, and the growth this test sees
    is the weights' alone."""
    from workers.engines.tiny import tiny_hf_model

    with torch.no_grad():
        tiny_hf_model("llama", seed=1)(torch.tensor([[1, 2, 3]]))


def test_loaded_weights_live_in_no_file_mapping(tmp_path: Path) -> None:
    _saved_model(tmp_path / "saved")
    model, _ = load_hf_model(str(tmp_path / "saved"), tmp_path / "cache")
    mapped = _file_mappings(".safetensors")
    for name, param in model.named_parameters():
        ptr = param.data_ptr()
        assert not any(start <= ptr < end for start, end in mapped), name


def test_the_ready_baseline_already_holds_the_weights(tmp_path: Path) -> None:
    weight_bytes = _saved_model(tmp_path / "saved")
    _warm_up_torch()
    model, _ = load_hf_model(str(tmp_path / "saved"), tmp_path / "cache")
    cache: HotStateCache[object] = HotStateCache(budget_bytes=weight_bytes)
    budget = RssBudget(cache, cache.budget_bytes)
    budget.start()  # the worker is ready: model loaded
    with torch.no_grad():
        for param in model.parameters():  # what the first forwards read
            param.float().sum()
        model(torch.tensor([[1, 2, 3]]))
    budget.check()
    assert budget.growth < weight_bytes // 4, (budget.growth / MiB, weight_bytes / MiB)
    assert cache.limit_bytes > cache.budget_bytes * 3 // 4  # the hot cache keeps its room


def test_the_model_fingerprint_hashes_the_weights_in_place() -> None:
    """The fingerprint is taken at a worker's first state commit, after the ready baseline: a
    copy of each parameter for hashing raised that batch's peak RSS by the largest one (the
    1.5B preset's 890 MiB embeddings), which the budget counted as growth outside the cache."""
    from workers.engines.sinkkv.support import model_fingerprint
    from workers.engines.tiny import tiny_hf_model
    from workers.memory_budget import peak_rss_since_reset, reset_peak_rss

    model = tiny_hf_model("llama", seed=0, vocab_size=65536, hidden_size=256)
    embedding = model.get_input_embeddings().weight
    largest = embedding.numel() * embedding.element_size()  # 64 MiB
    model_fingerprint(model)  # hashlib, numpy and friends warmed up
    if not reset_peak_rss():
        pytest.skip("/proc/self/clear_refs is not writable here")
    before = peak_rss_since_reset()
    model_fingerprint(model)
    peak = peak_rss_since_reset()
    assert before is not None and peak is not None
    assert peak - before < largest // 4, ((peak - before) / MiB, largest / MiB)
