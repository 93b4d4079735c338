"""Framework-free tensors: what an engine state looks like to the state store.

The store never imports torch (producers and small tools install it without a GPU stack), so
engines hand it states as named ``RawTensor``s: a dtype name, a shape and the raw bytes in
C order. ``workers.engines.tensor_bytes`` converts to and from torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: dtype name -> bytes per element. Names are torch's without the ``torch.`` prefix.
DTYPE_SIZES: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float64": 8,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}


@dataclass(frozen=True)
class RawTensor:
    dtype: str
    shape: tuple[int, ...]
    data: bytes

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_SIZES:
            raise ValueError(f"unsupported dtype {self.dtype!r}")
        if any(d < 0 for d in self.shape):
            raise ValueError(f"negative dimension in shape {self.shape}")
        if len(self.data) != self.expected_nbytes(self.dtype, self.shape):
            raise ValueError(
                f"{len(self.data)} bytes do not match dtype {self.dtype} and shape {self.shape}"
            )

    @staticmethod
    def expected_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
        return DTYPE_SIZES[dtype] * math.prod(shape)

    @property
    def nbytes(self) -> int:
        return len(self.data)


@dataclass(frozen=True)
class StateSnapshot:
    """An engine state in storable form.

    ``tensors`` hold the bulk; ``scalars`` hold small JSON/msgpack-friendly values the engine
    needs back (token counts, tokens held back until a chunk boundary, slot positions...).
    """

    tensors: dict[str, RawTensor]
    scalars: dict[str, object]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())
