"""The one-token steps of a ``generate`` call, on a window held in place.

A feed builds each forward's attention window from the stored state (``attention.py``): every
cached key re-rotated from its stored slot, every value copied, and after the forward the
stored window is rebuilt with the new chunk appended and evicted. That is right for a chunk,
once per batch; during generation it ran once per token, and the copies and rotations of the
whole window cost about as much as the attention itself (a 64-token summary ran at 0.83x
Hugging Face ``generate`` with a ``DynamicCache`` in CPU seconds, 0.61x in wall time on a
loaded box; that cache only appends).

``DecodeWindow`` builds the attention window once per ``generate`` call, in buffers long enough
for all its steps, and then changes only what a step changes:

* a step that evicts nothing writes its token's key and value at the end: no cached key moves,
  so no key is re-rotated (the common case: ``generate`` gets room beside the window);
* a step that evicts (``SinkWindow.kept``: a full window drops the first recent token) advances
  the window's start in the buffer by one, moves the S sinks after it and re-rotates the
  recent keys from their stored copies (``SlotRotary``: one fp32 rotation from the stored slot,
  never a rotation of a rotated key, so nothing drifts); values never move.

Every key and value the model sees is computed by the same operations on the same numbers as
the per-step path (``attention._ForwardWindows``), so generation is bit-identical to it: a key
whose slot did not move is used as stored (the per-step path's zero rotation is exact), a new
token's key is the model's own during its step and its stored copy afterwards.

Shapes (nanoGPT style): H_kv key/value heads, D head dim, M buffer slots, n cached tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from workers.engines.sinkkv.attention import _moved_rotations
from workers.engines.sinkkv.rotary import LayerRotary, SlotRotary
from workers.engines.sinkkv.state import _Window
from workers.engines.sinkkv.window import SinkWindow


class DecodeWindow:
    """One stream's window during the one-token forwards of a ``generate`` call.

    Per layer, the keys as the model sees them (rotated to their current slot) and the values
    live in buffers ``[1, H_kv, M, D]`` (compute dtype); the window is ``[offset, offset + n)``
    of them and a step's token goes at ``offset + n``. When a step can evict, the stored keys
    (storage dtype, as the model produced them) and their slots are kept in the same layout,
    for the re-rotation after each eviction.
    """

    def __init__(
        self,
        window: _Window,
        policy: SinkWindow,
        rotary: LayerRotary,
        steps: int,
        compute_dtype: torch.dtype,
    ) -> None:
        """``window`` as ``generate`` has it after the prompt; room for ``steps`` forwards."""
        first = window.keys[0]
        H, D, dev = first.shape[0], first.shape[2], first.device
        n = window.length
        self.policy, self.rotary = policy, rotary
        self.dtype, self.device = compute_dtype, dev
        self.storage_dtype = first.dtype
        self.offset, self.length = 0, n
        size = n + steps  # offset + length grows by exactly one per step
        shape = (len(window.keys), 1, H, size, D)
        #: all layers in one tensor each, so an eviction moves and re-rotates them in one op
        self.all_keys = torch.empty(shape, dtype=compute_dtype, device=dev)
        self.all_values = torch.empty(shape, dtype=compute_dtype, device=dev)
        self.keys = list(self.all_keys.unbind(0))  # per layer [1, H_kv, M, D]
        self.values = list(self.all_values.unbind(0))
        #: only a window that can fill up keeps the stored keys and slots: eviction re-rotates
        self.evicts = n + steps > policy.capacity
        kept = shape if self.evicts else (0, 1, H, 0, D)
        self.stored = torch.empty(kept, dtype=first.dtype, device=dev)[:, 0]  # [layers, H_kv, M, D]
        #: the stored keys' rotate-half partners ``[-k2, k1]``: a re-rotation in whole-width ops
        self.partners = torch.empty_like(self.stored)
        self.slots = torch.empty(size if self.evicts else 0, dtype=torch.long)  # [M]
        self._fill(window)
        self._updated = 0
        self._new: list[tuple[torch.Tensor, torch.Tensor]] = []  # this step's (k, v) per layer
        #: the cache object every step hands the model: one ``DecodeLayer`` per model layer
        self.cache = DynamicCache()
        self.cache.layers.extend(DecodeLayer(self, i) for i in range(len(self.keys)))

    # ----- building ------------------------------------------------------------------------
    def _fill(self, window: _Window) -> None:
        """The window's keys at their current slots and its values, once (what a per-step
        forward builds every time: ``_ForwardWindows._fill_row``)."""
        n = self.length
        s0, rotations = _moved_rotations(self.rotary, window, self.device)
        for layer, (k, v) in enumerate(zip(window.keys, window.values, strict=True)):
            table = self.rotary.layer(layer)
            self.keys[layer][0, :, :s0].copy_(k[:, :s0])  # not moved: exactly as stored
            if rotations is not None:
                rotation = rotations[self.rotary.table_of[layer]]
                self._rotate(table, k[:, s0:], rotation, self.keys[layer][0, :, s0:n])
            self.values[layer][0, :, :n].copy_(v)
            if self.evicts:
                self.stored[layer, :, :n].copy_(k)
                self.partners[layer, :, :n].copy_(table.half_partner(k))
        if self.evicts:
            self.slots[:n].copy_(window.slots)

    def _rotate(self, table: SlotRotary, stored: torch.Tensor,
                rotation: tuple[torch.Tensor, torch.Tensor], dst: torch.Tensor) -> None:
        """``stored`` keys rotated by ``rotation`` (fp32) into ``dst`` (compute dtype)."""
        cos, sin = rotation
        if self.dtype == torch.float32:
            table.rotate_into(stored, cos, sin, dst)
        else:  # rotate in fp32, round once
            tmp = torch.empty(dst.shape, dtype=torch.float32, device=dst.device)
            table.rotate_into(stored, cos, sin, tmp)
            dst.copy_(tmp)

    # ----- one step ------------------------------------------------------------------------
    def layer(self, index: int, new_key: torch.Tensor,
              new_value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``index``'s window plus the step's token ``[1, H_kv, n + 1, D]``: the token's
        key and value as the model made them, written after the window (views, no copy)."""
        end = self.offset + self.length
        self.keys[index][:, :, end : end + 1] = new_key
        self.values[index][:, :, end : end + 1] = new_value
        self._new.append((new_key, new_value))
        self._updated += 1
        return (self.keys[index][:, :, self.offset : end + 1],
                self.values[index][:, :, self.offset : end + 1])

    def advance(self) -> None:
        """After a step's forward: keep its token as stored, then evict like a feed."""
        if self._updated != len(self.keys):
            raise RuntimeError("the model did not update every cache layer exactly once")
        end = self.offset + self.length
        if self.storage_dtype != self.dtype or self.evicts:
            keys = torch.stack([k[0, :, 0] for k, _ in self._new]).to(self.storage_dtype)
            if self.storage_dtype != self.dtype:  # from now on it is read back from storage
                values = torch.stack([v[0, :, 0] for _, v in self._new])
                self.all_keys[:, 0, :, end].copy_(keys)  # [layers, H_kv, D]
                self.all_values[:, 0, :, end].copy_(values.to(self.storage_dtype))
            if self.evicts:
                self.stored[:, :, end] = keys  # what a feed stores
                for a, b, table in self.rotary.runs():
                    self.partners[a:b, :, end] = table.half_partner(keys[a:b])
                self.slots[end] = self.length
        self._new.clear()
        self._updated = 0
        self.length += 1
        if self.length > self.policy.capacity:
            self._evict()

    def _evict(self) -> None:
        """Drop the first recent token (one step overfills a full window by one: ``kept`` is
        ``[0, S) ++ [n + 1 - R, n + 1)``): the start moves up one, the sinks follow it, and
        the recent keys are re-rotated to their new slots from their stored copies."""
        ranges = self.policy.kept(self.length)
        S, o = self.policy.sink, self.offset
        if ranges != [(0, S), (S + 1, self.length)]:
            raise RuntimeError(f"a one-token step cannot evict {ranges} of {self.length}")
        for buf in (self.all_keys[:, 0], self.all_values[:, 0], self.stored, self.partners):
            buf[:, :, o + 1 : o + 1 + S] = buf[:, :, o : o + S].clone()  # [layers, H_kv, S, D]
        self.slots[o + 1 : o + 1 + S] = self.slots[o : o + S].clone()
        self.offset, self.length = o + 1, self.length - 1
        o, n = self.offset, self.length
        window = _Window((), (), self.slots[o : o + n], None)
        s0, rotations = _moved_rotations(self.rotary, window, self.device)
        if rotations is None:
            return
        # all layers of a run sharing a table at once (one run for most models), in
        # whole-width ops: the same arithmetic per element
        for a, b, table in self.rotary.runs():
            rotation = rotations[self.rotary.table_of[a]]
            cos, sin = (table.whole(t) for t in rotation)  # [n - s0, D]
            stored = self.stored[a:b, :, o + s0 : o + n]
            partners = self.partners[a:b, :, o + s0 : o + n]
            dst = self.all_keys[a:b, 0, :, o + s0 : o + n]  # [layers, H_kv, n - s0, D]
            if self.dtype == torch.float32:
                SlotRotary.rotate_whole_into(stored, partners, cos, sin, dst)
            else:  # rotate in fp32, round once
                tmp = torch.empty(dst.shape, dtype=torch.float32, device=dst.device)
                SlotRotary.rotate_whole_into(stored, partners, cos, sin, tmp)
                dst.copy_(tmp)


class DecodeLayer(DynamicLayer):
    """A ``DynamicCache`` layer handing the model its window from ``DecodeWindow``.

    ``get_seq_length`` is the window's length before the step, as for ``_WindowLayer``: the
    model's default positions and mask see the window it attends to."""

    def __init__(self, window: DecodeWindow, index: int) -> None:
        super().__init__()
        self._window, self._index = window, index
        self.dtype, self.device = window.dtype, window.device
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self._window.length

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._window.layer(self._index, key_states, value_states)
