"""Tensors to and from the store's RawTensor: bytes round-trip exactly; read-only bytes are
copied, a fresh tensor's writable buffer is taken over without a copy."""

from __future__ import annotations

import torch

from state_store.tensors import RawTensor
from workers.engines.tensor_bytes import from_raw, to_raw


def test_a_round_trip_keeps_every_bit_in_every_dtype() -> None:
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.int64):
        t = (torch.randn(3, 5, 7) * 100).to(dtype)
        back = from_raw(to_raw(t))
        assert back.dtype == dtype and back.shape == t.shape
        assert torch.equal(back.view(torch.uint8), t.view(torch.uint8))


def test_read_only_bytes_are_copied_into_a_writable_tensor() -> None:
    raw = to_raw(torch.arange(6, dtype=torch.float32))
    assert isinstance(raw.data, bytes)
    t = from_raw(raw)
    t += 1  # its own memory: the bytes stay as they were
    assert torch.equal(from_raw(raw), torch.arange(6, dtype=torch.float32))


def test_a_writable_buffer_is_taken_over_without_a_copy() -> None:
    fresh = torch.arange(6, dtype=torch.float32)
    raw = RawTensor("float32", (2, 3), fresh.view(torch.uint8).numpy().data)  # type: ignore[arg-type]
    t = from_raw(raw)
    assert t.data_ptr() == fresh.data_ptr()
    assert torch.equal(t, fresh.reshape(2, 3))
