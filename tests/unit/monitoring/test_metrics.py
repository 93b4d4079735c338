"""Worker metrics: naming conventions, bounded labels, pre-created series, process and GPU."""

from __future__ import annotations

import re
import sys
import types
import urllib.request
from typing import Any

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from monitoring import gpu, metrics
from sinkstream.cli.localredis import free_port
from sinkstream.contracts.entries import Rejected, parse_entry
from state_store.codec import ForeignStateError, StateError, decode_state

UNIT_SUFFIXES = ("_seconds", "_bytes", "_ratio", "_entries", "_streams")


def _families(registry: Any = REGISTRY) -> dict[str, Any]:
    text = generate_latest(registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_worker_metric_names_follow_prometheus_conventions() -> None:
    metrics.init_worker("sinkkv", "tiny-model", "cpu", "float32")
    families = {n: f for n, f in _families().items() if n.startswith("sinkstream_")}
    assert len(families) >= 20
    for name, family in families.items():
        assert re.fullmatch(r"sinkstream_[a-z0-9_]+", name), name
        assert family.documentation, f"{name} has no help text"
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples), name
        if family.type == "histogram":
            assert name.endswith(("_seconds", "_bytes")), f"histogram {name} needs a unit"
        for sample in family.samples:
            # never a per-stream label on a worker: series must not grow with streams
            assert not {"stream", "stream_id", "id"} & set(sample.labels), (name, sample.labels)


def test_required_worker_metrics_exist() -> None:
    metrics.init_worker("sinkkv", "tiny-model")
    names = set(_families())
    for required in (
        "sinkstream_tokens_fed", "sinkstream_summary_tokens", "sinkstream_batch_feed_seconds",
        "sinkstream_summary_seconds", "sinkstream_state_load_seconds",
        "sinkstream_state_save_seconds", "sinkstream_state_load_bytes",
        "sinkstream_state_save_bytes", "sinkstream_state_size_bytes",
        "sinkstream_hot_cache_hits", "sinkstream_hot_cache_misses",
        "sinkstream_leases_taken_over", "sinkstream_stale_commits_refused",
        "sinkstream_dead_letters", "sinkstream_stream_failures",
        "sinkstream_worker_streams_active", "sinkstream_worker_info",
    ):
        assert required in names, required


def test_series_exist_at_zero_before_anything_happens() -> None:
    """rate() needs the series before its first increase; alerts and panels need it too."""
    metrics.init_worker("rwkv", "fresh-model", "cuda", "bfloat16")
    text = generate_latest(REGISTRY).decode()
    assert 'sinkstream_tokens_fed_total{engine="rwkv",model="fresh-model"} 0.0' in text
    assert ('sinkstream_summary_seconds_count{engine="rwkv",kind="final",model="fresh-model"} '
            '0.0') in text
    for reason in metrics.STALE_REASONS:
        assert f'sinkstream_stale_commits_refused_total{{reason="{reason}"}}' in text
    for reason in metrics.DEAD_LETTER_REASONS:
        assert f'sinkstream_dead_letters_total{{reason="{reason}"}}' in text
    for reason in metrics.FAILURE_REASONS:
        assert f'sinkstream_stream_failures_total{{reason="{reason}"}}' in text
    assert re.search(r'sinkstream_worker_info\{[^}]*device="cuda"[^}]*model="fresh-model"', text)


def _rejection(fields: dict[str, Any], limit: int | None = None) -> str:
    parsed = parse_entry("1-0", fields, max_text_bytes=limit)
    assert isinstance(parsed, Rejected)
    return parsed.reason


def _state_error(data: bytes, stream_id: str) -> str:
    with pytest.raises(StateError) as info:
        decode_state(data, stream_id=stream_id)
    return str(info.value)


@pytest.mark.parametrize(("make", "label"), [
    (lambda: _rejection({"speaker": "B"}), "missing_text"),
    (lambda: _rejection({"text": b"\xff\xfe"}), "invalid_utf8"),
    (lambda: _rejection({"text": "x" * 100}, limit=64), "too_large"),
    (lambda: _rejection({"text": ""}), "empty_text"),
    (lambda: _rejection({"text": "a", "ts": "soon"}), "invalid_ts"),
    (lambda: _rejection({"text": "a", "eos": "maybe"}), "invalid_eos"),
    (lambda: _state_error(b"SNKSTATE but not really a state", "call-42"), "corrupt_state"),
    (lambda: _state_error(b"something else entirely, long enough for a header", "x"),
     "unsupported_format"),
    (lambda: str(ForeignStateError("state belongs to another engine, model or parameter set: "
                                   "fingerprint", stream_id="s-1")), "foreign_state"),
    (lambda: "stream 'q': state changed 8 times while being read", "state_unreadable"),
    (lambda: "something nobody anticipated 12345", "other"),
])
def test_reasons_map_to_a_fixed_vocabulary(make: Any, label: str) -> None:
    reason = make()
    assert metrics.reason_label(reason) == label, reason


def test_reason_labels_never_carry_stream_ids() -> None:
    labels = {metrics.reason_label(f"stream 'customer-{i}': state truncated: {i} bytes")
              for i in range(200)}
    assert labels == {"corrupt_state"}
    vocabulary = set(metrics.DEAD_LETTER_REASONS) | set(metrics.FAILURE_REASONS)
    for text in ("", "stream 'x':", "(((", "field 'speaker' is not valid UTF-8 (byte 9)"):
        assert metrics.reason_label(text) in vocabulary


def test_active_streams_gauge_counts_a_sliding_window() -> None:
    active = metrics._ActiveStreams(window_s=60)
    active.note("a", now=0.0)
    active.note("b", now=10.0)
    active.note("a", now=50.0)
    assert active.count(now=55.0) == 2
    assert active.count(now=75.0) == 1  # b last seen at 10 s
    assert active.count(now=200.0) == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process collector is Linux")
def test_process_resident_memory_is_exported_by_default() -> None:
    families = _families()
    assert families["process_resident_memory_bytes"].samples[0].value > 10e6


def test_metrics_server_serves_worker_and_process_metrics() -> None:
    port = free_port()
    assert metrics.start_metrics_server("127.0.0.1", port)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        body = resp.read().decode()
    assert "sinkstream_tokens_fed_total" in body
    assert "process_resident_memory_bytes" in body
    assert "sinkstream_gpu_" not in body  # CPU test machine: no CUDA initialised here
    assert not metrics.start_metrics_server("127.0.0.1", port)  # taken: logged, not raised
    assert not metrics.start_metrics_server("127.0.0.1", 0)  # 0 disables


# ----- GPU ------------------------------------------------------------------------------------
def test_gpu_collector_exports_nothing_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    assert list(gpu.GpuCollector().collect()) == [] or _cuda_initialised()
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    assert list(gpu.GpuCollector().collect()) == []


def _cuda_initialised() -> bool:
    torch: Any = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())


class _FakeCuda:
    def __init__(self, initialised: bool = True) -> None:
        self.initialised = initialised

    def is_initialized(self) -> bool:
        return self.initialised

    def device_count(self) -> int:
        return 2

    def memory_allocated(self, i: int) -> int:
        return (i + 1) * 1_000_000

    def memory_reserved(self, i: int) -> int:
        return (i + 1) * 2_000_000

    def get_device_properties(self, i: int) -> Any:
        return types.SimpleNamespace(total_memory=80_000_000_000, uuid=f"uuid-{i}")


class _FakeNvml:
    def __init__(self) -> None:
        self.asked: list[str] = []

    def nvmlInit(self) -> None:  # noqa: N802 - NVML's names
        pass

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> str:  # noqa: N802
        self.asked.append(uuid)
        if uuid.endswith("-1"):
            raise RuntimeError("NVML_ERROR_NOT_FOUND")
        return uuid

    def nvmlDeviceGetMemoryInfo(self, handle: str) -> Any:  # noqa: N802
        return types.SimpleNamespace(used=70_000_000_000)

    def nvmlDeviceGetUtilizationRates(self, handle: str) -> Any:  # noqa: N802
        return types.SimpleNamespace(gpu=42)


def test_gpu_collector_reads_torch_and_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=_FakeCuda()))
    fake = _FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    registry = CollectorRegistry()
    registry.register(gpu.GpuCollector(nvml=gpu._Nvml()))
    families = _families(registry)
    values = {(f.name, s.labels["device"]): s.value
              for f in families.values() for s in f.samples}
    assert values[("sinkstream_gpu_memory_allocated_bytes", "cuda:1")] == 2_000_000
    assert values[("sinkstream_gpu_memory_reserved_bytes", "cuda:0")] == 2_000_000
    assert values[("sinkstream_gpu_memory_total_bytes", "cuda:1")] == 80e9
    assert values[("sinkstream_gpu_memory_used_bytes", "cuda:0")] == 70e9
    assert values[("sinkstream_gpu_utilization_ratio", "cuda:0")] == 0.42
    # NVML could not find device 1: torch numbers only, no failure
    assert ("sinkstream_gpu_memory_used_bytes", "cuda:1") not in values
    assert fake.asked == ["GPU-uuid-0", "GPU-uuid-1"]


def test_gpu_collector_never_initialises_cuda_or_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch",
                        types.SimpleNamespace(cuda=_FakeCuda(initialised=False)))
    assert list(gpu.GpuCollector().collect()) == []

    class Broken(_FakeCuda):
        def device_count(self) -> int:
            raise RuntimeError("driver went away")

    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=Broken()))
    assert list(gpu.GpuCollector().collect()) == []


def test_nvml_missing_library_gives_torch_numbers_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=_FakeCuda()))
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    readings = gpu.read_gpus(gpu._Nvml())
    assert [r.device for r in readings] == ["cuda:0", "cuda:1"]
    assert all(r.used is None for r in readings)
    names = [f.name for f in gpu.families(readings)]
    assert names == ["sinkstream_gpu_memory_allocated_bytes",
                     "sinkstream_gpu_memory_reserved_bytes", "sinkstream_gpu_memory_total_bytes"]
