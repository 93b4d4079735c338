"""Model weights in the process's own memory, not in a lazily paged file mapping.

transformers 5 loads safetensors weights whose dtype needs no cast as views of a memory-mapped
file: right after loading, most of their pages are not resident, and the first forwards page
them in. A worker takes its memory budget's baseline when it is ready (model loaded), so those
pages then counted as "memory outside the hot cache" growth: with the 1.5B preset in fp32,
6.8 GB of it, and the hot cache was switched off for the life of the worker. Clean file pages
can also be dropped by the kernel under pressure and read back mid-batch. Copying each tensor
once into anonymous memory at load makes the weights resident before anyone measures, and keeps
them so.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["make_resident"]


def make_resident(model: torch.nn.Module) -> int:
    """Give every parameter and buffer of ``model`` storage of its own (a copy out of any file
    mapping), one tensor at a time so the transient cost is one tensor. Returns the bytes
    copied. Tied weights stay tied: a shared ``Parameter`` is one object, copied once."""
    import torch

    copied = 0
    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            if tensor.device.type != "cpu":
                continue  # device memory is not a file mapping
            tensor.data = tensor.data.clone()
            copied += tensor.numel() * tensor.element_size()
    return copied
