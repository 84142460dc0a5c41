"""The model side of the sentence search: turn tree nodes into K candidate next sentences.

For one image and prompt, the active nodes of a tree level are encoded together (left-padded,
prefix = chat prompt + sentences so far), then the G token-level groups of every node run as one
batch of M*G rows over a key/value cache that was filled once per node and repeated G times.
Like the official code, each node's prefix is re-tokenised from its text.
"""

from __future__ import annotations

import torch

from csr.generate.beam import Candidate, diverse_group_search
from csr.generate.tree import join_sentences


class LlavaExpander:
    def __init__(self, model, processor, *, num_candidates: int, diversity_penalty: float,
                 max_new_tokens: int, stop_ids: list[int], node_batch_size: int = 0):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.G = num_candidates
        self.diversity_penalty = diversity_penalty
        self.max_new_tokens = max_new_tokens
        self.stop_ids = stop_ids
        eos = self.tokenizer.eos_token_id
        self.eos_ids = [eos] if eos is not None else []
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        self.node_batch_size = node_batch_size

    def prefix_text(self, prompt_text: str, sentences: list[str]) -> str:
        response = join_sentences(sentences)
        return f"{prompt_text} {response}" if response else prompt_text

    @torch.no_grad()
    def expand(self, image, prompt_text: str, responses: list[list[str]]) -> list[list[tuple[str, Candidate]]]:
        """K (text, Candidate) children for each node, given each node's sentences so far."""
        out: list[list[tuple[str, Candidate]]] = []
        step = self.node_batch_size or len(responses)
        for start in range(0, len(responses), step):
            out.extend(self._expand_batch(image, prompt_text, responses[start:start + step]))
        return out

    def _expand_batch(self, image, prompt_text, responses):
        model, G = self.model, self.G
        texts = [self.prefix_text(prompt_text, r) for r in responses]
        self.tokenizer.padding_side = "left"
        enc = self.processor(images=[image] * len(texts), text=texts, padding=True, return_tensors="pt")
        enc = {k: v.to(model.device) for k, v in enc.items()}
        if "pixel_values" in enc:
            enc["pixel_values"] = enc["pixel_values"].to(model.dtype)
        # positions as generate() computes them, so left padding does not shift a row
        positions = (enc["attention_mask"].cumsum(dim=1) - 1).clamp(min=0)
        out = model(**enc, position_ids=positions, use_cache=True)
        cache = out.past_key_values
        cache.batch_repeat_interleave(G)
        attention = enc["attention_mask"].repeat_interleave(G, dim=0)

        def step(tokens: torch.Tensor) -> torch.Tensor:
            nonlocal attention
            attention = torch.cat([attention, attention.new_ones(attention.shape[0], 1)], dim=1)
            positions = attention.sum(dim=1, keepdim=True) - 1
            res = model(input_ids=tokens[:, None], attention_mask=attention, position_ids=positions,
                        past_key_values=cache, use_cache=True)
            return res.logits[:, -1]

        cands = diverse_group_search(out.logits[:, -1], step, num_groups=G,
                                     diversity_penalty=self.diversity_penalty,
                                     max_new_tokens=self.max_new_tokens, stop_ids=self.stop_ids,
                                     eos_ids=self.eos_ids, pad_id=self.pad_id)
        return [[(self.decode(c), c) for c in node_cands] for node_cands in cands]

    def decode(self, cand: Candidate) -> str:
        return self.tokenizer.decode(cand.token_ids, skip_special_tokens=True).strip()
