"""The preallocated key/value layers the cached search paths append into (`csr.generate.kvcache`)."""

import torch
from transformers import DynamicCache

from csr.generate.cascade import CascadeCache
from csr.generate.kvcache import PreallocatedLayer


def kv(rows: int, cols: int, start: float = 0.0) -> torch.Tensor:
    """[rows, 2 heads, cols, 3] with distinct values."""
    return torch.arange(rows * 2 * cols * 3, dtype=torch.float32).view(rows, 2, cols, 3) + start


def test_repeat_keeps_the_planned_room_so_later_appends_reuse_the_buffer():
    layer = PreallocatedLayer(reserve=6)
    layer.update(kv(2, 3), kv(2, 3, 100.0))      # buffer: 3 + 6 columns
    layer.update(kv(2, 2), kv(2, 2))              # 5 used, room for 4 more
    layer.batch_repeat_interleave(3)
    assert layer._k.shape == (6, 2, 9, 3)         # the room planned, not 5 used + 6 reserve again
    assert torch.equal(layer.keys[4], torch.cat([kv(2, 3), kv(2, 2)], dim=2)[1])  # row 1's second copy
    buffer = layer._k.data_ptr()
    for _ in range(4):
        layer.update(kv(6, 1), kv(6, 1))
    assert layer._k.data_ptr() == buffer and layer.keys.shape[2] == 9
    layer.update(kv(6, 1), kv(6, 1))              # past the room: grows, keeps what it held
    assert layer._k.data_ptr() != buffer and layer.keys.shape[2] == 10
    assert torch.equal(layer.values[0, :, :3], kv(2, 3, 100.0)[0])


def test_append_left_padded_right_aligns_each_row_after_zeros():
    layer = PreallocatedLayer(reserve=8)
    layer.update(kv(3, 2), kv(3, 2))
    long, short = torch.stack([kv(1, 4)[0], -kv(1, 4)[0]]), torch.stack([kv(1, 1, 7.0)[0], kv(1, 1, 9.0)[0]])
    layer._k[:, :, 2:].fill_(float("nan"))        # what an uninitialised buffer may hold
    layer._v[:, :, 2:].fill_(float("nan"))
    layer.append_left_padded([long, None, short], width=4)
    assert layer.keys.shape == (3, 2, 6, 3)
    assert torch.equal(layer.keys[0, :, 2:], long[0]) and torch.equal(layer.values[0, :, 2:], long[1])
    assert torch.equal(layer.keys[1, :, 2:], torch.zeros(2, 4, 3))  # no path: padding only
    assert torch.equal(layer.keys[2, :, 2:5], torch.zeros(2, 3, 3))
    assert torch.equal(layer.keys[2, :, 5:], short[0]) and torch.equal(layer.values[2, :, 5:], short[1])
    assert torch.equal(layer.keys[:, :, :2], kv(3, 2))  # what was there stays


def test_cascade_suffixes_start_empty_with_all_their_room():
    prompt = DynamicCache()
    prompt.update(kv(2, 5), kv(2, 5), 0)
    cache = CascadeCache(prompt, torch.ones(2, 5, dtype=torch.long), torch.tensor([0, 0, 1]), reserve=7)
    layer = cache.layers[0]
    assert layer.length == 0 and layer._k.shape == (3, 2, 7, 3) and cache.get_seq_length() == 5
    buffer = layer._k.data_ptr()
    layer.append_left_padded([kv(1, 2)[0].expand(2, -1, -1, -1), None, None], width=2)
    for _ in range(5):
        cache.update(kv(3, 1), kv(3, 1), 0)
    assert layer._k.data_ptr() == buffer and cache.get_seq_length() == 12
