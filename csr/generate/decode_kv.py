"""Each candidate's decode keys/values, kept so that its children start from them.

A level of the sentence search decodes every node's G candidates token by token; the keys and
values of a candidate's tokens are then in the decode cache. Its children need exactly those
keys/values (the prompt, the path's earlier sentences, then this sentence), so instead of re-encoding
the path's tokens on top of the prompt, the fast path keeps, per candidate, the part of its row
after the prompt (the prompt itself stays the one shared copy) and starts the children from it.

What is kept is keyed by the token ids it holds: (tree, the path's ids after the prompt). A child
level looks its node up by the ids the reference would feed for it (`CachedLlavaExpander` works
them out: the generated ids, or with `generate.continuation: text` the re-tokenised text); a node
whose ids differ from the ones that were decoded (the text re-tokenises differently) is not found
and is re-encoded, so the trees stay those of the reference.

A kept entry holds the keys/values of every token of the path but the last: the last token was
chosen at the sentence's final step and is not always fed (the search stops once every group has
ended, and drops nodes whose groups have all ended), so the child level feeds it, which also gives
the first next-token logits. Positions need no change: the prompt and the path's tokens are the
same, padding is masked and skipped by the positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# (tree row of the prompt cache, the path's token ids after the prompt)
PathKey = tuple[int, tuple[int, ...]]


@dataclass
class _Block:
    """Rows of a decode cache after the prompt: per layer keys/values [b, Hkv, C, D]. With `nodes`
    (the cascade's shared node columns), row i's columns start with those of node `nodes[i]`
    (`node_keys`/`node_values` [n, Hkv, Cn, D], one copy per node) and the rows hold their own."""
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    nodes: list[int] | None = None
    node_keys: list[torch.Tensor] | None = None
    node_values: list[torch.Tensor] | None = None

    def row(self, layer: int, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Row i's keys and values after the prompt in `layer` ([Hkv, C, D])."""
        k, v = self.keys[layer][i], self.values[layer][i]
        if self.nodes is None:
            return k, v
        node = self.nodes[i]
        return (torch.cat([self.node_keys[layer][node], k], dim=1),
                torch.cat([self.node_values[layer][node], v], dim=1))


@dataclass
class PathKV:
    """One path's keys/values after the prompt, all layers: [layers, 2, Hkv, L, D] (L may be 0)."""
    kv: torch.Tensor

    @property
    def length(self) -> int:
        return self.kv.shape[-2]


@dataclass
class DecodeKV:
    """The kept keys/values of the candidates of one search level, found by their path's ids."""
    # key -> (the block holding its row, the row, the row's columns to keep, on the host)
    entries: dict[PathKey, tuple[_Block, int, torch.Tensor]] = field(default_factory=dict)

    def take(self, key: PathKey) -> PathKV | None:
        """The path's keys/values as one compact tensor (a copy), or None when none were kept."""
        found = self.entries.get(key)
        if found is None:
            return None
        block, row, columns = found
        columns = columns.to(block.keys[0].device)
        return PathKV(torch.stack([torch.stack([k[:, columns], v[:, columns]])
                                   for k, v in (block.row(layer, row) for layer in range(len(block.keys)))]))


class DecodeRecorder:
    """Follows one search over a cache whose rows are M nodes x G groups and keeps each row's
    columns after the prompt: at a drop (`keep`, before the rows leave) and at the end (`finish`,
    which leaves the level's `DecodeKV` in `decoded`).

    `node_keys[m]`: (tree row, the ids fed for node m after the prompt); `prompt_width`: the
    prompt's columns in the rows' attention mask (the copies path's cache holds them per row; the
    cascade cache keeps them apart, its rows start after them).
    """

    def __init__(self, node_keys: list[PathKey], num_groups: int, prompt_width: int):
        self.node_keys, self.G, self.prompt_width = node_keys, num_groups, prompt_width
        self.kept: dict[int, tuple[_Block, int]] = {}
        self.decoded = DecodeKV()

    def start_rows(self, attention: torch.Tensor) -> None:
        """The rows' mask [M*G, width] as the decode starts."""
        self.start = attention.shape[1] - self.prompt_width  # the decode's first column after the prompt
        # the real columns among those before it, per row, read to the host once (no device read per row)
        self.before = [[c for c, real in enumerate(row) if real] for row in attention[:, self.prompt_width:].tolist()]
        self.rows = torch.arange(attention.shape[0], device=attention.device)  # batch row -> original row

    def _record(self, cache, rows: torch.Tensor | None, width: int) -> None:
        def part(t: torch.Tensor) -> torch.Tensor:
            whole = t.shape[2] == width  # the cache holds only these columns (cascade)
            t = t[:, :, t.shape[2] - width:]
            if rows is not None:
                return t[rows]  # a copy of these rows only
            # the whole batch: a view where the cache holds just these columns, else a copy, so
            # that the rows' prompt copies (copies path) are not kept alive with them
            return t if whole else t.clone()
        nodes = getattr(cache, "nodes", None)
        if nodes is not None:  # cascade: the rows hold their own columns, their nodes the rest (shared)
            width -= cache.node_mask.shape[1]
        block = _Block([part(layer.keys) for layer in cache.layers], [part(layer.values) for layer in cache.layers])
        if nodes is not None:
            block.nodes = (nodes.groups if rows is None else nodes.groups[rows]).tolist()
            block.node_keys = [layer.node_keys for layer in cache.layers]
            block.node_values = [layer.node_values for layer in cache.layers]
        originals = self.rows if rows is None else self.rows[rows]
        for i, r in enumerate(originals.tolist()):
            self.kept[r] = (block, i)

    def keep(self, cache, keep: torch.Tensor, attention_width: int) -> None:
        """Before the batch keeps only rows `keep`: record the others."""
        gone = torch.ones(self.rows.numel(), dtype=torch.bool, device=keep.device)
        gone[keep] = False
        self._record(cache, torch.nonzero(gone).squeeze(1), attention_width - self.prompt_width)
        self.rows = self.rows[keep]

    def finish(self, cache, attention_width: int, cands) -> None:
        """Record the rows still in the batch; per candidate, the columns of its path but its last token."""
        self._record(cache, None, attention_width - self.prompt_width)
        for m, (tree, fed) in enumerate(self.node_keys):
            for g, cand in enumerate(cands[m]):
                r = m * self.G + g
                block, i = self.kept[r]
                columns = self.before[r] + list(range(self.start, self.start + cand.n_tokens - 1))
                self.decoded.entries[(tree, tuple(fed) + tuple(cand.token_ids))] = \
                    (block, i, torch.tensor(columns, dtype=torch.long))
