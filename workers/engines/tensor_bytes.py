"""Convert torch tensors to and from the store's framework-free ``RawTensor``.

bfloat16 has no numpy dtype, so bytes move through ``untyped_storage`` views rather than numpy.
"""

from __future__ import annotations

import torch

from state_store.tensors import RawTensor

_TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _TORCH_DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}") from None


def to_raw(tensor: torch.Tensor) -> RawTensor:
    """Copy a tensor (any device) into bytes in C order."""
    t = tensor.detach().to("cpu").contiguous()
    data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return RawTensor(dtype=dtype_name(t.dtype), shape=tuple(t.shape), data=data)


def from_raw(raw: RawTensor, device: str | torch.device = "cpu") -> torch.Tensor:
    """A tensor of ``raw``'s bytes on ``device``: a copy of read-only bytes (what Redis
    returns), while a writable buffer is taken over as it is. Only a tensor made for the
    purpose hands one over: ``segments.join`` wraps each freshly concatenated window tensor
    (a 47 MB SmolLM2 window would otherwise be copied once more per load)."""
    dtype = torch_dtype(raw.dtype)
    if not raw.data:
        return torch.empty(raw.shape, dtype=dtype, device=device)
    data = raw.data
    if isinstance(data, memoryview) and not data.readonly:
        flat = torch.frombuffer(data, dtype=torch.uint8)
    else:
        flat = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return flat.view(dtype).reshape(raw.shape).to(device)
