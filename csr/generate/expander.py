"""The model side of the sentence search: turn tree nodes into K candidate next sentences.

Two implementations with the same results:

- `LlavaExpander` (the reference, the official per-node semantics): every node's prefix
  (image + chat prompt + sentences so far) is re-tokenised from its text and encoded from scratch,
  image included; with `node_batch_size=1` it is exactly the official one-node-at-a-time loop.
- `CachedLlavaExpander` (the fast path): each tree's image and prompt are encoded once, in a batch
  with other trees, and their key/value cache is kept for the whole tree. A tree level starts each
  node from the keys/values its own decode computed for its sentences (`decode_kv.py`: fed the
  node's last token only), for all active nodes of all trees in flight at once; a node whose ids
  the reference would feed differ from the decoded ones (the text re-tokenises differently) has its
  sentences encoded on top of the shared prefix cache instead. The node's text is then tokenised
  jointly with the prompt, as the reference does; the shared prefix is used only where that
  tokenisation starts with the prompt's own tokens.

Both then run the G token-level groups of every node as one batch of rows (see `beam.py`); a node
whose groups have all ended leaves the batch. In the fast path the rows read their tree's prompt
keys/values either from one copy per tree (`generate.prefix_attention: cascade`, `cascade.py`) or
from a copy each (`copies`, `kvcache.py`).

Positions are passed explicitly, as generate() computes them for left-padded rows, for every class
in `csr.models.SUPPORTED_CLASSES`. With 3-D multimodal rope (Qwen2.5-VL) the prefix's positions
come from the model's own `get_rope_index` (the image grid takes fewer positions than tokens); every
text token after it sits at its 1-D position plus that row's offset, on all three rope axes.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from transformers import DynamicCache

from csr.generate.beam import Candidate, diverse_group_search
from csr.generate.cascade import CascadeCache, cascade_attention, unsupported_reason
from csr.generate.decode_kv import DecodeKV, DecodeRecorder, PathKV
from csr.generate.kvcache import select_rows
from csr.models import ContinuationDecoder, class_of, in_halving_chunks, output_cache, placeholder_ids, with_cache
from csr.tree_format import prefix_text

log = logging.getLogger(__name__)

Children = list[tuple[str, Candidate]]
# How a node's next level is conditioned: on exactly the tokens generated so far (csr), or on the
# decoded text re-tokenised with the prompt (the released code; a sentence's first token can change).
CONTINUATIONS = ("tokens", "text")
# How the fast path's rows read their prompt's keys/values (generate.prefix_attention).
PREFIX_ATTENTION = ("copies", "cascade")


def prefix_tokens(prefix) -> list[int] | None:
    """The generated token ids a tree prefix carries (`csr.generate.tree.Prefix`), or None."""
    return getattr(prefix, "token_ids", None)


class LlavaExpander:
    def __init__(self, model, processor, *, num_candidates: int, diversity_penalty: float,
                 max_new_tokens: int, stop_ids: list[int], node_batch_size: int = 0, debias=None,
                 eos_stops: bool = True, continuation: str = "tokens"):
        if continuation not in CONTINUATIONS:
            raise ValueError(f"unknown continuation '{continuation}' ({', '.join(CONTINUATIONS)})")
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.G = num_candidates
        self.diversity_penalty = diversity_penalty
        self.max_new_tokens = max_new_tokens
        self.stop_ids = stop_ids
        self.eos_stops = eos_stops  # False: only the period tokens stop a sentence (official code)
        self.continuation = continuation
        self._text_of = ContinuationDecoder(self.tokenizer)
        self.suppress_ids = placeholder_ids(processor)
        eos = self.tokenizer.eos_token_id
        self.eos_ids = [eos] if eos is not None else []
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        self.node_batch_size = node_batch_size
        self.debias = debias  # csr.debias.sampling.DebiasedCandidates, or None
        self.mrope = class_of(model).mrope
        # token-rows through the language model: prefill (image, prompt and, in the reference, the
        # node's sentences), node (the cached path's sentences on top of the prompt cache) and
        # decode (one per row per step); nodes whose decode keys/values were reused or re-encoded
        self.counts: Counter = Counter()

    # -- shared pieces ---------------------------------------------------------------------------

    def _text_positions(self, attention: torch.Tensor, offsets: torch.Tensor, n: int) -> torch.Tensor:
        """Positions of the last `n` columns of left-padded rows, all text: padding skipped, plus the
        row's offset; the same on the three rope axes with multimodal rope."""
        positions = (attention.cumsum(dim=1) - 1).clamp(min=0)[:, -n:] + offsets[:, None]
        return positions[None].expand(3, -1, -1) if self.mrope else positions

    def decode(self, cand: Candidate) -> str:
        """The candidate's exact text as it reads after earlier text (a leading '▁' is a space, newlines stay)."""
        return self._text_of(cand.token_ids, skip_special_tokens=True)

    def _uses_tokens(self, prefixes) -> bool:
        return self.continuation == "tokens" and all(prefix_tokens(p) is not None for p in prefixes)

    def _search(self, first_logits: torch.Tensor, cache: DynamicCache, attention: torch.Tensor,
                offsets: torch.Tensor, prefix_texts: list[str], recorder: DecodeRecorder | None = None
                ) -> list[Children]:
        """Run the G groups of every row of `first_logits` over `cache` (rows = nodes).

        A node whose groups have all ended leaves the batch (its rows and their cache go). With a
        `recorder`, the rows' keys/values after the prompt are kept for the children (`decode_kv`).
        """
        G = self.G
        if isinstance(cache, CascadeCache):  # a node's G rows share its columns, as its tree's rows the prompt
            cache.share_per_node(G, attention[:, cache.prefix_mask.shape[1]:])
        else:
            cache.batch_repeat_interleave(G)
        attention = attention.repeat_interleave(G, dim=0)
        offsets = offsets.repeat_interleave(G, dim=0)
        if recorder is not None:
            recorder.start_rows(attention)

        def step(tokens: torch.Tensor) -> torch.Tensor:
            nonlocal attention
            attention = torch.cat([attention, attention.new_ones(attention.shape[0], 1)], dim=1)
            self.counts["decode"] += tokens.shape[0]
            res = self._forward(cache, input_ids=tokens[:, None], attention_mask=attention,
                                position_ids=self._text_positions(attention, offsets, 1))
            return res.logits[:, -1]

        def keep_rows(rows: torch.Tensor) -> None:
            nonlocal attention, offsets
            if recorder is not None:
                recorder.keep(cache, rows, attention.shape[1])
            cache.batch_select_indices(rows)
            attention, offsets = attention[rows], offsets[rows]

        if self.debias is not None:  # contrastive against the image-free model (its own cache)
            first_logits, step, keep_rows = self.debias.wrap(first_logits, step, prefix_texts, G, keep_rows)
        cands = diverse_group_search(first_logits, step, num_groups=G, diversity_penalty=self.diversity_penalty,
                                     max_new_tokens=self.max_new_tokens, stop_ids=self.stop_ids,
                                     eos_ids=self.eos_ids, pad_id=self.pad_id, eos_stops=self.eos_stops,
                                     suppress_ids=self.suppress_ids, keep_rows=keep_rows)
        if recorder is not None:
            recorder.finish(cache, attention.shape[1], cands)
        return [[(self.decode(c), c) for c in node_cands] for node_cands in cands]

    def _forward(self, cache, **inputs):
        """A forward that appends to `cache`; over a `CascadeCache`, with the shared-prefix attention."""
        if isinstance(cache, CascadeCache):
            with cascade_attention(self.model):
                return self.model(**inputs, **with_cache(self.model, cache), cascade=cache, use_cache=True)
        return self.model(**inputs, **with_cache(self.model, cache), use_cache=True)

    def _append_tokens(self, enc: dict, extra: list[list[int]]) -> dict:
        """`enc` (left-padded processor output) with each row's `extra` token ids after its text, re-padded."""
        per_token = [k for k in ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids") if k in enc]
        mask = enc["attention_mask"].bool()
        rows = []
        for r, ids in enumerate(extra):
            row = {k: enc[k][r][mask[r]].tolist() for k in per_token}
            row["input_ids"] += ids
            row["attention_mask"] += [1] * len(ids)
            for k in per_token[2:]:
                row[k] += [0] * len(ids)  # text tokens
            rows.append(row)
        width = max(len(row["input_ids"]) for row in rows)
        fill = {"input_ids": self.pad_id}
        out = dict(enc)
        for k in per_token:
            out[k] = torch.tensor([[fill.get(k, 0)] * (width - len(row[k])) + row[k] for row in rows],
                                  dtype=enc[k].dtype)
        return out

    def _encode(self, images: list, texts: list[str], extra_tokens: list[list[int]] | None = None):
        """Left-padded forward of full prefixes, positioned as generate() positions them.

        `extra_tokens`: per row, token ids to append after the text (a node's generated tokens, put
        after its prompt exactly as generated). Returns (model output, attention mask, per-row
        offset of the text positions that follow). The processor's extra inputs (LLaVA-NeXT's
        image_sizes, Qwen's image_grid_thw and mm_token_type_ids) go to the model as they are.
        """
        self.tokenizer.padding_side = "left"
        enc = self.processor(images=images, text=texts, padding=True, return_tensors="pt")
        if extra_tokens is not None and any(extra_tokens):
            enc = self._append_tokens(enc, extra_tokens)
        enc = {k: v.to(self.model.device) for k, v in enc.items()}
        if "pixel_values" in enc:
            enc["pixel_values"] = enc["pixel_values"].to(self.model.dtype)
        attention = enc["attention_mask"]
        if self.mrope:
            positions, offsets = self.model.model.get_rope_index(
                enc["input_ids"], enc["mm_token_type_ids"], image_grid_thw=enc.get("image_grid_thw"),
                attention_mask=attention)
            offsets = offsets[:, 0].to(attention.device)
        else:
            offsets = torch.zeros(attention.shape[0], dtype=torch.long, device=attention.device)
            positions = self._text_positions(attention, offsets, attention.shape[1])
        self.counts["prefill"] += enc["input_ids"].numel()
        out = self.model(**enc, position_ids=positions, use_cache=True)
        return out, attention, offsets

    def _in_chunks(self, items: list, run) -> list:
        """Apply `run` to chunks of `node_batch_size` items; out of memory halves it (kept for later calls)."""
        parts, self.node_batch_size = in_halving_chunks(items, self.node_batch_size, run, "nodes",
                                                         "generate.node_batch_size")
        return [children for part in parts for children in part]

    # -- the reference path ----------------------------------------------------------------------

    @torch.no_grad()
    def expand(self, image, prompt_text: str, responses: list[list[str]]) -> list[Children]:
        """K (text, Candidate) children for each node of one tree, given each node's sentences so far."""
        def run(chunk):
            texts = [prefix_text(prompt_text, r) for r in chunk]
            if self._uses_tokens(chunk):  # the prompt, then the node's tokens exactly as generated
                out, attention, offsets = self._encode([image] * len(chunk), [prompt_text] * len(chunk),
                                                       [prefix_tokens(r) for r in chunk])
            else:
                out, attention, offsets = self._encode([image] * len(texts), texts)
            return self._search(out.logits[:, -1], output_cache(out), attention, offsets, texts)
        return self._in_chunks(responses, run)


@dataclass
class PromptCache:
    """The encoded (image, prompt) prefixes of the trees in flight, one row per tree."""
    cache: DynamicCache
    attention: torch.Tensor        # [T, L] left-padded mask
    offsets: torch.Tensor          # [T] what text positions after the prompt add (3-D rope; else 0)
    last_logits: torch.Tensor      # [T, V] next-token logits right after the prompt
    prompt_ids: list[list[int]]    # each prompt's own tokens (image placeholder unexpanded)
    images: list
    prompt_texts: list[str]
    # the last level's candidates' keys/values after the prompt, for their children (decode_kv.py)
    decoded: DecodeKV = field(default_factory=DecodeKV)


class NodeStart(NamedTuple):
    """How the cached path starts a node: the ids it feeds on top of its path's kept keys/values."""
    row: int                # the tree's row in the PromptCache
    sentences: list[str]    # the node's sentences so far (a tree.Prefix)
    feed: list[int]         # ids fed on top of the prompt (and `kept`): the path's, or its last one
    kept: PathKV | None     # the path's keys/values from its parent's decode, but its last token
    path: list[int]         # the path's ids after the prompt, as the reference feeds them


class CachedLlavaExpander(LlavaExpander):
    """The fast path: a prompt cache per tree, all trees' active nodes expanded together.

    `prefix_attention`: "cascade" keeps one copy of each tree's prompt keys/values that all its
    rows read (`csr.generate.cascade`); "copies" gives every row its own copy. Both are exact; a
    model whose attention the cascade cannot honour gets the copies, with one log line.
    `reuse_decode_kv`: a node's children start from the keys/values its own decode computed
    (`csr.generate.decode_kv`) instead of re-encoding its path's tokens; exact, as the node is
    looked up by the token ids the reference would feed.
    """

    def __init__(self, model, processor, *, prefix_attention: str = "cascade", reuse_decode_kv: bool = True,
                 **kwargs):
        super().__init__(model, processor, **kwargs)
        self.reuse_decode_kv = reuse_decode_kv
        if prefix_attention not in PREFIX_ATTENTION:
            raise ValueError(f"unknown generate.prefix_attention '{prefix_attention}' ({', '.join(PREFIX_ATTENTION)})")
        reason = unsupported_reason(model) if prefix_attention == "cascade" else None
        if reason:
            log.warning("generate.prefix_attention=cascade does not support this model (%s): using copies", reason)
            prefix_attention = "copies"
        self.prefix_attention = prefix_attention

    def _text_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    @torch.no_grad()
    def encode_prompts(self, images: list, prompt_texts: list[str]) -> PromptCache:
        out, attention, offsets = self._encode(images, prompt_texts)
        return PromptCache(output_cache(out), attention, offsets, out.logits[:, -1],
                           [self._text_ids(t) for t in prompt_texts], list(images), list(prompt_texts))

    @torch.no_grad()
    def expand_many(self, prompts: PromptCache, requests: list[tuple[int, list[str]]]) -> list[Children]:
        """Children for (tree row, sentences so far) requests drawn from any trees in `prompts`."""
        plan = []  # (tree row, sentences, the ids the reference feeds after the prompt, or None)
        for row, sentences in requests:
            if self._uses_tokens([sentences]):  # continue from exactly the generated tokens
                plan.append((row, sentences, list(prefix_tokens(sentences))))
                continue
            full = self._text_ids(prefix_text(prompts.prompt_texts[row], sentences))
            head = prompts.prompt_ids[row]
            shared = full[:len(head)] == head
            plan.append((row, sentences, full[len(head):] if shared else None))
        fallback = [i for i, p in enumerate(plan) if p[2] is None]
        if fallback:  # the joint tokenisation crossed the prompt's end: encode those from scratch
            log.debug("%d nodes re-encoded in full (tokenisation crosses the prompt boundary)", len(fallback))
        results: list[Children | None] = [None] * len(plan)
        for i in fallback:
            row, sentences, _ = plan[i]
            results[i] = self.expand(prompts.images[row], prompts.prompt_texts[row], [sentences])[0]
        cached = [(i, self._start_from(prompts.decoded, *plan[i])) for i, p in enumerate(plan) if p[2] is not None]
        prompts.decoded = DecodeKV()  # what this level needs was taken (copied): free the rest
        for (i, _), children in zip(cached, self._in_chunks([node for _, node in cached],
                                                            lambda chunk: self._expand_cached(prompts, chunk))):
            results[i] = children
        return results

    def _start_from(self, decoded: DecodeKV, row: int, sentences, ids: list[int]) -> NodeStart:
        """A node whose path ids are exactly those its parent's decode ran (found under them) feeds its
        last token only; any other is re-encoded from its ids (counted)."""
        if ids and self.reuse_decode_kv:
            kept = decoded.take((row, tuple(ids)))
            if kept is not None:
                self.counts["kv_reused"] += 1
                return NodeStart(row, sentences, ids[-1:], kept, ids)
        if ids:
            self.counts["kv_reencoded"] += 1
        return NodeStart(row, sentences, ids, None, ids)

    def _expand_cached(self, prompts: PromptCache, chunk: list[NodeStart]) -> list[Children]:
        device = prompts.attention.device
        rows = torch.tensor([node.row for node in chunk], device=device)
        kept = [node.kept for node in chunk]
        kept_width = max((k.length for k in kept if k is not None), default=0)
        width = max(len(node.feed) for node in chunk)
        room = kept_width + width + self.max_new_tokens + 1  # the columns this level adds after the prompt
        if self.prefix_attention == "cascade":  # one prompt copy per tree, shared by its rows
            cache = CascadeCache(prompts.cache, prompts.attention, rows, reserve=room)
        else:
            cache = select_rows(prompts.cache, rows, reserve=room)
        attention, offsets = prompts.attention[rows], prompts.offsets[rows]
        prompt_width = attention.shape[1]
        first = prompts.last_logits[rows]
        if kept_width:
            # the paths' kept keys/values, left-padded to one width after the prompt (masked; the
            # positions skip the padding, as they skipped it when the keys were computed)
            mask = torch.zeros((len(chunk), kept_width), dtype=attention.dtype, device=device)
            for j, k in enumerate(kept):
                if k is not None and k.length:
                    mask[j, kept_width - k.length:] = 1
            for i, layer in enumerate(cache.layers):
                layer.append_left_padded([k.kv[i] if k is not None and k.length else None for k in kept],
                                         kept_width)
            attention = torch.cat([attention, mask], dim=1)
        if width:
            # the ids to feed (a reused path's last token, else the sentences so far), left-padded so
            # every row ends at the same column; the padding is masked out, and positions skip it
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long, device=device)
            mask = torch.zeros((len(chunk), width), dtype=attention.dtype, device=device)
            for j, node in enumerate(chunk):
                if node.feed:
                    ids[j, width - len(node.feed):] = torch.tensor(node.feed, device=device)
                    mask[j, width - len(node.feed):] = 1
            attention = torch.cat([attention, mask], dim=1)
            self.counts["node"] += ids.numel()
            out = self._forward(cache, input_ids=ids, attention_mask=attention,
                                position_ids=self._text_positions(attention, offsets, width))
            has_text = torch.tensor([bool(node.feed) for node in chunk], device=device)
            first = torch.where(has_text[:, None], out.logits[:, -1], first)
        texts = [prefix_text(prompts.prompt_texts[node.row], node.sentences) for node in chunk]
        recorder = None
        if self.reuse_decode_kv:
            recorder = DecodeRecorder([(node.row, tuple(node.path)) for node in chunk], self.G, prompt_width)
        children = self._search(first, cache, attention, offsets, texts, recorder)
        if recorder is not None:
            prompts.decoded.entries.update(recorder.decoded.entries)
        return children
