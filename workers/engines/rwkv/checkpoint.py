"""What an RWKV-LM ``.pth`` checkpoint is: generation, dimensions, and a fingerprint.

Read without the ``rwkv`` package (which detects RWKV-7 only by environment variable), so the
engine knows which package mode to claim before it imports anything. ``torch.load`` runs with
``weights_only=True`` and ``mmap=True``: a model file is still untrusted input, and large.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from workers.engines.base import UnsupportedModelError
from workers.engines.tensor_bytes import dtype_name

__all__ = ["CheckpointInfo", "detect_version", "inspect_checkpoint"]


@dataclass(frozen=True)
class CheckpointInfo:
    version: str  # "7", "6", "5.2", "5.1", "5", "4" (the package's detection)
    n_layer: int
    n_embd: int
    vocab_size: int
    n_head: int
    head_size: int
    fingerprint: str


def detect_version(sd: dict[str, torch.Tensor]) -> float:
    """The package's own generation detection, plus RWKV-7 (which it only knows by env var)."""
    if any(k.endswith("att.r_k") or k.endswith("att.x_r") for k in sd):
        return 7.0
    version = 4.0
    for k, v in sd.items():
        if "ln_x" in k:
            version = max(5.0, version)
        if "gate.weight" in k:
            version = max(5.1, version)
        if int(version) == 5 and "att.time_decay" in k and v.dim() > 1 and v.shape[1] > 1:
            version = max(5.2, version)
        if "time_maa" in k:
            version = max(6.0, version)
    return version


def inspect_checkpoint(path: Path) -> CheckpointInfo:
    """Read shapes and hash the weights. ``weights_only``: a model file is still untrusted."""
    try:
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:  # torch raises many types for bad files
        raise UnsupportedModelError(
            f"cannot read RWKV checkpoint {path}: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(sd, dict) or "emb.weight" not in sd or "head.weight" not in sd:
        raise UnsupportedModelError(f"{path} is not an RWKV checkpoint (no emb/head weights)")
    if "_strategy" in sd:
        raise UnsupportedModelError(
            f"{path} is pre-converted for strategy {sd['_strategy']!r}; give the raw checkpoint"
        )
    version = detect_version(sd)
    vocab_size, n_embd = sd["emb.weight"].shape
    n_layer = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    if version == 7.0:
        n_head, head_size = sd["blocks.0.att.r_k"].shape
    elif version >= 5.0:  # the package takes H from time_faaaa (v6) or time_decay (v5)
        key = "blocks.0.att.time_faaaa" if version >= 6.0 else "blocks.0.att.time_decay"
        n_head = sd[key].shape[0]
        head_size = sd["blocks.0.att.key.weight"].shape[0] // n_head
    else:
        n_head, head_size = 1, sd["blocks.0.att.key.weight"].shape[0]
    vstr = "7" if version == 7.0 else f"{version:g}"

    h = hashlib.sha256()
    header = f"rwkv-fingerprint-v1|version={vstr}|n_layer={n_layer}|n_embd={n_embd}|"
    header += f"vocab={vocab_size}|n_head={n_head}|head_size={head_size}"
    h.update(header.encode())
    for key in sorted(sd):
        t = sd[key]
        if not isinstance(t, torch.Tensor):
            raise UnsupportedModelError(f"{path}: entry {key!r} is not a tensor")
        t = t.detach().contiguous()
        h.update(f"|{key}|{dtype_name(t.dtype)}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return CheckpointInfo(
        vstr, n_layer, int(n_embd), int(vocab_size), int(n_head), int(head_size), h.hexdigest()
    )
