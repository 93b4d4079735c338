"""GPU memory of a worker process, read at scrape time (torch.cuda + NVML).

Exported per CUDA device this process uses (``device="cuda:0"``; a bounded label: GPUs per
host), and only once this process has initialised CUDA itself (the model is loaded). The
collector never initialises CUDA (a forking parent must not), never imports torch, and never
raises: a CPU machine, a missing driver or a missing ``nvidia-ml-py`` simply export nothing
(or only the torch part).

* ``sinkstream_gpu_memory_allocated_bytes`` — tensors of this process (torch allocator)
* ``sinkstream_gpu_memory_reserved_bytes`` — held by torch's caching allocator (>= allocated)
* ``sinkstream_gpu_memory_total_bytes`` — the device's memory
* ``sinkstream_gpu_memory_used_bytes`` — used on the device by every process (NVML)
* ``sinkstream_gpu_utilization_ratio`` — busy fraction over the last sample period (NVML)
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuReading:
    device: str
    allocated: float
    reserved: float
    total: float
    used: float | None = None
    utilization: float | None = None


class _Nvml:
    """NVML handles looked up by the device's UUID; disabled for good after a failure."""

    def __init__(self) -> None:
        self._mod: Any = None
        self._failed = False

    def module(self) -> Any:
        if self._mod is None and not self._failed:
            try:
                import pynvml

                pynvml.nvmlInit()
                self._mod = pynvml
            except Exception as exc:  # noqa: BLE001 - no driver, no library: no NVML numbers
                log.debug("gpu metrics: NVML unavailable (%s)", exc)
                self._failed = True
        return self._mod

    def read(self, uuid: str) -> tuple[float | None, float | None]:
        nvml = self.module()
        if nvml is None or not uuid:
            return None, None
        try:
            handle = nvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-")
                                                    else f"GPU-{uuid}")
            used = float(nvml.nvmlDeviceGetMemoryInfo(handle).used)
        except Exception as exc:  # noqa: BLE001
            log.debug("gpu metrics: NVML read failed for %s (%s)", uuid, exc)
            return None, None
        try:
            utilization: float | None = nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0
        except Exception:  # noqa: BLE001 - some (MIG) devices do not report utilisation
            utilization = None
        return used, utilization


def read_gpus(nvml: _Nvml | None = None) -> list[GpuReading]:
    """Readings for the CUDA devices of this process; [] when CUDA is not initialised here."""
    torch: Any = sys.modules.get("torch")  # never import it: an exporter must stay light
    if torch is None:
        return []
    cuda = getattr(torch, "cuda", None)
    if cuda is None or not cuda.is_initialized():
        return []
    readings = []
    for index in range(cuda.device_count()):
        props = cuda.get_device_properties(index)
        used, utilization = (nvml or _NVML).read(str(getattr(props, "uuid", "") or ""))
        readings.append(GpuReading(
            device=f"cuda:{index}",
            allocated=float(cuda.memory_allocated(index)),
            reserved=float(cuda.memory_reserved(index)),
            total=float(props.total_memory),
            used=used,
            utilization=utilization,
        ))
    return readings


_NVML = _Nvml()


class GpuCollector(Collector):
    """Registered on the default registry by ``monitoring.metrics.start_metrics_server``."""

    def __init__(self, nvml: _Nvml | None = None) -> None:
        self._nvml = nvml

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            readings = read_gpus(self._nvml)
        except Exception as exc:  # noqa: BLE001 - a scrape must never fail because of a GPU
            log.debug("gpu metrics: skipped (%s)", exc)
            readings = []
        return iter(families(readings))

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return []  # dynamic: nothing to check at registration


def families(readings: list[GpuReading]) -> list[GaugeMetricFamily]:
    if not readings:
        return []
    allocated = GaugeMetricFamily("sinkstream_gpu_memory_allocated_bytes",
                                  "GPU memory held by this process's tensors",
                                  labels=["device"])
    reserved = GaugeMetricFamily("sinkstream_gpu_memory_reserved_bytes",
                                 "GPU memory reserved by torch's caching allocator",
                                 labels=["device"])
    total = GaugeMetricFamily("sinkstream_gpu_memory_total_bytes", "GPU memory of the device",
                              labels=["device"])
    used = GaugeMetricFamily("sinkstream_gpu_memory_used_bytes",
                             "GPU memory used on the device by all processes (NVML)",
                             labels=["device"])
    util = GaugeMetricFamily("sinkstream_gpu_utilization_ratio",
                             "Fraction of time the GPU was busy (NVML)", labels=["device"])
    for r in readings:
        allocated.add_metric([r.device], r.allocated)
        reserved.add_metric([r.device], r.reserved)
        total.add_metric([r.device], r.total)
        if r.used is not None:
            used.add_metric([r.device], r.used)
        if r.utilization is not None:
            util.add_metric([r.device], r.utilization)
    return [f for f in (allocated, reserved, total, used, util) if f.samples]
