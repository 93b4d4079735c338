"""Redis replies as Python text and bytes, one way everywhere.

redis-py types replies as ``bytes | str``: bytes from a client made with
``decode_responses=False`` (the workers' and the state store's, which move raw tensor bytes),
str from one made with ``decode_responses=True`` (what a library user may hand the producer).
Code that accepts either converts here rather than with its own private helper.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def as_text(value: bytes | str | None, errors: str = "strict") -> str:
    """A reply as text (UTF-8); ``""`` for a missing one (``None``)."""
    if value is None:
        return ""
    return value.decode(errors=errors) if isinstance(value, bytes) else str(value)


def as_bytes(value: bytes | str | memoryview) -> bytes:
    """A reply as bytes (a str reply is encoded as UTF-8)."""
    return value.encode() if isinstance(value, str) else bytes(value)


def text_fields(fields: Mapping[Any, Any], errors: str = "strict") -> dict[str, str]:
    """A hash or stream entry's fields as ``{str: str}``."""
    return {as_text(k, errors): as_text(v, errors) for k, v in fields.items()}


def raised(replies: list[Any]) -> list[Any]:
    """``replies`` of a pipeline run with ``raise_on_error=False``, raising the first error."""
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies
