"""A batched RWKV-7 forward for CPU: B streams' chunks in one pass over stacked states.

The ``rwkv`` package (0.8.x) runs one ``[T]`` sequence against one unbatched state per call.
This module re-implements its RWKV-7 *sequence* forward (``RWKV_x070.forward_seq`` with the
non-CUDA ``RWKV_x070_TMix_seq`` and the plain ``RWKV_x070_CMix_seq``) with a leading batch
dimension, reading the package's already-loaded weights (``model.z``: matrices transposed,
vectors squeezed, ``emb.weight`` already layer-normed with ``ln0``, all in the strategy dtype).
Every formula, constant and dtype cast follows the package line by line, so results agree with
the package's own forward to float rounding (fp32: ~1e-6; matmuls over B*T rows take other
BLAS blockings than over T rows, so bit-identity is not expected). One deliberate change: the
wkv update multiplies the state by a rank-1 matrix, which the package materialises (an
O(N^3) matmul per head and token); here it is applied as two O(N^2) products (same value up to
rounding), which is where most of the batched speed-up on CPU comes from.

Shapes: B streams, T tokens per chunk (all rows the same T: the engine feeds fixed-size chunks),
C channels, H heads of size N, V vocabulary. The state is the package's list of 3 tensors per
layer, stacked: ``[B, C]`` att token-shift, ``[B, H, N, N]`` wkv (fp32), ``[B, C]`` ffn shift.

Not covered (callers fall back to the package): the DeepEmbed variant (``RWKV_DE_VERSION=1``),
CUDA kernels (``RWKV_CUDA_ON=1``; this code would still be correct on GPU but slow), and
T = 1 chunks go through the same formulas as the package's ``forward_one`` (identical maths).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["batched_forward", "supported"]


def supported(model: Any) -> bool:
    """True when ``model`` is a package RWKV-7 model this forward reproduces."""
    return (
        hasattr(model, "z")
        and hasattr(model, "n_head")
        and "blocks.0.att.r_k" in model.z
        and os.environ.get("RWKV_DE_VERSION") != "1"
        and "blocks.0.ffn.s_emb.weight" not in model.z
    )


def _tmix(
    layer_id: int,
    H: int,
    N: int,
    x: torch.Tensor,  # [B, T, C]
    x_prev: torch.Tensor,  # [B, C]
    v_first: torch.Tensor,  # [B, T, C]
    state: torch.Tensor,  # [B, H, N, N] fp32
    z: dict[str, torch.Tensor],
    att: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    B, T, C = x.shape
    xx = torch.cat((x_prev.unsqueeze(1), x[:, :-1, :]), dim=1) - x
    xr = x + xx * z[att + "x_r"]
    xw = x + xx * z[att + "x_w"]
    xk = x + xx * z[att + "x_k"]
    xv = x + xx * z[att + "x_v"]
    xa = x + xx * z[att + "x_a"]
    xg = x + xx * z[att + "x_g"]

    r = xr @ z[att + "receptance.weight"]
    w = torch.tanh(xw @ z[att + "w1"]) @ z[att + "w2"]
    k = xk @ z[att + "key.weight"]
    v = xv @ z[att + "value.weight"]
    a = torch.sigmoid(z[att + "a0"] + (xa @ z[att + "a1"]) @ z[att + "a2"])
    g = torch.sigmoid(xg @ z[att + "g1"]) @ z[att + "g2"]

    kk = F.normalize((k * z[att + "k_k"]).view(B, T, H, N), dim=-1, p=2.0).view(B, T, C)
    k = k * (1 + (a - 1) * z[att + "k_a"])
    if layer_id == 0:
        v_first = v
    else:
        v = v + (v_first - v) * torch.sigmoid(z[att + "v0"] + (xv @ z[att + "v1"]) @ z[att + "v2"])
    w = torch.exp(-0.606531 * torch.sigmoid((z[att + "w0"] + w).float()))  # [B, T, C] fp32

    # The package forms ab = (-kk) (kk*a)^T and multiplies state @ ab: O(N^3) per head and
    # token. ab is an outer product, so state @ ab = (state @ -kk) (kk*a)^T: O(N^2), same
    # value up to rounding (fp32 sums in another order; for bf16 the package also rounds ab).
    # The loop keeps the state transposed, ST = S^T ([B*H, N_k, N_v]), so that every product
    # is a row vector times a matrix (torch's batched matrix x column vector is ~8x slower on
    # CPU), and updates it in place (no [B, H, N, N] temporary per token):
    #   sa^T = (-kk)^T ST;  ST *= w (per row k);  ST += [kk*a, k] [sa; v]^T (one rank-2
    #   batched matmul for both rank-1 terms);  out^T = r^T ST.
    BH = B * H

    def rows(u: torch.Tensor) -> torch.Tensor:  # [B, T, C] -> [T, B*H, N]
        return u.view(B, T, H, N).transpose(0, 1).reshape(T, BH, N)

    neg_kk = rows((-kk).float()).unsqueeze(2)  # [T, BH, 1, N]
    r_row = rows(r).unsqueeze(2)  # [T, BH, 1, N], compute dtype
    decay = rows(w).unsqueeze(3)  # [T, BH, N, 1] fp32
    cols = torch.stack((rows((kk * a).float()), rows(k.float())), dim=3)  # [T, BH, N, 2]
    upd = torch.empty(T, BH, 2, N, dtype=torch.float32, device=x.device)  # [sa; v] rows
    upd[:, :, 1] = rows(v.float())
    ST = state.reshape(BH, N, N).transpose(1, 2).contiguous()  # fp32, ours to update
    outs = torch.empty(T, BH, 1, N, dtype=torch.float32, device=x.device)
    for t in range(T):
        torch.bmm(neg_kk[t], ST, out=outs[t])  # outs[t] as scratch for sa^T
        upd[t, :, 0:1] = outs[t]
        ST.mul_(decay[t]).baddbmm_(cols[t], upd[t])
        if x.dtype == torch.float32:
            torch.bmm(r_row[t], ST, out=outs[t])
        else:  # the package rounds the state to the compute dtype before this product
            outs[t] = torch.bmm(r_row[t], ST.to(x.dtype)).float()
    state = ST.transpose(1, 2).contiguous().view(B, H, N, N)
    out = outs.view(T, B, C).transpose(0, 1).to(x.dtype)  # [B, T, C]

    y = F.group_norm(
        out.reshape(B * T, C),
        num_groups=H,
        weight=z[att + "ln_x.weight"],
        bias=z[att + "ln_x.bias"],
        eps=64e-5,
    ).view(B, T, C)
    bonus = (r * k * z[att + "r_k"]).view(B, T, H, N).sum(dim=-1, keepdim=True)
    y = y + (bonus * v.view(B, T, H, N)).view(B, T, C)
    return (y * g) @ z[att + "output.weight"], x[:, -1, :], state, v_first


def _cmix(
    x: torch.Tensor, x_prev: torch.Tensor, z: dict[str, torch.Tensor], ffn: str
) -> tuple[torch.Tensor, torch.Tensor]:
    xx = torch.cat((x_prev.unsqueeze(1), x[:, :-1, :]), dim=1) - x
    k = x + xx * z[ffn + "x_k"]
    k = torch.relu(k @ z[ffn + "key.weight"]) ** 2
    return k @ z[ffn + "value.weight"], x[:, -1, :]


@torch.no_grad()
def batched_forward(
    model: Any, tokens: Sequence[Sequence[int]], states: Sequence[Sequence[torch.Tensor]]
) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
    """Run ``tokens[b]`` (all of one length T) from ``states[b]`` for every row b at once.

    ``states[b]`` is a package state (3 tensors per layer); inputs are never modified.
    Returns the logits after each row's last token (``[B, V]``, strategy dtype, as the package
    returns them) and each row's new state as fresh tensors (no views shared between rows).
    """
    B = len(tokens)
    if B == 0 or B != len(states):
        raise ValueError(f"{B} token rows but {len(states)} states")
    T = len(tokens[0])
    if T == 0 or any(len(t) != T for t in tokens):
        raise ValueError("every row needs the same, non-zero number of tokens")
    z: dict[str, torch.Tensor] = model.z
    H, N, C, L = int(model.n_head), int(model.head_size), int(model.n_embd), int(model.n_layer)
    emb = z["emb.weight"]
    idx = torch.tensor([list(t) for t in tokens], dtype=torch.long, device=emb.device)
    x = emb[idx]  # [B, T, C]
    stacked = [torch.stack([s[j] for s in states]) for j in range(3 * L)]
    v_first = torch.empty_like(x)
    new: list[torch.Tensor] = [torch.empty(0)] * (3 * L)
    for i in range(L):
        bbb, att, ffn = f"blocks.{i}.", f"blocks.{i}.att.", f"blocks.{i}.ffn."
        xx = F.layer_norm(x, (C,), weight=z[bbb + "ln1.weight"], bias=z[bbb + "ln1.bias"])
        xx, new[3 * i], new[3 * i + 1], v_first = _tmix(
            i, H, N, xx, stacked[3 * i], v_first, stacked[3 * i + 1], z, att
        )
        x = x + xx
        xx = F.layer_norm(x, (C,), weight=z[bbb + "ln2.weight"], bias=z[bbb + "ln2.bias"])
        xx, new[3 * i + 2] = _cmix(xx, stacked[3 * i + 2], z, ffn)
        x = x + xx
    last = F.layer_norm(x[:, -1, :], (C,), weight=z["ln_out.weight"], bias=z["ln_out.bias"])
    # Row by row, as the package computes its one row: a [B, C] x [C, V] product would take
    # another BLAS kernel for B = 1 (a matrix-vector product) than for B > 1, so a stream's
    # logits would depend on how many neighbours it was fed with.
    head = z["head.weight"]
    logits = torch.stack([row @ head for row in last])  # [B, V]
    rows = [[t[b].clone() for t in new] for b in range(B)]
    return logits, rows
