"""Debias sampling (docs/method.md §2, Zhang et al. 2024): contrastive decoding against a content-free
branch.

With logits ``l`` from (image, text) and ``l_cf`` from the same text with no image,

    l' = (1 + α) l - α l_cf,

then every token whose *original* logit is below ``log β + max(l)`` is dropped (adaptive
plausibility: keep tokens with p(y) >= β max p under the image-conditioned model), then the usual
temperature / top-k / top-p and sampling, or arg-max. Defaults α = 1, β = 0.1.

The content-free branch (`ContentFreeBranch`) is built from text alone: it takes the chat prompt,
removes the image placeholder (``none``), replaces it with the unknown token (``unk``), or runs
both and averages their logits (``mean``), and keeps its own key/value cache. It has no argument
through which image features could reach it, and every batch it encodes is checked to hold no
pixel values and no image placeholder tokens (`csr.content_free.check_text_only`).

Entry points:
- `debias_logits` / `debiased_logprobs`: the pure rule on two logit tensors.
- `debiased_generate`: a decode loop (greedy or sampling) with one KV cache per branch.
- `DebiasedCandidates`: debias sampling as a candidate-generation mode of the CSR generator; it
  wraps `csr.generate.beam.diverse_group_search`'s ``first_logits`` and ``step``.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Sequence

import torch

from csr.content_free import SAMPLING_INPUTS, TEXT_ONLY_INPUTS, content_free_prompt
from csr.data import as_rgb_image
from csr.models import encode_left_padded, output_cache, with_cache

log = logging.getLogger(__name__)

DEFAULT_ALPHA = 1.0
DEFAULT_BETA = 0.1


# ---------------------------------------------------------------------------------------------
# The rule
# ---------------------------------------------------------------------------------------------


def plausible(logits: torch.Tensor, beta: float) -> torch.Tensor:
    """Bool mask of the tokens kept by the adaptive plausibility cutoff on `logits` [.., V]:
    ``logit >= log β + max logit`` (β = 0 keeps everything)."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    if beta == 0.0:
        return torch.ones_like(logits, dtype=torch.bool)
    cutoff = math.log(beta) + logits.max(dim=-1, keepdim=True).values
    return logits >= cutoff


def debias_logits(logits: torch.Tensor, cf_logits: torch.Tensor, alpha: float = DEFAULT_ALPHA,
                  beta: float = DEFAULT_BETA) -> torch.Tensor:
    """``(1 + α) l - α l_cf`` with tokens below ``log β + max(l)`` (on the original `logits`) set to -inf."""
    if logits.shape != cf_logits.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and content-free logits {tuple(cf_logits.shape)} differ")
    l = logits.float()
    out = (1.0 + alpha) * l - alpha * cf_logits.float() if alpha else l.clone()
    return out.masked_fill(~plausible(l, beta), float("-inf"))


def debiased_logprobs(logits: torch.Tensor, cf_logits: torch.Tensor, alpha: float = DEFAULT_ALPHA,
                      beta: float = DEFAULT_BETA) -> torch.Tensor:
    """Log-softmax of `debias_logits`: the debiased next-token distribution (-inf off the cutoff)."""
    return torch.log_softmax(debias_logits(logits, cf_logits, alpha, beta), dim=-1)


