"""One torch thread in the test process, computing like the test workers (``OMP_NUM_THREADS=1``).

A reference fed in this process is compared bit for bit with what worker subprocesses
committed, so it must run on as many threads as they do: on some CPUs (the AVX-512 Xeons seen
here) the RWKV kernels round differently with two threads than with one. Tiny models gain
nothing from intra-op threads anyway.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run the block on one torch thread; the previous count is restored after it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
