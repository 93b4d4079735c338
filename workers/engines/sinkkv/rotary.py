"""Re-rotating cached keys from the slot they were stored at to the slot they sit at now.

Hugging Face caches keys after the rotary embedding (RoPE). When the window shifts, a kept
key's slot changes and its rotation must follow. Re-rotating stored keys in place, step after
step, accumulates rounding (badly in bf16: ~54% relative key error after ~1,000 shifts).
Instead each key is stored exactly as the model produced it, together with the slot it was
rotated at (one int per cached token, shared by all layers); at use time a temporary fp32
copy is rotated by the angle difference between the current and the stored slot, then cast
to the compute dtype. One rounding, no drift:

    stored key      k_p = R(a_p) k           (a_x = fl32(x * inv_freq), exactly as HF computes)
    key at slot j   R(a_j - a_p) k_p = R(a_j) k

The angle difference is taken in float64 from the same fp32 angles Hugging Face uses, so a
re-rotated key equals the key the model would have produced at slot j up to fp32 rounding.
RoPE's attention scaling (YaRN) is already inside k_p and a rotation does not change it, so the
correction rotation is unscaled.

Partial rotary (GPT-NeoX/Pythia ``rotary_pct``, Phi ``partial_rotary_factor``): the model
rotates only the first ``rotary_dim = 2 * len(inv_freq)`` dims of each head (rotate-half within
them) and passes the rest through, so a re-rotation does the same: the first ``rotary_dim``
dims turn, the others are copied unchanged.

Interleaved rotary (Cohere, Cohere2): the pairs are (2i, 2i + 1) instead of (i, i + r/2)
(``rotate_half`` = ``[-x1, x0, -x3, x2, ...]``, cos/sin repeated per pair). The same rotation
on strided views ``k[..., 0:r:2]``, ``k[..., 1:r:2]``: the arithmetic per element is unchanged.

NoPE layers (SmolLM3's every fourth, Cohere2's global layers) get a table of zero
frequencies: cos 1, sin 0, so ``k cos - k2 sin`` is ``k`` exactly and nothing is re-rotated.

Cost in the steady state: once the window is full, every chunk moves every kept key (the
window slides by T slots), so every chunk re-rotates ~S+R keys per layer. The rotation
*tables* (``cos``/``sin`` from each key's stored slot to its current one) depend only on the
window's slots, and a full window fed in aligned chunks has the same slots after every chunk
(each kept key was stored at slot ``S + R + (its offset in its chunk)``, and sits at the same
index). ``LayerRotary.moved`` therefore keeps the tables of the last few slot patterns
(``MEMO_PATTERNS``, keyed by the slots' bytes): a steady stream computes them once, not per
chunk. The tables are the same tensors the computation would make again (it is
deterministic), so results are unchanged bit for bit; only the keys' rotation itself is paid
per chunk, the one cost a 1k-token window (nothing moved yet) does not have.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import NamedTuple

import torch

#: slot patterns whose rotation tables a ``LayerRotary`` keeps (least recently used dropped):
#: a steady stream fed in aligned chunks repeats one; a batch of streams a few
MEMO_PATTERNS = 8

#: names the position scheme in stored states: a state only loads where it means the same
ROPE_SCHEME = "slot-shift/fp32-rerotate/v1"


class SlotRotary:
    """Rotates keys cached at one slot to another slot, exactly as the model's RoPE would.

    ``inv_freq`` is the model's own buffer (llama3/linear/yarn scaling already applied), in the
    precision the model uses it (a bf16 model rounds it). ``a_x = fl32(x * inv_freq)`` is the
    fp32 angle Hugging Face computes for position x; this class tabulates ``cos a_x, sin a_x``
    in float64 once, and forms the rotation by ``a_j - a_p`` with the angle-difference
    identities (float64, then rounded to fp32 once): no transcendental calls per step::

        cos(a_j - a_p) = cos a_j cos a_p + sin a_j sin a_p
        sin(a_j - a_p) = sin a_j cos a_p - cos a_j sin a_p
    """

    def __init__(
        self, inv_freq: torch.Tensor, max_slots: int, device: torch.device,
        interleaved: bool = False,
    ) -> None:
        inv = inv_freq.detach().to(device=device, dtype=torch.float32)  # [D/2]
        #: pairs (2i, 2i + 1) (Cohere) instead of rotate-half's (i, i + r/2)
        self.interleaved = interleaved
        slots = torch.arange(max_slots, device=device, dtype=torch.float32)  # [X]
        # same op and dtype as HF: position.float() * inv_freq.float()  -> [X, D/2]
        angles = (slots[:, None] * inv[None, :]).double()
        self.cos_table, self.sin_table = angles.cos(), angles.sin()  # [X, D/2] float64
        #: X: slots 0 .. X-1 can be rotated to or from
        self.max_slots = max_slots
        #: the first dims of each head the model rotates (the head dim D, or less: partial)
        self.rotary_dim = 2 * int(inv.numel())

    def cos_sin(
        self, stored: torch.Tensor, current: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 ``cos, sin`` of shape ``[..., L, D/2]`` rotating from ``stored`` to ``current``
        (int64 slot tensors of shape ``[..., L]``)."""
        shape = (*stored.shape, self.cos_table.shape[1])
        # index_select on flat indices: much cheaper on CPU than advanced indexing
        p, j = stored.reshape(-1), current.reshape(-1)
        cp = self.cos_table.index_select(0, p).view(shape)  # [..., L, D/2]
        sp = self.sin_table.index_select(0, p).view(shape)
        cj = self.cos_table.index_select(0, j).view(shape)
        sj = self.sin_table.index_select(0, j).view(shape)
        cos = (cj * cp + sj * sp).float()  # cos(a_j - a_p)
        sin = (sj * cp - cj * sp).float()  # sin(a_j - a_p)
        return cos, sin

    def _pairs(self, x: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The two members of each rotated pair over the first ``r`` dims, as views."""
        if self.interleaved:
            return x[..., 0:r:2], x[..., 1:r:2]
        return x[..., : r // 2], x[..., r // 2 : r]

    def rotate_into(
        self, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor,
        cos_whole: torch.Tensor | None = None,
    ) -> None:
        """Write keys ``k`` ``[..., L, D]`` (any float dtype) rotated by the half-width fp32
        ``cos, sin`` ``[..., L, r/2]`` into the fp32 tensor ``out`` (a view is fine).

        Rotate-half convention over the first ``r`` dims, pairs (i, i + r/2), all arithmetic
        in fp32: ``out1 = k1 cos - k2 sin``, ``out2 = k2 cos + k1 sin``; dims ``r..D`` (partial
        rotary) are copied as they are. Interleaved: pairs (2i, 2i + 1), same arithmetic.

        ``cos_whole`` (``whole(cos)``, ``[..., L, r]``), when given, does both products by cos
        in one op over the whole rotated width instead of two over half-width strided views:
        each element is the same single fp32 product, so the result is bit-identical; it saves
        one pass of short inner loops (~20% of a re-rotation at head dim 16).
        """
        r = 2 * cos.shape[-1]
        (k1, k2), (o1, o2) = self._pairs(k, r), self._pairs(out, r)
        if cos_whole is None:
            torch.mul(k1, cos, out=o1)
            torch.mul(k2, cos, out=o2)
        elif r == k.shape[-1]:
            torch.mul(k, cos_whole, out=out)
        else:
            torch.mul(k[..., :r], cos_whole, out=out[..., :r])
        o1.addcmul_(k2, sin, value=-1.0)
        o2.addcmul_(k1, sin)
        if r < k.shape[-1]:
            out[..., r:].copy_(k[..., r:])

    @staticmethod
    def rotate_whole_into(
        k: torch.Tensor, k_half: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        out: torch.Tensor,
    ) -> None:
        """``rotate_into`` in two whole-width ops, for keys whose rotate-half partner
        ``k_half = [-k2, k1, ...]`` is kept beside them: ``out = k cos' + k_half sin'`` with
        ``cos' = [cos, cos]``, ``sin' = [sin, sin]`` (fp32 ``[..., L, r]``) over the first ``r``
        dims; the rest (partial rotary) copied as they are.

        Per element it is the same two roundings as ``rotate_into`` (``fl(k1 cos) +
        fl(-k2 sin)``: negation is exact), so the result is bit-identical; but each op runs
        over whole ``[L, D]`` blocks instead of ``D/2``-wide rows, ~4x fewer passes of small
        loops when a whole window is re-rotated at every generated token.
        """
        r = cos.shape[-1]
        if r == k.shape[-1]:
            torch.mul(k, cos, out=out)
            out.addcmul_(k_half, sin)
            return
        rotated = out[..., :r]
        torch.mul(k[..., :r], cos, out=rotated)
        rotated.addcmul_(k_half[..., :r], sin)
        out[..., r:].copy_(k[..., r:])

    def whole(self, half: torch.Tensor) -> torch.Tensor:
        """A half-width ``cos`` or ``sin`` ``[..., L, r/2]`` repeated to ``[..., L, r]``:
        ``[c, c]``, or ``[c0, c0, c1, c1, ...]`` interleaved."""
        if self.interleaved:
            return half.repeat_interleave(2, dim=-1)
        return torch.cat([half, half], dim=-1)

    def half_partner(self, k: torch.Tensor) -> torch.Tensor:
        """``[-k2, k1]`` of the rotated dims of keys ``[..., D]``, then the unrotated dims
        (never read): what ``rotate_whole_into`` multiplies by sin, in the keys' layout."""
        r = self.rotary_dim
        if self.interleaved:  # [-k1, k0, -k3, k2, ...]
            k0, k1 = self._pairs(k, r)
            pairs = torch.stack([-k1, k0], dim=-1).flatten(-2)
            return torch.cat([pairs, k[..., r:]], dim=-1)
        half = r // 2
        return torch.cat([-k[..., half:r], k[..., :half], k[..., r:]], dim=-1)


class Moved(NamedTuple):
    """What re-rotating a window takes (``LayerRotary.moved``); shared, never modify it."""

    #: s0: the first cache index whose stored slot differs from its index (its current slot);
    #: keys below it (the sinks, at least) are used exactly as stored
    first: int
    #: per table, the fp32 ``cos, sin`` ``[n - s0, r/2]`` rotating indices s0.. from their
    #: stored to their current slot (a zero rotation for a key that did not move); None when
    #: nothing moved
    halves: list[tuple[torch.Tensor, torch.Tensor]] | None
    #: per table, ``whole(cos)`` ``[n - s0, r]`` (``rotate_into``'s ``cos_whole``); None when
    #: nothing moved
    cos_whole: list[torch.Tensor] | None


class LayerRotary:
    """Each layer's ``SlotRotary``: one table shared by every layer in most models; Gemma 3's
    local and global layers rotate by different frequencies (two tables), and NoPE layers
    (SmolLM3, Cohere2) by zero ones. Layers whose frequencies are the same tensor share one
    table, so a model with one rotary embedding builds and indexes one table as before."""

    def __init__(
        self, inv_freqs: Sequence[torch.Tensor], max_slots: int, device: torch.device,
        interleaved: bool = False,
    ) -> None:
        built: dict[int, int] = {}  # id(inv_freq) -> index into tables
        self.tables: list[SlotRotary] = []
        index = []
        for inv in inv_freqs:
            if id(inv) not in built:
                built[id(inv)] = len(self.tables)
                self.tables.append(SlotRotary(inv, max_slots, device, interleaved))
            index.append(built[id(inv)])
        #: per layer, the index of its table in ``tables``
        self.table_of: tuple[int, ...] = tuple(index)
        self.max_slots = max_slots
        #: dims of each head the first layer's table rotates (model info, tests)
        self.rotary_dim = self.tables[0].rotary_dim
        #: slots' bytes -> ``Moved``, least recently used first (``moved(memo=True)``)
        self._memo: OrderedDict[bytes, Moved] = OrderedDict()
        self._memo_lock = threading.Lock()  # engines may feed from several threads

    @classmethod
    def of(
        cls, tables: Sequence[torch.Tensor | None], head_dim: int, max_slots: int,
        device: torch.device, interleaved: bool = False,
    ) -> LayerRotary:
        """From per-layer frequencies, None on a NoPE (or ALiBi) layer: those layers share one
        table of zero frequencies, whose rotation is exact (keys used as stored)."""
        first = next((t for t in tables if t is not None), None)  # None: ALiBi, no table
        zeros = torch.zeros(head_dim // 2) if first is None else torch.zeros_like(first)
        return cls([zeros if t is None else t for t in tables], max_slots, device, interleaved)

    def layer(self, index: int) -> SlotRotary:
        return self.tables[self.table_of[index]]

    def moved(self, slots: torch.Tensor, device: torch.device, memo: bool = False) -> Moved:
        """The rotations that bring a window with stored ``slots`` (int64 ``[n]``, CPU: the slot
        each cached key was rotated at) to its current slots ``0 .. n-1`` (``Moved``).

        ``memo``: look the slot pattern up among the last ``MEMO_PATTERNS`` ones first, and
        keep it there (what a feed does: a steady stream repeats one pattern every chunk). The
        tables are computed exactly as without it; only the lookup is new (~the cost of
        hashing 8 bytes per cached token). Without it (a generate step, whose pattern never
        repeats), nothing is kept.
        """
        key = slots.cpu().numpy().tobytes() if memo else b""
        if memo:
            with self._memo_lock:
                found = self._memo.get(key)
                if found is not None:
                    self._memo.move_to_end(key)
                    return found
        n = int(slots.shape[0])
        moved_at = (slots != torch.arange(n, device=slots.device)).nonzero()
        s0 = int(moved_at[0, 0]) if len(moved_at) else n
        if s0 == n:
            result = Moved(s0, None, None)
        else:
            stored, current = slots[s0:].to(device), torch.arange(s0, n).to(device)
            halves = [table.cos_sin(stored, current) for table in self.tables]
            wholes = (
                [t.whole(cos) for t, (cos, _) in zip(self.tables, halves, strict=True)]
                if memo else None  # built once per pattern: worth it only when kept
            )
            result = Moved(s0, halves, wholes)
        if memo:
            with self._memo_lock:
                self._memo[key] = result
                while len(self._memo) > MEMO_PATTERNS:
                    self._memo.popitem(last=False)
        return result

    def runs(self) -> list[tuple[int, int, SlotRotary]]:
        """``(first layer, end layer, table)`` of each run of consecutive layers sharing a
        table: what an all-layers-at-once rotation does per run."""
        runs: list[tuple[int, int, SlotRotary]] = []
        for i, t in enumerate(self.table_of):
            if runs and runs[-1][2] is self.tables[t]:
                runs[-1] = (runs[-1][0], i + 1, runs[-1][2])
            else:
                runs.append((i, i + 1, self.tables[t]))
        return runs
