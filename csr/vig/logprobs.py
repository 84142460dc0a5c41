"""Model glue of VIG: the answer tokens' teacher-forced log-probs under the real image and under the
content-free input (`csr.content_free.vig_content_free_image`), batch by batch, and the VIG they give.

Content-free input I_cf (`VIGOptions.content_free`)
---------------------------------------------------
- ``blur`` (the paper's): a Gaussian-blurred copy of I. The paper does not state its blur strength;
  the default radius (0.1 of the shorter side) is the toolkit's choice. `blur_radius` is PIL's Gaussian radius
  (the standard deviation) in pixels of the original image (`blur_units=pixels`), or as a fraction of
  the image's shorter side (`blur_units=fraction`, the default: the same blur whatever the source
  resolution; 0.1 of a 336-px LLaVA-1.5 input is a 34-px sigma).
- ``none``: no image at all; the image placeholder is left out of the prompt.
- ``blank``: a plain image of the real image's size (`blank_color`, default white as `csr.debias`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from csr.content_free import BLUR_UNITS, VIG_INPUTS, WHITE, vig_content_free_image
from csr.vig.collate import BOS_MODES, sft_collator, vig_example
from csr.vig.maths import IGNORE_INDEX, vig_from_logprobs
from csr.vig.records import record_turns


# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------


@dataclass
class VIGOptions:
    content_free: str = "blur"
    blur_radius: float = 0.1
    blur_units: str = "fraction"
    blank_color: tuple = WHITE
    batch_size: int = 8
    max_length: int | None = None   # as SFTConfig.max_length of the training run (None: no truncation)
    add_bos: str = "auto"           # auto | always | never, as `sft_collator`: BOS first, as generation has it

    def validate(self) -> "VIGOptions":
        if self.content_free not in VIG_INPUTS:
            raise ValueError(f"content_free={self.content_free!r} is not one of {VIG_INPUTS}")
        if self.blur_units not in BLUR_UNITS:
            raise ValueError(f"blur_units={self.blur_units!r} is not one of {BLUR_UNITS}")
        if self.blur_radius < 0:
            raise ValueError(f"blur_radius={self.blur_radius} must be >= 0")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")
        if self.add_bos not in BOS_MODES:
            raise ValueError(f"add_bos={self.add_bos!r} is not one of {BOS_MODES}")
        if len(tuple(self.blank_color)) != 3:
            raise ValueError(f"blank_color={self.blank_color!r} must be three 0-255 values")
        self.blank_color = tuple(int(c) for c in self.blank_color)
        return self

    @classmethod
    def from_score_config(cls, score_cfg) -> "VIGOptions":
        """The options a CSR recipe's `score` section sets (the search and the score stage alike)."""
        return cls(content_free=score_cfg.vig_content_free, blur_radius=score_cfg.vig_blur_radius,
                   batch_size=score_cfg.vig_batch_size)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["blank_color"] = list(self.blank_color)
        return d


# ---------------------------------------------------------------------------------------------
# Log-probs under the image and the content-free input
# ---------------------------------------------------------------------------------------------


def _model_device_dtype(model):
    p = next(model.parameters())
    return p.device, p.dtype


@torch.no_grad()
def target_logprobs(model, inputs: dict, target_mask: torch.Tensor) -> list[list[float]]:
    """Teacher-forced log p(token_j | tokens_<j, image) at every position j where target_mask[b, j].

    `inputs` are the model's keyword inputs (input_ids, attention_mask, pixel_values, ...; `labels`
    is ignored). Returns one list per row, positions left to right. Only the selected positions'
    logits are normalised (in float32).
    """
    device, dtype = _model_device_dtype(model)
    batch = {}
    for k, v in inputs.items():
        if k == "labels" or not torch.is_tensor(v):
            continue
        v = v.to(device)
        batch[k] = v.to(dtype) if v.is_floating_point() else v
    logits = model(**batch, use_cache=False).logits
    sel = target_mask[:, 1:].to(device)
    if sel.any():
        picked = logits[:, :-1][sel].float().log_softmax(-1)
        targets = batch["input_ids"][:, 1:][sel]
        lp = picked.gather(-1, targets[:, None])[:, 0].cpu()
    else:
        lp = torch.zeros(0)
    counts = sel.sum(dim=1).tolist()
    out, start = [], 0
    for c in counts:
        out.append(lp[start:start + c].tolist())
        start += c
    return out


