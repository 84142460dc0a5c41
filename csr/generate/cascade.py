"""Shared-prefix ("cascade") attention: one stored copy of each tree's image+prompt keys/values.

The sentence search decodes many rows per tree (its open nodes times the G token-level groups),
and all of them attend to the same image+prompt prefix. Instead of a copy of that prefix per row,
`CascadeCache` keeps the prompt cache once per tree and each row's own suffix apart. The same holds
one level down: a node's G rows all read the node's path (its sentences so far and the token fed
for it), so once the node's forward has run, `share_per_node` keeps those columns once per node
and each row's suffix holds only the tokens it generated. Softmax attention over
[prefix; node; suffix] is the partial attentions combined by their log-sum-exp (Hydragen, Juravsky
et al. 2024; FlashInfer's cascade attention):

    out = Σ_i e^(lse_i - m) o_i / Σ_i e^(lse_i - m),  m = max_i lse_i

A shared part batches the queries of all rows of a tree (or node) against its single copy (rows
grouped, padded to the largest group: one kernel call per layer); the suffix part is per row. In
float32 on a CPU a part whose every query sees a key runs torch's fused attention kernel.
Exact up to float rounding; `tests/test_generate_equivalence.py` holds it to the reference.

It plugs into transformers through its public interfaces: the attention function and a mask
function (the rows' 2-D padding mask, passed through) are registered under `ATTENTION_NAME`, and
`cascade_attention(model)` switches the language model to it for the duration of a forward. The
rotary embedding is applied before the cache, so stored prefix keys are already rotated.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, Cache
from transformers.masking_utils import AttentionMaskInterface

from csr.generate.kvcache import PreallocatedLayer

ATTENTION_NAME = "csr_cascade"
# Language models whose attention is plain scaled softmax attention over a causal cache, as the
# function below computes it (the text models of csr.models.SUPPORTED_CLASSES).
TEXT_MODEL_TYPES = ("llama", "qwen2", "qwen2_5_vl_text", "qwen2_5_vl")


@dataclass(frozen=True)
class RowLayout:
    """Which group each row reads (its tree's prompt, or its node's path), and where the row's
    queries sit when grouped per group."""
    groups: torch.Tensor  # [R] the row's group (index into the shared part's batch)
    slots: torch.Tensor   # [N, S] the row in each (group, slot); R (an empty slot) where a group has fewer rows
    flat: torch.Tensor    # [R] the row's place in the flattened [N*S] grouping

    @classmethod
    def of(cls, groups: torch.Tensor, n_groups: int) -> "RowLayout":
        rows = groups.numel()
        counts = torch.bincount(groups, minlength=n_groups)
        width = int(counts.max()) if rows else 0
        order = torch.argsort(groups, stable=True)
        slot = torch.empty_like(groups)
        slot[order] = torch.arange(rows, device=groups.device) - (counts.cumsum(0) - counts)[groups[order]]
        flat = groups * width + slot
        slots = torch.full((n_groups * width,), rows, dtype=torch.long, device=groups.device)
        slots[flat] = torch.arange(rows, device=groups.device)
        return cls(groups, slots.view(n_groups, width), flat)


# Most attention scores held at once (float32): a node-sentence encode has many queries per tree
# (rows x sentence tokens x heads), so its queries are taken in slices; softmax is per query, exact.
MAX_SCORES = 2**26


# torch's fused CPU attention kernel, which also returns each query's log-sum-exp. It is an operator
# of torch's own scaled_dot_product_attention dispatch rather than a public function, so it is looked
# up once and used only where it exists.
_CPU_FUSED = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _partial_attention(query, keys, values, mask, scaling: float):
    """Softmax attention restricted to `mask` (True = attend), with its log-sum-exp.

    query [B, Hkv, n, D], keys/values [B, Hkv, L, D], mask [B or 1, 1, n or 1, L].
    Returns (output [B, Hkv, n, D] in float32, lse [B, Hkv, n]); a query that sees no key gets
    output 0 and lse -inf, so it weighs nothing when combined. In float32 on a CPU, when every
    query sees a key, this is torch's fused kernel (blockwise: no score matrix held, and it reads
    the cache's strided keys/values in place); otherwise the matmul form below.
    """
    if (_CPU_FUSED is not None and query.device.type == "cpu" and query.dtype == torch.float32
            and bool(mask.any(dim=-1).all())):
        additive = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill_(~mask, float("-inf"))
        return _CPU_FUSED(query, keys, values, 0.0, False, attn_mask=additive, scale=scaling)
    B, Hkv, n, _ = query.shape
    per_query = B * Hkv * keys.shape[-2]
    size = max(1, MAX_SCORES // per_query)
    if n > size:
        parts = [_partial_attention(query[:, :, i:i + size], keys, values,
                                    mask if mask.shape[-2] == 1 else mask[:, :, i:i + size], scaling)
                 for i in range(0, n, size)]
        return torch.cat([o for o, _ in parts], dim=-2), torch.cat([lse for _, lse in parts], dim=-1)
    scores = torch.matmul(query, keys.transpose(-1, -2)).float() * scaling
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.masked_fill(torch.isinf(lse), 0.0)[..., None])
    return torch.matmul(probs.to(values.dtype), values).float(), lse


def _grouped_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                       layout: RowLayout, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's queries [R, H, q, D] over its group's keys/values [N, Hkv, L, D] (mask [N, L]):
    a group's rows' queries as one block [N, Hkv, rep*S*q, D] against its single copy. Returns
    (output [R, H, q, D], lse [R, H, q])."""
    R, H, q, D = query.shape
    N, Hkv = keys.shape[:2]
    rep, S = H // Hkv, layout.slots.shape[1]
    padded = torch.cat([query, query.new_zeros(1, H, q, D)])  # row R: the empty slot
    grouped = padded[layout.slots].transpose(1, 2).reshape(N, Hkv, rep * S * q, D)
    out, lse = _partial_attention(grouped, keys, values, mask.bool()[:, None, None, :], scaling)
    out = out.reshape(N, H, S, q, D).transpose(1, 2).reshape(N * S, H, q, D)[layout.flat]
    lse = lse.reshape(N, H, S, q).transpose(1, 2).reshape(N * S, H, q)[layout.flat]
    return out, lse


