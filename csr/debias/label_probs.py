"""Model glue of closed-set calibration (`csr.debias.calibration`): the first answer token's label
probabilities of each question under the real image and under each content-free input
(`csr.content_free`: no image, ``<unk>``, a blank and a noise image), and the calibrated predictions
they give.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from csr.content_free import CALIBRATION_INPUTS, TEXT_ONLY_INPUTS, blank_or_noise_image, content_free_prompt
from csr.debias.calibration import (calibrate, content_free_estimate, label_scores, label_token_groups,
                                    label_token_index, normalise, predict, top_k_label_probs)

log = logging.getLogger(__name__)


def next_token_logits(model, enc: dict):
    """Next-token logits [B, V] after a left-padded batch (positions as generate() computes them)."""
    positions = (enc["attention_mask"].cumsum(dim=1) - 1).clamp(min=0)
    out = model(**enc, position_ids=positions, use_cache=False)
    return out.logits[:, -1].float()


def first_token_label_probs(model, processor, questions: Sequence[str], groups: Sequence[Sequence[int]], *,
                            images: Sequence | None = None, cf: str | None = None, batch_size: int = 16,
                            seed: int = 0, reader=None) -> np.ndarray:
    """[N, K] unnormalised label masses from the first answer token.

    cf=None: the real `images` (paths or PIL images); cf='none'/'unk': text only, no pixel values;
    cf='blank'/'noise': a content-free image of each real image's size (noise seeded by `seed`).
    `reader` maps next-token probabilities [B, V] to label scores [B, K]; default
    `label_scores(probs, groups)`.
    """
    import torch

    from csr.data import as_rgb_image
    from csr.models import build_chat_prompt, encode_left_padded

    if cf is not None and cf not in CALIBRATION_INPUTS:
        raise ValueError(f"unknown content-free input {cf!r}: choose from {CALIBRATION_INPUTS}")
    if cf in (None, "blank", "noise") and images is None:
        raise ValueError("images are needed for the real or blank/noise inputs")
    rng = np.random.default_rng(seed)
    rows = []
    with torch.no_grad():
        for start in range(0, len(questions), batch_size):
            prompts = [build_chat_prompt(processor, q) for q in questions[start:start + batch_size]]
            if cf in TEXT_ONLY_INPUTS:
                enc = encode_left_padded(processor, model, [content_free_prompt(p, processor, cf) for p in prompts],
                                         None)
            else:
                ims = [as_rgb_image(x) for x in images[start:start + batch_size]]
                if cf is not None:
                    ims = [blank_or_noise_image(cf, im.size, rng) for im in ims]
                enc = encode_left_padded(processor, model, prompts, ims)
            probs = torch.softmax(next_token_logits(model, enc), dim=-1).cpu().double().numpy()
            rows.append(reader(probs) if reader is not None else label_scores(probs, groups))
    return np.concatenate(rows, axis=0) if rows else np.zeros((0, len(groups)))


@dataclass
class ClosedSetScores:
    """First-token label masses of a closed-set eval: real input and each content-free input."""
    labels: list[str]
    groups: list[list[int]]
    p_raw: np.ndarray                                   # [N, K] real image
    p_cf_raw: dict = field(default_factory=dict)        # name -> [N, K]

    @property
    def p(self) -> np.ndarray:
        return normalise(self.p_raw)

    @property
    def label_mass(self) -> np.ndarray:
        """How much of the first-token probability the label set covers, per question."""
        return self.p_raw.sum(axis=1)


def score_closed_set(model, processor, images: Sequence, questions: Sequence[str], labels: Sequence[str], *,
                     cf_inputs: Iterable[str] = CALIBRATION_INPUTS, batch_size: int = 16, seed: int = 0,
                     merge_variants: bool = True, label_top_k: int = 0) -> ClosedSetScores:
    """Label masses for the real (image, question) pairs and for every content-free input.

    label_top_k = 0: each label's first tokens (`label_token_groups`, variants merged or not);
    k > 0: the authors' rule, the exact label token among the top k (`top_k_label_probs`).
    """
    labels = list(labels)
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images for {len(questions)} questions")
    if label_top_k < 0:
        raise ValueError(f"label_top_k must be >= 0, got {label_top_k}")
    reader = None
    if label_top_k:
        index = label_token_index(processor.tokenizer, labels)
        groups = [sorted(t for t, k in index.items() if k == j) for j in range(len(labels))]
        missing = [lab for lab, g in zip(labels, groups) if not g]
        if missing:
            raise ValueError(f"labels {missing} are no single token of this vocabulary: the top-k exact-token rule "
                             f"cannot score them (use label_top_k=0, the summed first tokens)")
        reader = lambda probs: top_k_label_probs(probs, index, len(labels), label_top_k)  # noqa: E731
    else:
        groups = label_token_groups(processor.tokenizer, labels, merge_variants)
    model.eval()
    p_raw = first_token_label_probs(model, processor, questions, groups, images=images, batch_size=batch_size,
                                    reader=reader)
    scores = ClosedSetScores(labels, groups, p_raw)
    for cf in cf_inputs:
        scores.p_cf_raw[cf] = first_token_label_probs(model, processor, questions, groups, images=images, cf=cf,
                                                      batch_size=batch_size, seed=seed, reader=reader)
        log.info("content-free '%s': mean p_cf %s", cf,
                 dict(zip(labels, np.round(normalise(scores.p_cf_raw[cf]).mean(axis=0), 3).tolist())))
    return scores


def calibrated_predictions(scores: ClosedSetScores, *, cf_inputs: Iterable[str] | None = None,
                           mode: str = "diag", per_sample: bool = True, combine: str = "mean",
                           epsilon: float = 0.0) -> dict:
    """{"q", "p_cf", "pred", "pred_uncalibrated"} for a subset of the scored content-free inputs."""
    names = list(cf_inputs) if cf_inputs is not None else list(scores.p_cf_raw)
    missing = [n for n in names if n not in scores.p_cf_raw]
    if missing:
        raise ValueError(f"content-free inputs {missing} were not scored (have {list(scores.p_cf_raw)})")
    p_cf = content_free_estimate([scores.p_cf_raw[n] for n in names], per_sample=per_sample, combine=combine,
                                 epsilon=epsilon)
    q = calibrate(scores.p_raw, p_cf, mode)
    return {"q": q, "p_cf": p_cf, "pred": predict(q, scores.labels),
            "pred_uncalibrated": predict(scores.p, scores.labels)}