def warp(scores: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Temperature, then top-k, then top-p (transformers' own warpers, in generate()'s order)."""
    from transformers.generation import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    if temperature is not None and temperature != 1.0:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k:
        scores = TopKLogitsWarper(int(top_k))(None, scores)
    if top_p is not None and top_p < 1.0:
        scores = TopPLogitsWarper(float(top_p))(None, scores)
    return scores


def choose(scores: torch.Tensor, *, do_sample: bool, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens [B] from scores [B, V]: arg-max, or a sample after `warp`."""
    if not do_sample:
        return scores.argmax(dim=-1)
    probs = torch.softmax(warp(scores, temperature=temperature, top_k=top_k, top_p=top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


# ---------------------------------------------------------------------------------------------
# Branches with their own caches
# ---------------------------------------------------------------------------------------------


class _Branch:
    """One model input stream with its key/value cache and left-padded attention mask."""

    def __init__(self, model):
        self.model = model
        self.cache = None
        self.attention: torch.Tensor | None = None

    @torch.no_grad()
    def _prefill(self, enc: dict) -> torch.Tensor:
        positions = (enc["attention_mask"].cumsum(dim=1) - 1).clamp(min=0)
        out = self.model(**enc, position_ids=positions, use_cache=True)
        self.cache, self.attention = output_cache(out), enc["attention_mask"]
        return out.logits[:, -1].float()

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row [B]; next-token logits [B, V]."""
        self.attention = torch.cat([self.attention, self.attention.new_ones(self.attention.shape[0], 1)], dim=1)
        positions = self.attention.sum(dim=1, keepdim=True) - 1
        out = self.model(input_ids=tokens[:, None].to(self.attention.device), attention_mask=self.attention,
                         position_ids=positions, **with_cache(self.model, self.cache), use_cache=True)
        self.cache = output_cache(out)
        return out.logits[:, -1].float()

    def repeat_interleave(self, n: int) -> None:
        """Each row repeated n times (rows i*n .. i*n+n-1 copy row i)."""
        if n == 1:
            return
        self.cache.batch_repeat_interleave(n)
        self.attention = self.attention.repeat_interleave(n, dim=0)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Only rows `rows` stay (their cache and mask)."""
        self.cache.batch_select_indices(rows)
        self.attention = self.attention[rows]


class ImageBranch(_Branch):
    """The ordinary (image, text) stream."""

    def __init__(self, model, processor):
        super().__init__(model)
        self.processor = processor

    def prefill(self, images: Sequence, prompts: Sequence[str]) -> torch.Tensor:
        return self._prefill(encode_left_padded(self.processor, self.model, list(prompts),
                                                [as_rgb_image(x) for x in images]))


class _TextOnlyBranch(_Branch):
    def __init__(self, model, processor, mode: str):
        super().__init__(model)
        self.processor, self.mode = processor, mode

    def prefill(self, prompts: Sequence[str]) -> torch.Tensor:
        texts = [content_free_prompt(p, self.processor, self.mode) for p in prompts]
        return self._prefill(encode_left_padded(self.processor, self.model, texts, None))  # checked text-only


class ContentFreeBranch:
    """The content-free stream: the prompt without its image, with its own KV cache.

    mode 'none' removes the image placeholder, 'unk' puts the unknown token in its place, 'mean'
    runs both and averages their logits. `prefill` takes prompt texts only (each holding the image
    placeholder, as `csr.models.build_chat_prompt` writes them); there is no image argument.
    """

    def __init__(self, model, processor, mode: str = "none"):
        if mode not in SAMPLING_INPUTS:
            raise ValueError(f"unknown content-free mode {mode!r}: choose from {SAMPLING_INPUTS}")
        self.mode = mode
        modes = TEXT_ONLY_INPUTS if mode == "mean" else (mode,)
        self.branches = [_TextOnlyBranch(model, processor, m) for m in modes]

    @staticmethod
    def _combine(logits: list[torch.Tensor]) -> torch.Tensor:
        return logits[0] if len(logits) == 1 else torch.stack(logits).mean(dim=0)

    def prefill(self, prompts: Sequence[str]) -> torch.Tensor:
        return self._combine([b.prefill(prompts) for b in self.branches])

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._combine([b.step(tokens) for b in self.branches])

    def repeat_interleave(self, n: int) -> None:
        for b in self.branches:
            b.repeat_interleave(n)

    def select_rows(self, rows: torch.Tensor) -> None:
        for b in self.branches:
            b.select_rows(rows)


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------


def _eos_ids(model, tokenizer, eos_token_ids) -> set[int]:
    """The given stop ids; by default the model's generation_config EOS ids (as generate() uses them),
    else the tokenizer's EOS."""
    if eos_token_ids is None:
        eos_token_ids = getattr(model.generation_config, "eos_token_id", None)
        if eos_token_ids is None:
            eos_token_ids = tokenizer.eos_token_id
    if eos_token_ids is None:
        return set()
    return {int(eos_token_ids)} if isinstance(eos_token_ids, int) else {int(i) for i in eos_token_ids}


@torch.no_grad()
def debiased_generate(model, processor, images: Sequence, questions: Sequence[str], alpha: float = DEFAULT_ALPHA,
                      beta: float = DEFAULT_BETA, max_new_tokens: int = 96, do_sample: bool = False,
                      temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, cf_mode: str = "none", *,
                      batch_size: int = 8, seed: int | None = None, eos_token_ids=None,
                      prompts: Sequence[str] | None = None) -> list[str]:
    """Answers to (image, question) pairs with debias sampling, in input order.

    Each batch runs the image branch and the content-free branch (`ContentFreeBranch`, `cf_mode`)
    side by side, each with its own KV cache; at every step the next token is chosen from
    `debias_logits` (then temperature / top-k / top-p when `do_sample`). α = 0 skips the
    content-free branch: with β = 0 that is plain greedy decoding or sampling. `images` are paths
    or PIL images; `prompts` (full chat prompts with the image placeholder) replace
    `build_chat_prompt(processor, question)` when given. `seed` makes sampling reproducible.
    """
    from csr.models import build_chat_prompt

    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images for {len(questions)} questions")
    tok = processor.tokenizer
    eos = _eos_ids(model, tok, eos_token_ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (min(eos) if eos else 0)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if (do_sample and seed is not None) else None
    model.eval()
    texts: list[str] = []
    for start in range(0, len(questions), batch_size):
        qs = list(questions[start:start + batch_size])
        ps = list(prompts[start:start + batch_size]) if prompts is not None else \
            [build_chat_prompt(processor, q) for q in qs]
        image_branch = ImageBranch(model, processor)
        logits = image_branch.prefill(images[start:start + batch_size], ps)
        cf_branch = ContentFreeBranch(model, processor, cf_mode) if alpha else None
        cf_logits = cf_branch.prefill(ps) if cf_branch is not None else None
        B = len(qs)
        out = [[] for _ in range(B)]
        done = torch.zeros(B, dtype=torch.bool, device=device)
        for t in range(max_new_tokens):
            scores = debias_logits(logits, cf_logits, alpha, beta) if cf_branch is not None else \
                debias_logits(logits, logits, 0.0, beta)
            nxt = choose(scores, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                         generator=generator)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            for i in torch.nonzero(~done).flatten().tolist():
                tid = int(nxt[i])
                if tid in eos:
                    done[i] = True
                else:
                    out[i].append(tid)
            if bool(done.all()) or t == max_new_tokens - 1:
                break
            logits = image_branch.step(nxt)
            if cf_branch is not None:
                cf_logits = cf_branch.step(nxt)
        texts += [s.strip() for s in tok.batch_decode(out, skip_special_tokens=True)]
    return texts


# ---------------------------------------------------------------------------------------------
# Candidate-generation mode of the CSR generator
# ---------------------------------------------------------------------------------------------


class DebiasedCandidates:
    """Debias sampling inside `csr.generate.beam.diverse_group_search` (the CSR sentence search).

    `wrap(first_logits, step, prefix_texts, num_groups, keep_rows)` returns a new
    ``(first_logits, step, keep_rows)`` for the search: a content-free branch is encoded for the M node prefixes (the expander's
    full prefix texts: chat prompt with the image placeholder + sentences so far), repeated G times
    like the image cache, and fed the same chosen tokens; every logit row the search sees is
    `debias_logits(l, l_cf, alpha, beta)`. The candidates' stored log-probs are then those of the
    debiased distribution. The returned `keep_rows` also drops the content-free rows of nodes that
    leave the search's batch.
    """

    def __init__(self, model, processor, *, alpha: float = DEFAULT_ALPHA, beta: float = DEFAULT_BETA,
                 cf_mode: str = "none"):
        self.model, self.processor = model, processor
        self.alpha, self.beta, self.cf_mode = alpha, beta, cf_mode
        ContentFreeBranch(model, processor, cf_mode)  # validate the mode now

    @torch.no_grad()
    def wrap(self, first_logits: torch.Tensor, step: Callable[[torch.Tensor], torch.Tensor],
             prefix_texts: Sequence[str], num_groups: int,
             keep_rows: Callable[[torch.Tensor], None] | None = None):
        """The search's first logits, step and `keep_rows` (rows leaving the batch), debiased: returns
        (first_logits, step, keep_rows), the last dropping the content-free branch's rows as well."""
        if len(prefix_texts) != first_logits.shape[0]:
            raise ValueError(f"{len(prefix_texts)} prefix texts for {first_logits.shape[0]} nodes")
        branch = ContentFreeBranch(self.model, self.processor, self.cf_mode)
        cf_first = branch.prefill(prefix_texts).to(first_logits.device)
        branch.repeat_interleave(num_groups)
        alpha, beta = self.alpha, self.beta

        @torch.no_grad()
        def debiased_step(tokens: torch.Tensor) -> torch.Tensor:
            logits = step(tokens)
            return debias_logits(logits, branch.step(tokens).to(logits.device), alpha, beta)

        def keep_both(rows: torch.Tensor) -> None:
            if keep_rows is not None:
                keep_rows(rows)
            branch.select_rows(rows)

        return debias_logits(first_logits, cf_first, alpha, beta), debiased_step, keep_both