@dataclass(frozen=True)
class SharedPart:
    """Keys/values that groups of rows share: a tree's prompt (read by all the tree's rows) or a
    node's path (read by the node's G rows)."""
    keys: torch.Tensor    # [N, Hkv, L, D], one per group
    values: torch.Tensor  # [N, Hkv, L, D]
    mask: torch.Tensor    # [N, L] True = a real token
    layout: RowLayout     # which group each row reads


def prefix_suffix_attention(query: torch.Tensor, shared: list[SharedPart], suffix_keys: torch.Tensor,
                            suffix_values: torch.Tensor, suffix_mask: torch.Tensor, scaling: float) -> torch.Tensor:
    """Attention of each row's queries over its groups' shared parts, in order (its tree's prompt,
    then its node's path), followed by its own suffix.

    query [R, H, q, D]; `shared[0]` must be the prompt, which every row sees. suffix_keys/values
    [R, Hkv, Ls, D], suffix_mask [R, Ls] (True = a real token). The q queries are the last q suffix
    positions, causal among themselves; they see every real column of the shared parts. H may be a
    multiple of Hkv (grouped-query attention: head h reads key/value head h // (H / Hkv)). Returns
    [R, q, H, D], the layout transformers' attention functions return.
    """
    R, H, q, D = query.shape
    Hkv = suffix_keys.shape[1]
    rep = H // Hkv
    parts = [_grouped_attention(query, p.keys, p.values, p.mask, p.layout, scaling)
             for p in shared if p.keys.shape[-2]]
    # suffix: per row; query i sits at suffix column Ls - q + i and sees columns up to it
    Ls = suffix_keys.shape[-2]
    if Ls:
        causal = torch.arange(Ls, device=query.device)[None, :] <= torch.arange(Ls - q, Ls, device=query.device)[:, None]
        mask = (suffix_mask.bool()[:, None, :] & causal)[:, None, None]  # [R, 1, 1, q, Ls]
        mask = mask.expand(R, 1, rep, q, Ls).reshape(R, 1, rep * q, Ls)
        o_s, lse_s = _partial_attention(query.reshape(R, Hkv, rep * q, D), suffix_keys, suffix_values, mask, scaling)
        parts.append((o_s.reshape(R, H, q, D), lse_s.reshape(R, H, q)))
    # combined by log-sum-exp; every row sees its prompt, so the prompt's lse (and m) is finite
    m = parts[0][1]
    for _, lse in parts[1:]:
        m = torch.maximum(m, lse)
    weights = [torch.exp(lse - m)[..., None] for _, lse in parts]
    out = sum(w * o for w, (o, _) in zip(weights, parts)) / sum(weights)
    return out.to(query.dtype).transpose(1, 2)


class CascadeLayer(PreallocatedLayer):
    """One layer: the trees' prefix keys/values (shared, never copied per row), after
    `share_per_node` each node's columns (shared by its rows), and each row's suffix in
    preallocated room. `update` stores and returns the suffix only."""

    def __init__(self, prefix_keys: torch.Tensor, prefix_values: torch.Tensor, rows: int, reserve: int = 64):
        super().__init__(reserve)
        self.prefix_keys, self.prefix_values = prefix_keys, prefix_values
        self.allocate(rows, prefix_keys, reserve)  # the suffixes start empty, with all their room
        # after `CascadeCache.share_per_node`: each node's columns so far, read by all its rows
        self.node_keys = self.node_values = None

    def node_width(self) -> int:
        return 0 if self.node_keys is None else self.node_keys.shape[-2]

    def get_seq_length(self) -> int:
        return self.prefix_keys.shape[-2] + self.node_width() + self.length

    def share_per_node(self, repeats: int) -> None:
        """The rows so far become nodes: their columns stay where they are, read by `repeats` new
        rows each, whose own suffixes start empty in the room that was left."""
        self.node_keys, self.node_values = self.keys, self.values
        self.allocate(self._k.shape[0] * repeats, self.prefix_keys, self._k.shape[2] - self.length)



