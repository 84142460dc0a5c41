"""The key/value caches of the copies path: every row holds its own copy of its prompt's keys and
values, in preallocated room (`csr.generate.cascade` is the path that shares one copy per tree)."""

from __future__ import annotations

from functools import partial

import torch
from transformers import Cache, DynamicCache
from transformers.cache_utils import DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """A DynamicLayer that appends into spare capacity instead of concatenating.

    transformers' DynamicLayer copies the whole cache at every decoding step (torch.cat); with
    M*G rows over a long image prefix that copy, not the matmuls, dominates a step. Here keys and
    values are views into a buffer with `reserve` free positions, grown geometrically when full.
    """

    def __init__(self, reserve: int = 64):
        super().__init__()
        self.reserve = reserve
        self.length = 0
        self._k = self._v = None

    def allocate(self, batch: int, like: torch.Tensor, capacity: int) -> None:
        """Start empty with room for `capacity` columns of `batch` rows (shaped and typed as `like`)."""
        self.lazy_initialization(like, like)
        shape = (batch, like.shape[1], capacity, like.shape[3])
        self._k, self._v = like.new_empty(shape), like.new_empty(shape)
        self.length = 0
        self.keys, self.values = self._k[:, :, :0], self._v[:, :, :0]

    def _ensure(self, batch: int, extra: int, like: torch.Tensor) -> None:
        need = self.length + extra
        if self._k is not None and self._k.shape[0] == batch and self._k.shape[2] >= need:
            return
        capacity = max(need + self.reserve, 2 * self.length)
        shape = (batch, like.shape[1], capacity, like.shape[3])
        k, v = like.new_empty(shape), like.new_empty(shape)
        if self.length:
            k[:, :, :self.length] = self._k[:, :, :self.length]
            v[:, :, :self.length] = self._v[:, :, :self.length]
        self._k, self._v = k, v

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        self._ensure(key_states.shape[0], n, key_states)
        self._k[:, :, self.length:self.length + n] = key_states
        self._v[:, :, self.length:self.length + n] = value_states
        self.length += n
        self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]
        return self.keys, self.values

    def append_left_padded(self, rows: list[torch.Tensor | None], width: int) -> None:
        """Append `width` columns: row j gets `rows[j]` ([2, Hkv, L, D]: keys, values; or None)
        right-aligned, zeros before it (padding the caller masks; zeros keep masked scores finite)."""
        like = next(kv for kv in rows if kv is not None)[0]
        self._ensure(len(rows), width, like)
        start = self.length
        for j, kv in enumerate(rows):
            filled = 0 if kv is None else kv.shape[-2]
            for buf, part in ((self._k, 0), (self._v, 1)):
                buf[j, :, start:start + width - filled] = 0
                if filled:
                    buf[j, :, start + width - filled:start + width] = kv[part]
        self.length += width
        self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.length:
            b, h, capacity, d = self._k.shape  # the room planned for this buffer comes along
            shape = (b * repeats, h, capacity, d)
            k, v = self._k.new_empty(shape), self._v.new_empty(shape)
            n = self.length  # broadcast-copy each row into its `repeats` slots: no temporary
            k.view(b, repeats, h, -1, d)[:, :, :, :n] = self.keys[:, None]
            v.view(b, repeats, h, -1, d)[:, :, :, :n] = self.values[:, None]
            self._k, self._v = k, v
            self.keys, self.values = k[:, :, :n], v[:, :, :n]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.length:  # the buffer's spare room comes along: the next append needs no new buffer
            self._k, self._v = self._k[indices], self._v[indices]
            self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]


class PreallocatedCache(DynamicCache):
    def __init__(self, reserve: int = 64):
        Cache.__init__(self, layer_class_to_replicate=partial(PreallocatedLayer, reserve))


def select_rows(cache: DynamicCache, rows: torch.Tensor, reserve: int = 64) -> DynamicCache:
    """A new cache holding `rows` of `cache` (left untouched), with room for `reserve` more tokens."""
    out = PreallocatedCache(reserve)
    for i, layer in enumerate(cache.layers):
        out.update(layer.keys[rows], layer.values[rows], i)
    return out
