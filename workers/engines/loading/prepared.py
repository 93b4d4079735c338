"""What preparing a model produced: where its files are, and what that did and cost."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["PreparedModel"]


@dataclass
class PreparedModel:
    """Where a model's files are, and what preparing it did and cost.

    ``action``: "converted" (GGUF converted now), "cached" (conversion found in the cache),
    "in-place" (a local directory or checkpoint, used where it is), "written" (tiny-rwkv
    checkpoint in the cache), "fetched" (hub id, now in the Hugging Face cache), "seeded"
    (tiny HF models: built from their seed at every load, nothing stored).
    """

    directory: Path
    converted: bool
    seconds: float
    source: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)
    action: str = ""

    def __post_init__(self) -> None:
        if not self.action:
            self.action = "converted" if self.converted else "cached"