class CascadeCache(Cache):
    """The key/value cache of the rows of several trees: one prefix per tree, a suffix per row.

    `prompt_cache` holds the trees' encoded prompts ([T_all] rows, left-padded, mask
    `prompt_mask`); `trees` [R] names each row's tree. Only the trees the rows use are kept, and a
    cache whose rows use every tree keeps the prompt cache's own tensors (no copy at all). Each
    row's suffix has room for `reserve` columns.
    """

    def __init__(self, prompt_cache: Cache, prompt_mask: torch.Tensor, trees: torch.Tensor, reserve: int = 64):
        used, trees = torch.unique(trees, return_inverse=True)
        every = used.numel() == prompt_mask.shape[0]  # unique() sorts: all trees used = all, in order

        def pick(t: torch.Tensor) -> torch.Tensor:
            return t if every else t[used]
        super().__init__(layers=[CascadeLayer(pick(layer.keys), pick(layer.values), trees.numel(), reserve)
                                 for layer in prompt_cache.layers])
        self.prefix_mask = pick(prompt_mask).bool()
        self.layout = RowLayout.of(trees, used.numel())
        self.node_mask: torch.Tensor | None = None  # [nodes, node columns], after share_per_node
        self.nodes: RowLayout | None = None         # which node each row reads

    @property
    def n_trees(self) -> int:
        return self.prefix_mask.shape[0]

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("a CascadeCache's rows become groups through share_per_node(repeats, mask)")

    def share_per_node(self, repeats: int, mask: torch.Tensor) -> None:
        """Each row so far (a node: its path's columns after the prompt, `mask` [rows, columns])
        becomes `repeats` rows that share those columns: one stored copy per node, as the prompt
        has one per tree. The rows' own suffixes start empty."""
        if self.nodes is not None:
            raise RuntimeError("share_per_node: the rows already share their nodes' columns")
        n = mask.shape[0]
        for layer in self.layers:
            layer.share_per_node(repeats)
        self.node_mask = mask.bool()
        self.nodes = RowLayout.of(torch.arange(n, device=mask.device).repeat_interleave(repeats), n)
        self.layout = RowLayout.of(self.layout.groups.repeat_interleave(repeats), self.n_trees)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.layout = RowLayout.of(self.layout.groups[indices], self.n_trees)
        if self.nodes is not None:
            self.nodes = RowLayout.of(self.nodes.groups[indices], self.node_mask.shape[0])


def cascade_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                              cascade: CascadeCache | None = None, **kwargs):
    """transformers attention function: `key`/`value` are the rows' suffixes the cache returned;
    `attention_mask` is the rows' 2-D padding mask over [prefix; suffix] (see `_padding_mask`)."""
    if cascade is None:
        raise RuntimeError(f"attention '{ATTENTION_NAME}' needs the forward's cascade=<CascadeCache> argument")
    if kwargs.get("sliding_window") is not None:
        raise RuntimeError(f"attention '{ATTENTION_NAME}' does not support sliding-window layers")
    layer = cascade.layers[module.layer_idx]
    rows, ls = key.shape[0], key.shape[-2]
    suffix_mask = attention_mask[:, -ls:] if attention_mask is not None else \
        torch.ones(rows, ls, dtype=torch.bool, device=key.device)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    shared = [SharedPart(layer.prefix_keys, layer.prefix_values, cascade.prefix_mask, cascade.layout)]
    if cascade.nodes is not None:
        shared.append(SharedPart(layer.node_keys, layer.node_values, cascade.node_mask, cascade.nodes))
    return prefix_suffix_attention(query, shared, key, value, suffix_mask, scaling), None


def _padding_mask(*, attention_mask=None, **_):
    """The 2-D padding mask as the caller passed it (bool): the attention function splits it."""
    return attention_mask


AttentionInterface.register(ATTENTION_NAME, cascade_attention_forward)
AttentionMaskInterface.register(ATTENTION_NAME, _padding_mask)


def unsupported_reason(model) -> str | None:
    """Why the cascade path cannot run this model's language model exactly, or None."""
    config = model.config.get_text_config()
    if config.model_type not in TEXT_MODEL_TYPES:
        return f"its language model is '{config.model_type}' (cascade supports {', '.join(TEXT_MODEL_TYPES)})"
    layer_types = getattr(config, "layer_types", None) or []
    if getattr(config, "use_sliding_window", False) or any(t != "full_attention" for t in layer_types):
        return "its language model uses sliding-window attention"
    return None


@contextmanager
def cascade_attention(model):
    """Run the language model's attention through `cascade_attention_forward` inside the block."""
    config = model.config.get_text_config()
    before = config._attn_implementation
    config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation = before