def _answer_logprobs(model, collator, examples: list[dict]) -> tuple[list[list[float]], list[list[int]]]:
    batch = collator(examples)
    mask = batch["labels"] != IGNORE_INDEX
    lps = target_logprobs(model, batch, mask)
    ids = [row[m].tolist() for row, m in zip(batch["input_ids"], mask)]
    return lps, ids


def answer_token_ids(processor, items: Sequence[dict], options: VIGOptions, collator=None) -> list[list[int]]:
    """The answer tokens of text-only items {turns | prompt, answer} (no image, so no VIG): collated only."""
    collator = collator or sft_collator(processor, options.max_length, add_bos=options.add_bos)
    batch = collator([vig_example(record_turns(it), None) for it in items])
    mask = batch["labels"] != IGNORE_INDEX
    return [row[m].tolist() for row, m in zip(batch["input_ids"], mask)]


def score_batch(model, processor, items: Sequence[dict], options: VIGOptions, collator=None) -> list[dict]:
    """VIG of a batch of {image: PIL, prompt, answer} or {image, turns: [{prompt, answer}, ...]}: token
    ids, log-probs under both inputs, VIG (over the tokens of every assistant turn)."""
    collator = collator or sft_collator(processor, options.max_length, add_bos=options.add_bos)
    real = [vig_example(record_turns(it), it["image"]) for it in items]
    cf = [vig_example(record_turns(it), vig_content_free_image(it["image"], options)) for it in items]
    lp_real, ids_real = _answer_logprobs(model, collator, real)
    lp_cf, ids_cf = _answer_logprobs(model, collator, cf)
    tok = processor.tokenizer
    out = []
    for it, a, ia, b, ib in zip(items, lp_real, ids_real, lp_cf, ids_cf):
        n = len(ia)
        if ib[:n] != ia:
            raise RuntimeError("the answer tokens under the content-free input differ from those under the image "
                               f"({ia[:8]}... vs {ib[:8]}...); the chat template must render the completion the "
                               f"same way with and without an image.")
        per_token, vig = vig_from_logprobs(a, b[:n])
        out.append({"n_tokens": n, "vig": vig, "vig_tokens": per_token, "logp_image": a, "logp_cf": b[:n],
                    "token_ids": ia, "tokens": [tok.decode([i]) for i in ia],
                    "ppl_image": math.exp(-sum(a) / n), "ppl_cf": math.exp(-sum(b[:n]) / n)})
    return out


def _score_chunk(model, processor, chunk, options, collator) -> list[dict]:
    """`score_batch` on the items with an image; text-only items get their answer tokens and no VIG."""
    with_image = [it for it in chunk if it.get("image") is not None]
    text_only = [it for it in chunk if it.get("image") is None]
    scored = iter(score_batch(model, processor, with_image, options, collator) if with_image else [])
    tok = processor.tokenizer
    plain = iter([{"n_tokens": len(ids), "vig": None, "vig_tokens": None, "text_only": True, "token_ids": ids,
                   "tokens": [tok.decode([i]) for i in ids]}
                  for ids in (answer_token_ids(processor, text_only, options, collator) if text_only else [])])
    return [next(plain) if it.get("image") is None else next(scored) for it in chunk]


def score_items(model, processor, items: Sequence[dict], options: VIGOptions, progress=None) -> list[dict]:
    """`score_batch` over many items in batches of `options.batch_size`; out of memory halves the batch."""
    from csr.models import in_halving_chunks

    options.validate()
    collator = sft_collator(processor, options.max_length, add_bos=options.add_bos)

    def run(chunk):
        scored = _score_chunk(model, processor, chunk, options, collator)
        if progress is not None:
            progress(len(chunk))
        return scored

    parts, _ = in_halving_chunks(list(items), options.batch_size, run, "VIG items", "batch_size")
    return [record for part in parts for record in part]
