"""Local loads through transformers, with the hub out of reach."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

__all__ = ["hub_offline"]


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Forbid hub access for local loads (belt and braces next to local_files_only).

    Also silences transformers' per-load progress bars, which only clutter worker logs.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved = {k: os.environ.get(k) for k in keys}
    for key in keys:
        os.environ[key] = "1"
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
