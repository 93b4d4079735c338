"""Tiny seeded random RWKV checkpoints with the real key layout, for tests and benchmarks.

No model hub is reachable from our machines, yet the RWKV engine must be exercised through the
real ``rwkv`` package loader (key names, transposes, squeezes, version detection). So we write
``.pth`` files that look exactly like RWKV-LM training output, only small and random:

* RWKV-7 ("x070", loaded by ``rwkv.model.RWKV_x070`` when ``RWKV_V7_ON=1``);
* RWKV-6 ("x060", loaded by the legacy ``rwkv.model.RWKV`` class, which detects v6 from the
  ``time_maa`` keys).

Weights are scaled so activations stay O(1) and logits spread over a few units: the model's
next-token distributions are non-degenerate (neither one-hot nor uniform), which the engine
tests need to tell a right answer from a wrong one. Generation is deterministic given the seed
(a private ``torch.Generator``; the global RNG is untouched).

Files are ``torch.save`` of a plain ``dict[str, Tensor]`` (what the package ``torch.load``s).
These are model files we write ourselves; nothing here reads data from Redis.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

__all__ = ["tiny_rwkv7_state_dict", "tiny_rwkv6_state_dict", "write_tiny_rwkv"]


def _pth_path(path: str | Path) -> Path:
    """The package appends ``.pth`` to whatever name it is given: keep the suffix explicit."""
    p = Path(path)
    return p if p.suffix == ".pth" else p.with_name(p.name + ".pth")


class _Init:
    """Seeded initialisers; every tensor is drawn in fp32 and cast at the end."""

    def __init__(self, seed: int) -> None:
        self.g = torch.Generator().manual_seed(seed)

    def normal(self, *shape: int, std: float, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(shape, generator=self.g) * std + mean

    def uniform(self, *shape: int, lo: float, hi: float) -> torch.Tensor:
        return torch.rand(shape, generator=self.g) * (hi - lo) + lo


def _check_dims(n_embd: int, head_size: int, vocab_size: int, n_layer: int) -> None:
    if n_embd % head_size:
        raise ValueError(f"n_embd {n_embd} is not a multiple of head_size {head_size}")
    if n_layer < 1 or vocab_size < 2:
        raise ValueError("need n_layer >= 1 and vocab_size >= 2")


def tiny_rwkv7_state_dict(
    *,
    seed: int = 0,
    n_embd: int = 128,
    n_layer: int = 2,
    vocab_size: int = 256,
    head_size: int = 64,
    lora: int = 32,
    dtype: torch.dtype = torch.bfloat16,
) -> dict[str, torch.Tensor]:
    """A random RWKV-7 state dict in RWKV-LM's layout (``RWKV_Tmix_x070`` / ``RWKV_CMix_x070``).

    Shapes as trained checkpoints store them (Linear weights ``[out, in]``, vectors
    ``[1, 1, C]``); the package transposes/squeezes on load. Layer 0 has no ``v0/v1/v2``
    (RWKV-LM skips the value-residual LoRA there; the loader substitutes empty tensors).
    The head size must be 64 for the package's CUDA kernel; the CPU path takes any size.
    """
    _check_dims(n_embd, head_size, vocab_size, n_layer)
    C, H, N, V = n_embd, n_embd // head_size, head_size, vocab_size
    rnd = _Init(seed)
    s = 1.0 / math.sqrt(C)
    sd: dict[str, torch.Tensor] = {
        "emb.weight": rnd.normal(V, C, std=1.0),  # [V, C]; layer-normed by ln0 on load
        "blocks.0.ln0.weight": rnd.normal(C, std=0.1, mean=1.0),
        "blocks.0.ln0.bias": rnd.normal(C, std=0.1),
    }
    for i in range(n_layer):
        b, att, ffn = f"blocks.{i}.", f"blocks.{i}.att.", f"blocks.{i}.ffn."
        for ln in ("ln1", "ln2"):
            sd[f"{b}{ln}.weight"] = rnd.normal(C, std=0.1, mean=1.0)
            sd[f"{b}{ln}.bias"] = rnd.normal(C, std=0.1)
        # token-shift mix coefficients in [0, 1]: [1, 1, C]
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
            sd[att + name] = rnd.uniform(1, 1, C, lo=0.0, hi=1.0)
        # decay: w0 as RWKV-LM initialises it (-7..-2 + 0.5), plus a small LoRA
        ratio = i / max(n_layer - 1, 1)
        speed = torch.tensor([-7 + 5 * (n / (C - 1)) ** (0.85 + ratio**0.5) for n in range(C)])
        sd[att + "w0"] = (speed + 0.5).reshape(1, 1, C)
        sd[att + "w1"] = rnd.normal(C, lora, std=0.1)  # [C, D]
        sd[att + "w2"] = rnd.normal(lora, C, std=0.1)  # [D, C]
        sd[att + "a0"] = rnd.normal(1, 1, C, std=0.5)
        sd[att + "a1"] = rnd.normal(C, lora, std=0.1)
        sd[att + "a2"] = rnd.normal(lora, C, std=0.1)
        if i > 0:
            sd[att + "v0"] = rnd.normal(1, 1, C, std=0.1, mean=1.0)
            sd[att + "v1"] = rnd.normal(C, lora, std=0.1)
            sd[att + "v2"] = rnd.normal(lora, C, std=0.1)
        sd[att + "g1"] = rnd.normal(C, lora, std=0.1)
        sd[att + "g2"] = rnd.normal(lora, C, std=0.5)
        sd[att + "k_k"] = rnd.normal(1, 1, C, std=0.05, mean=0.85)
        sd[att + "k_a"] = rnd.normal(1, 1, C, std=0.05, mean=1.0)
        sd[att + "r_k"] = rnd.normal(H, N, std=0.1)  # [H, N]
        sd[att + "receptance.weight"] = rnd.normal(C, C, std=s)  # [out, in]
        sd[att + "key.weight"] = rnd.normal(C, C, std=s)
        sd[att + "value.weight"] = rnd.normal(C, C, std=s)
        sd[att + "output.weight"] = rnd.normal(C, C, std=s)
        sd[att + "ln_x.weight"] = rnd.normal(C, std=0.1, mean=1.0)  # GroupNorm(H, C)
        sd[att + "ln_x.bias"] = rnd.normal(C, std=0.1)
        sd[ffn + "x_k"] = rnd.uniform(1, 1, C, lo=0.0, hi=1.0)
        sd[ffn + "key.weight"] = rnd.normal(4 * C, C, std=s)  # [4C, C]
        sd[ffn + "value.weight"] = rnd.normal(C, 4 * C, std=0.5 / math.sqrt(4 * C))  # [C, 4C]
    sd["ln_out.weight"] = rnd.normal(C, std=0.1, mean=1.0)
    sd["ln_out.bias"] = rnd.normal(C, std=0.1)
    sd["head.weight"] = rnd.normal(V, C, std=2.0 * s)  # [V, C]: logits std ~2
    return {k: v.to(dtype).contiguous() for k, v in sd.items()}


def tiny_rwkv6_state_dict(
    *,
    seed: int = 0,
    n_embd: int = 128,
    n_layer: int = 2,
    vocab_size: int = 256,
    head_size: int = 64,
    lora: int = 32,
    dtype: torch.dtype = torch.bfloat16,
) -> dict[str, torch.Tensor]:
    """A random RWKV-6 ("Finch") state dict in RWKV-LM's layout (``RWKV_Tmix_x060``).

    The package detects v6 from ``time_maa`` keys and the head count from ``time_faaaa``.
    """
    _check_dims(n_embd, head_size, vocab_size, n_layer)
    C, H, N, V = n_embd, n_embd // head_size, head_size, vocab_size
    F = int(3.5 * C) // 32 * 32  # RWKV-6 ffn width
    rnd = _Init(seed)
    s = 1.0 / math.sqrt(C)
    sd: dict[str, torch.Tensor] = {
        "emb.weight": rnd.normal(V, C, std=1.0),
        "blocks.0.ln0.weight": rnd.normal(C, std=0.1, mean=1.0),
        "blocks.0.ln0.bias": rnd.normal(C, std=0.1),
    }
    for i in range(n_layer):
        b, att, ffn = f"blocks.{i}.", f"blocks.{i}.att.", f"blocks.{i}.ffn."
        for ln in ("ln1", "ln2"):
            sd[f"{b}{ln}.weight"] = rnd.normal(C, std=0.1, mean=1.0)
            sd[f"{b}{ln}.bias"] = rnd.normal(C, std=0.1)
        for name in ("x", "w", "k", "v", "r", "g"):
            sd[f"{att}time_maa_{name}"] = rnd.uniform(1, 1, C, lo=0.0, hi=1.0)
        sd[att + "time_maa_w1"] = rnd.normal(C, 5 * lora, std=0.1)  # [C, 5D]
        sd[att + "time_maa_w2"] = rnd.normal(5, lora, C, std=0.1)  # [5, D, C]
        speed = torch.tensor([-6 + 5 * (n / (C - 1)) ** 1.5 for n in range(C)])
        sd[att + "time_decay"] = speed.reshape(1, 1, C)
        sd[att + "time_decay_w1"] = rnd.normal(C, lora, std=0.1)
        sd[att + "time_decay_w2"] = rnd.normal(lora, C, std=0.1)
        sd[att + "time_faaaa"] = rnd.normal(H, N, std=0.1)  # [H, N] "u" bonus
        for name in ("receptance", "key", "value", "gate", "output"):
            sd[f"{att}{name}.weight"] = rnd.normal(C, C, std=s)
        sd[att + "ln_x.weight"] = rnd.normal(C, std=0.1, mean=1.0)
        sd[att + "ln_x.bias"] = rnd.normal(C, std=0.1)
        sd[ffn + "time_maa_k"] = rnd.uniform(1, 1, C, lo=0.0, hi=1.0)
        sd[ffn + "time_maa_r"] = rnd.uniform(1, 1, C, lo=0.0, hi=1.0)
        sd[ffn + "key.weight"] = rnd.normal(F, C, std=s)  # [F, C]
        sd[ffn + "value.weight"] = rnd.normal(C, F, std=0.5 / math.sqrt(F))  # [C, F]
        sd[ffn + "receptance.weight"] = rnd.normal(C, C, std=s)
    sd["ln_out.weight"] = rnd.normal(C, std=0.1, mean=1.0)
    sd["ln_out.bias"] = rnd.normal(C, std=0.1)
    sd["head.weight"] = rnd.normal(V, C, std=2.0 * s)
    return {k: v.to(dtype).contiguous() for k, v in sd.items()}


def write_tiny_rwkv(
    path: str | Path,
    *,
    version: int = 7,
    seed: int = 0,
    n_embd: int = 128,
    n_layer: int = 2,
    vocab_size: int = 256,
    head_size: int = 64,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Write a tiny random RWKV-``version`` (7 or 6) checkpoint; returns the ``.pth`` path.

    bf16 by default, like released RWKV checkpoints, so fp32 and bf16 engines load the very
    same numbers. The default vocab of 256 matches ``ByteTokenizer``.
    """
    builders = {7: tiny_rwkv7_state_dict, 6: tiny_rwkv6_state_dict}
    if version not in builders:
        raise ValueError(f"tiny RWKV checkpoints are v{sorted(builders)}, not v{version}")
    sd = builders[version](
        seed=seed,
        n_embd=n_embd,
        n_layer=n_layer,
        vocab_size=vocab_size,
        head_size=head_size,
        dtype=dtype,
    )
    out = _pth_path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, out)
    return out
