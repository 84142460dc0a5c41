"""VIG scoring: per-token and per-sample Visual Information Gain of (image, prompt, answer) data.

    VIG_t = log p(a_t | a_<t, Q, I) − log p(a_t | a_<t, Q, I_cf)          (token level)
    VIG   = mean_t VIG_t = log( PPL(A | Q, I_cf) / PPL(A | Q, I) )         (sample level)

Which tokens are "the answer"
-----------------------------
Exactly the tokens TRL's `SFTTrainer` supervises for a vision processor on a prompt-completion
conversational record: the data are collated by TRL's own `DataCollatorForVisionLanguageModeling`
(`completion_only_loss=True`), which renders the prompt with the processor's chat template
(`add_generation_prompt=True`) and the completion as the rest of the rendered conversation (for
LLaVA-1.5: ``" <answer></s>"``, EOS included), tokenises both without special tokens, and labels the
completion tokens. VIG_t is computed at the positions whose label is not -100, in order, so the
j-th VIG_t of a sample is the j-th supervised token of that sample in training (`csr.vig.train`
relies on this). The content-free pass uses the same collator on the same completion, so the
answer tokens are identical by construction (checked, not assumed).

One deliberate addition (`add_bos`, default auto): TRL tokenises with add_special_tokens=False and
LLaVA-1.5's chat template renders no `<s>`, so TRL's sequences start without the BOS that generation
(`processor(text=...)`, `csr eval`) and LLaVA's own training put first. When the tokenizer adds BOS
on plain calls, `PrependBOS` puts it back (label -100), in scoring and in training alike, so both
stay aligned with each other and with inference. `add_bos=never` is TRL's collation unchanged.

Conversations (docs/method.md §3: LLaVA-665K is multi-turn, and text-only samples stay in)
-----------------------------------------------------------------------------------------
A record may hold several human/assistant turns (LLaVA's ``conversations``). With ``turns=all``
(the paper's reading, default) every assistant turn is an answer: VIG_t is computed on the tokens
of all of them, in order, each in the context of the turns before it, and the sample VIG is their
mean; ``turns=first`` reads the first human/assistant pair only (the toolkit's earlier behaviour).
Single-turn records with an image are collated by TRL's own collator, as above; multi-turn and
text-only records by `ConversationCollator`, which cuts the chat-template rendering at every
assistant turn and labels exactly the assistant segments (for a single-turn record it gives TRL's
tokens and labels, checked by a test). A record without an image is kept as a *text-only* sample
(``text_only=keep``, the paper's: no VIG, kept and supervised in full by selective training) or
skipped (``text_only=skip``). A record without any assistant turn is skipped; a trailing human turn
with no answer is dropped. All of these are counted in the stage summary.

Content-free input I_cf (`VIGOptions.content_free`)
---------------------------------------------------
- ``blur`` (the paper's): a Gaussian-blurred copy of I. The paper does not state its blur strength;
  the default radius (0.1 of the shorter side) is the toolkit's choice. `blur_radius` is PIL's Gaussian radius
  (the standard deviation) in pixels of the original image (`blur_units=pixels`), or as a fraction of
  the image's shorter side (`blur_units=fraction`, the default: the same blur whatever the source
  resolution; 0.1 of a 336-px LLaVA-1.5 input is a 34-px sigma).
- ``none``: no image at all; the image placeholder is left out of the prompt.
- ``blank``: a plain image of the real image's size (`blank_color`, default white as `csr.debias`).

Selection for training (docs/method.md §3: "keep the top p% of samples by VIG (default p = 70, threshold
τ = the p-th percentile), and inside kept samples compute the loss only on tokens with VIG_t >= τ")
-----------------------------------------------------------------------------------------------------
"τ = the p-th percentile" read literally (ascending, numpy's convention) contradicts "keep the top
p%": with p = 70 the 70th percentile keeps only the top 30%. This module reads it as the percentile
counted from the top, i.e. the **(100 − p)-th ascending percentile**: τ is the smallest sample VIG
among the kept top p% (`tau_mode="keep_boundary"`, the default), so that exactly the samples with
VIG >= τ are kept (k = ceil(n·p/100) of n; ties at the boundary are broken by dataset order) and
the same τ masks the tokens. `tau_mode="percentile"` is the literal reading: samples are still the
top p% by rank, but the token threshold is `numpy.percentile(sample_vigs, p)` (linear
interpolation), a stricter cut (more tokens masked).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from csr.content_free import BLUR_UNITS, VIG_INPUTS, WHITE, vig_content_free_image
from csr.data import BadInput, message_text, strip_image_token
from csr.models import PrependBOS, close_answer, tokenizer_adds_bos  # noqa: F401  (PrependBOS re-exported)

log = logging.getLogger(__name__)

TAU_MODES = ("keep_boundary", "percentile")
BOS_MODES = ("auto", "always", "never")
TURN_MODES = ("all", "first")
TEXT_ONLY_MODES = ("keep", "skip")
TURNS_KEY = "vig_turns"
SCORES_FILE = "vig.jsonl"
HISTOGRAM_FILE = "vig_histogram.png"
IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------
# Pure core
# ---------------------------------------------------------------------------------------------


def sample_vig(token_vigs: Sequence[float]) -> float:
    """Sample-level VIG: the mean of the per-token VIG (= log PPL_cf / PPL_image)."""
    if len(token_vigs) == 0:
        raise ValueError("a sample with no answer tokens has no VIG")
    return math.fsum(float(v) for v in token_vigs) / len(token_vigs)


def vig_from_logprobs(logp_image: Sequence[float], logp_cf: Sequence[float]) -> tuple[list[float], float]:
    """(per-token VIG, sample VIG) from the answer tokens' log-probs under the real and the content-free input.

    Both sequences hold log p(a_t | a_<t, Q, ·) of the same tokens in the same order.
    """
    a = [float(x) for x in logp_image]
    b = [float(x) for x in logp_cf]
    if len(a) != len(b):
        raise ValueError(f"log-prob sequences differ in length ({len(a)} vs {len(b)}): not the same tokens")
    per_token = [x - y for x, y in zip(a, b)]
    return per_token, sample_vig(per_token)


def n_kept(n: int, keep_percent: float) -> int:
    """How many of `n` samples the top `keep_percent`% is: ceil(n·p/100), at most n."""
    if not 0.0 <= keep_percent <= 100.0:
        raise ValueError(f"keep_percent={keep_percent} must be in [0, 100]")
    return min(n, math.ceil(round(n * keep_percent / 100.0, 9)))


def _sort_key(values: Sequence[float]):
    # NaN (should not happen) ranks last; ties keep dataset order
    return lambda i: (-(values[i] if values[i] == values[i] else -math.inf), i)


def select_samples(sample_vigs: Sequence[float], keep_percent: float = 70.0) -> list[bool]:
    """Which samples are in the top `keep_percent`% by VIG: exactly ceil(n·p/100) of them.

    Ties at the boundary are broken by dataset order (the earlier sample is kept).
    """
    n = len(sample_vigs)
    k = n_kept(n, keep_percent)
    order = sorted(range(n), key=_sort_key(sample_vigs))
    kept = set(order[:k])
    return [i in kept for i in range(n)]


def selection_threshold(sample_vigs: Sequence[float], keep_percent: float = 70.0,
                        tau_mode: str = "keep_boundary") -> float:
    """τ, the token threshold (see the module docstring for the two readings of docs/method.md).

    keep_boundary: the smallest sample VIG among the kept top p% (the (100 − p)-th percentile
    counted from below); +inf when nothing is kept. percentile: numpy.percentile(sample_vigs, p).
    """
    if tau_mode not in TAU_MODES:
        raise ValueError(f"tau_mode={tau_mode!r} is not one of {TAU_MODES}")
    values = [float(v) for v in sample_vigs]
    if not values:
        raise ValueError("no samples to take a threshold from")
    if tau_mode == "percentile":
        import numpy as np

        if not 0.0 <= keep_percent <= 100.0:
            raise ValueError(f"keep_percent={keep_percent} must be in [0, 100]")
        return float(np.percentile(np.asarray(values), keep_percent))
    k = n_kept(len(values), keep_percent)
    if k == 0:
        return math.inf
    order = sorted(range(len(values)), key=_sort_key(values))
    return values[order[k - 1]]


def token_keep_mask(token_vigs: Sequence[float], tau: float) -> list[bool]:
    """True where a token keeps its label: VIG_t >= τ."""
    return [float(v) >= tau for v in token_vigs]


@dataclass
class Selection:
    """The outcome of VIG selection over a scored dataset (one entry per sample, dataset order)."""

    tau: float
    keep_percent: float
    tau_mode: str
    token_mask: bool
    kept: list[bool]
    masks: list[list[bool] | None]          # per kept sample: keep flag per answer token; None if dropped
    token_counts: list[int] = field(default_factory=list)
    text_only: list[bool] = field(default_factory=list)   # samples with no image (kept, never masked)

    def stats(self) -> dict:
        total = sum(self.token_counts)
        in_kept = sum(n for n, k in zip(self.token_counts, self.kept) if k)
        supervised = sum(sum(m) for m in self.masks if m is not None)
        kept = sum(self.kept)
        return {
            "tau": self.tau, "tau_mode": self.tau_mode, "keep_percent": self.keep_percent,
            "token_mask": self.token_mask,
            "samples_total": len(self.kept), "samples_kept": kept,
            "tokens_total": total, "tokens_in_kept_samples": in_kept, "tokens_supervised": supervised,
            "share_tokens_supervised": supervised / total if total else 0.0,
            "share_tokens_supervised_in_kept": supervised / in_kept if in_kept else 0.0,
            "kept_samples_without_supervised_tokens": sum(1 for m in self.masks if m is not None and not any(m)),
            "text_only_samples": sum(self.text_only),
            "text_only_tokens": sum(n for n, t in zip(self.token_counts, self.text_only) if t),
        }


def plan_selection(token_vigs: Sequence[Sequence[float]], keep_percent: float = 70.0,
                   tau_mode: str = "keep_boundary", token_mask: bool = True,
                   sample_vigs: Sequence[float] | None = None) -> Selection:
    """Samples kept and per-token label masks for VIG-selective training.

    `token_vigs[i]` is sample i's per-token VIG; `sample_vigs` defaults to their means. With
    keep_percent=100 and token_mask=False this is plain SFT (everything kept and supervised).
    """
    if sample_vigs is None:
        sample_vigs = [sample_vig(t) for t in token_vigs]
    if len(sample_vigs) != len(token_vigs):
        raise ValueError("sample_vigs and token_vigs differ in length")
    kept = select_samples(sample_vigs, keep_percent)
    tau = selection_threshold(sample_vigs, keep_percent, tau_mode) if len(sample_vigs) else math.inf
    masks: list[list[bool] | None] = []
    for toks, k in zip(token_vigs, kept):
        if not k:
            masks.append(None)
        else:
            masks.append(token_keep_mask(toks, tau) if token_mask else [True] * len(toks))
    return Selection(tau=tau, keep_percent=keep_percent, tau_mode=tau_mode, token_mask=token_mask,
                     kept=kept, masks=masks, token_counts=[len(t) for t in token_vigs])


def plan_records_selection(records: Sequence[dict], keep_percent: float = 70.0, tau_mode: str = "keep_boundary",
                           token_mask: bool = True) -> Selection:
    """`plan_selection` over scored records (`csr vig score` output), text-only samples included.

    Records with a VIG are ranked and masked as `plan_selection` does; text-only records (``vig``
    None: no image, so no VIG) are kept with every answer token supervised, outside the ranking and
    outside τ (the paper keeps them unmasked).
    """
    scored = [i for i, r in enumerate(records) if r.get("vig") is not None]
    inner = plan_selection([records[i]["vig_tokens"] for i in scored], keep_percent, tau_mode, token_mask,
                           sample_vigs=[records[i]["vig"] for i in scored]) if scored else None
    n = len(records)
    kept: list[bool] = [True] * n
    masks: list[list[bool] | None] = [[True] * int(r["n_tokens"]) for r in records]
    for j, i in enumerate(scored):
        kept[i], masks[i] = inner.kept[j], inner.masks[j]
    return Selection(tau=inner.tau if inner else math.inf, keep_percent=keep_percent, tau_mode=tau_mode,
                     token_mask=token_mask, kept=kept, masks=masks,
                     token_counts=[int(r["n_tokens"]) for r in records],
                     text_only=[r.get("vig") is None for r in records])


def apply_token_masks(labels: torch.Tensor, masks: Sequence[Sequence[bool] | None],
                      ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """A copy of `labels` (B, L) with VIG-masked answer tokens set to `ignore_index`.

    Row b's label positions (labels != ignore_index), left to right, are its answer tokens in order;
    the j-th keeps its label iff masks[b][j]. None keeps the row as is. A row with fewer label
    positions than mask entries (cut by max_length) uses the first entries of its mask; a row with
    more is an error (the scores do not belong to this tokenisation).
    """
    out = labels.clone()
    if len(masks) != labels.shape[0]:
        raise ValueError(f"{len(masks)} masks for a batch of {labels.shape[0]} rows")
    for b, m in enumerate(masks):
        if m is None:
            continue
        pos = (labels[b] != ignore_index).nonzero(as_tuple=True)[0]
        if len(pos) > len(m):
            raise ValueError(f"row {b} has {len(pos)} supervised tokens but its VIG mask covers {len(m)}: the "
                             f"scores were computed on another tokenisation (another model, chat template or "
                             f"max_length?). Rescore with `csr vig score` for this model.")
        keep = torch.tensor([bool(x) for x in m[:len(pos)]], dtype=torch.bool, device=labels.device)
        out[b, pos[~keep]] = ignore_index
    return out


def summarize_vigs(sample_vigs: Sequence[float], token_vigs: Sequence[Sequence[float]] = ()) -> dict:
    """Distribution summary of sample VIG (and of token VIG when given)."""
    import numpy as np

    v = np.asarray([float(x) for x in sample_vigs], dtype=float)
    out = {"samples": int(v.size)}
    if v.size:
        out.update(mean=float(v.mean()), std=float(v.std()), min=float(v.min()), max=float(v.max()),
                   percentiles={str(p): float(np.percentile(v, p)) for p in (10, 30, 50, 70, 90)},
                   share_samples_positive=float((v > 0).mean()))
    flat = [float(x) for t in token_vigs for x in t]
    if flat:
        t = np.asarray(flat)
        out.update(tokens=int(t.size), token_mean=float(t.mean()), share_tokens_positive=float((t > 0).mean()))
    return out


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
# Model glue
# ---------------------------------------------------------------------------------------------


def sft_example(prompt: str, answer: str, image=None) -> dict:
    """One record in TRL's prompt-completion conversational format (what `csr vig train` trains on).

    With `image=None` the prompt holds no image placeholder (the `none` content-free input).
    """
    content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": prompt}]
    return {"prompt": [{"role": "user", "content": content}],
            "completion": [{"role": "assistant", "content": [{"type": "text", "text": answer}]}],
            "images": [image] if image is not None else []}


def record_turns(rec: dict) -> list[dict]:
    """A record's turns [{prompt, answer}, ...]: its `turns`, else its one prompt and answer."""
    return rec.get("turns") or [{"prompt": rec["prompt"], "answer": rec["answer"]}]


def vig_example(turns: Sequence[dict], image=None) -> dict:
    """A scoring / training example for any record: TRL's prompt-completion columns of the first turn
    (what TRL's collator reads for a single-turn record with an image) plus every turn under
    `TURNS_KEY` (what `ConversationCollator` reads)."""
    ex = sft_example(turns[0]["prompt"], turns[0]["answer"], image)
    ex[TURNS_KEY] = [{"prompt": t["prompt"], "answer": t["answer"]} for t in turns]
    return ex


def conversation_messages(turns: Sequence[dict], with_image: bool) -> list[dict]:
    """Chat messages of a conversation; the image (if any) goes first in the first user turn."""
    msgs = []
    for k, t in enumerate(turns):
        content = ([{"type": "image"}] if with_image and k == 0 else []) + [{"type": "text", "text": t["prompt"]}]
        msgs.append({"role": "user", "content": content})
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": t["answer"]}]})
    return msgs


def conversation_segments(processor, messages: Sequence[dict]) -> list[tuple[str, bool]]:
    """The chat-template rendering of a conversation cut into (text, is_answer) segments.

    Before assistant turn i: the rendering of messages[:i] with the generation prompt; the answer is
    what the rendering of messages[:i + 1] adds to it (as TRL splits prompt and completion). The
    template must render each prefix as a prefix of the next (LLaVA's and Vicuna's do).
    """
    segs, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = processor.apply_chat_template(list(messages[:i]), add_generation_prompt=True, tokenize=False)
        full = processor.apply_chat_template(list(messages[:i + 1]), tokenize=False)
        if not head.startswith(done) or not full.startswith(head):
            raise ValueError("the chat template does not render a conversation's turns as prefixes of each other; "
                             "multi-turn VIG needs one that does (use turns=first)")
        # every answer of the data is whole: closed by EOS whatever the template renders
        segs += [(head[len(done):], False), (close_answer(full[len(head):], processor), True)]
        done = full
    return segs


class ConversationCollator:
    """Multi-turn and text-only examples (`TURNS_KEY` + ``images``) into model inputs and labels.

    Each example's rendering is cut by `conversation_segments`; the first segment goes through the
    processor with the image (placeholder expanded, pixel values), the others through the tokenizer
    alone, all without special tokens (as TRL tokenises prompt and completion). Labels are the tokens
    of the assistant segments, -100 elsewhere; rows are right-padded and cut at `max_length`.
    """

    PER_TOKEN_KEYS = ("token_type_ids", "mm_token_type_ids")

    def __init__(self, processor, max_length: int | None = None):
        self.processor = processor
        self.max_length = max_length

    def _example(self, ex: dict):
        images = ex.get("images") or []
        image = images[0] if images else None
        segs = conversation_segments(self.processor, conversation_messages(ex[TURNS_KEY], image is not None))
        tok = self.processor.tokenizer
        ids, labels, extra = [], [], {}
        for k, (text, is_answer) in enumerate(segs):
            if k == 0 and image is not None:
                enc = self.processor(text=[text], images=[image], return_tensors="pt", add_special_tokens=False)
                bad = [key for key in self.PER_TOKEN_KEYS if key in enc]
                if bad:
                    raise NotImplementedError(f"multi-turn / text-only VIG collation does not handle {bad} (this "
                                              f"model's processor); use turns=first and text_only=skip")
                part = enc["input_ids"][0].tolist()
                extra = {key: v for key, v in enc.items() if key not in ("input_ids", "attention_mask")}
            else:
                part = tok(text, add_special_tokens=False)["input_ids"]
            ids += part
            labels += part if is_answer else [IGNORE_INDEX] * len(part)
        if self.max_length is not None:
            ids, labels = ids[:self.max_length], labels[:self.max_length]
        return ids, labels, extra

    def __call__(self, examples: list[dict]) -> dict:
        rows = [self._example(ex) for ex in examples]
        tok = self.processor.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        length = max(len(ids) for ids, _, _ in rows)
        input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(rows), length), dtype=torch.long)
        for b, (ids, lab, _) in enumerate(rows):
            input_ids[b, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            labels[b, :len(lab)] = torch.tensor(lab, dtype=torch.long)
            attention[b, :len(ids)] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention}
        extras = [e for _, _, e in rows if e]
        for key in (extras[0] if extras else {}):
            batch[key] = torch.cat([e[key] for e in extras], dim=0)
        batch["labels"] = labels
        return batch


class VIGCollator:
    """TRL's vision collator for batches of single-turn examples that all have an image (or all have
    none), exactly as SFTTrainer collates them; `ConversationCollator` for any batch holding a
    multi-turn example or mixing examples with and without an image."""

    def __init__(self, trl_collator, conversation: ConversationCollator):
        self.trl = trl_collator
        self.conversation = conversation

    def _closed(self, ex: dict) -> dict:
        """A conversational prompt-completion example rendered as TRL renders it, its answer closed by
        EOS (`csr.models.close_answer`); TRL collates the plain text the same way."""
        from trl.data_utils import apply_chat_template, is_conversational, prepare_multimodal_messages

        ex = {k: v for k, v in ex.items() if k != TURNS_KEY}
        if not is_conversational(ex):
            return ex
        messages = {"prompt": prepare_multimodal_messages(ex["prompt"], images=ex.get("images")),
                    "completion": prepare_multimodal_messages(ex["completion"])}
        text = apply_chat_template(messages, self.trl.processor)
        return {**ex, "prompt": text["prompt"], "completion": close_answer(text["completion"], self.trl.processor)}

    def __call__(self, examples: list[dict]) -> dict:
        single = all(len(ex.get(TURNS_KEY) or [None]) == 1 for ex in examples)
        has_image = [bool(ex.get("images")) for ex in examples]
        if single and (all(has_image) or not any(has_image)):
            return self.trl([self._closed(ex) for ex in examples])
        missing = [i for i, ex in enumerate(examples) if not ex.get(TURNS_KEY)]
        if missing:
            raise ValueError(f"examples {missing} lack '{TURNS_KEY}': build them with csr.vig.score.vig_example")
        return self.conversation(examples)


def sft_collator(processor, max_length: int | None = None, pad_to_multiple_of: int | None = None,
                 add_bos: str = "auto"):
    """TRL's vision collator as SFTTrainer builds it for prompt-completion data (loss on the completion),
    with `ConversationCollator` for multi-turn and text-only examples (`VIGCollator`).

    add_bos: "auto" (default) prepends BOS when the tokenizer adds one on plain calls (LLaVA's does)
    and the chat template does not render it, so that training, VIG scoring and generation see the
    same sequence start; "always" / "never" force it on / off ("never": exactly TRL's own collation).
    """
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    trl_inner = DataCollatorForVisionLanguageModeling(processor=processor, max_length=max_length,
                                                      completion_only_loss=True, pad_to_multiple_of=pad_to_multiple_of)
    inner = VIGCollator(trl_inner, ConversationCollator(processor, max_length))
    tok = processor.tokenizer
    if add_bos not in BOS_MODES:
        raise ValueError(f"add_bos={add_bos!r} is not one of {BOS_MODES}")
    if add_bos == "always" or (add_bos == "auto" and tokenizer_adds_bos(tok)):
        if tok.bos_token_id is None:
            raise ValueError("add_bos is on but the tokenizer has no BOS token")
        return PrependBOS(inner, tok.bos_token_id)
    return inner


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


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

PROMPT_KEYS = ("prompt", "input", "question")
ANSWER_KEYS = ("answer", "response", "output", "completion")


HUMAN_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")


def _conversation_turns(convs: list, notes: list) -> list[dict]:
    """[{prompt, answer}] from LLaVA's alternating human/gpt list; irregularities noted in `notes`."""
    turns, pending = [], None
    for c in convs:
        if not isinstance(c, dict):
            notes.append("malformed_turn_dropped")
            continue
        role = c.get("from", c.get("role"))
        value = c.get("value", c.get("content"))
        if isinstance(value, list):
            value = message_text([c])
        if role in HUMAN_ROLES:
            if pending is not None:           # two human turns in a row: one question
                notes.append("consecutive_human_turns_joined")
                pending = pending + "\n" + (value or "")
            else:
                pending = value or ""
        elif role in ASSISTANT_ROLES:
            if pending is None:
                notes.append("assistant_turn_without_question_dropped")
            elif not isinstance(value, str) or not value.strip():
                notes.append("empty_assistant_turn_dropped")
                pending = None
            else:
                turns.append({"prompt": pending, "answer": value})
                pending = None
        else:
            notes.append("turn_with_unknown_role_dropped")
    if pending is not None:
        notes.append("trailing_human_turn_dropped")
    return turns


def parse_record(raw: dict, index: int, turns: str = "all", text_only: str = "keep") -> dict:
    """{id, image, prompt, answer[, turns, text_only, notes]} from one input record; raises BadInput with a reason.

    Accepted: {image, prompt|input|question, answer|response|output|completion} (the world's
    train/sft.jsonl), LLaVA's {image, conversations: [{from: human}, {from: gpt}, ...]} and TRL's
    conversational prompt/completion with `images`. `turns`: all (every human/assistant pair of a
    conversation; the paper's) or first. `text_only`: keep (a record with no image is a text-only
    sample, image None; the paper's) or skip (BadInput no_image). `prompt` / `answer` are the first
    turn's; `turns` is present when there is more than one; `notes` lists dropped or joined turns.
    """
    if turns not in TURN_MODES:
        raise ValueError(f"turns={turns!r} is not one of {TURN_MODES}")
    if text_only not in TEXT_ONLY_MODES:
        raise ValueError(f"text_only={text_only!r} is not one of {TEXT_ONLY_MODES}")
    rid = str(raw.get("id", index))
    notes: list[str] = []
    if isinstance(raw.get("conversations"), list):
        pairs = _conversation_turns(raw["conversations"], notes)
    else:
        prompt = answer = None
        for k in PROMPT_KEYS:
            if k in raw:
                prompt = raw[k]
                break
        for k in ANSWER_KEYS:
            if k in raw:
                answer = raw[k]
                break
        if isinstance(prompt, list):
            prompt = message_text(prompt)
        if isinstance(answer, list):
            answer = message_text(answer)
        if not isinstance(prompt, str) or not strip_image_token(prompt):
            raise BadInput("no_prompt", f"record '{rid}' has no prompt ({'/'.join(PROMPT_KEYS)} or conversations).")
        if not isinstance(answer, str) or not answer.strip():
            raise BadInput("no_answer", f"record '{rid}' has no answer ({'/'.join(ANSWER_KEYS)} or conversations).")
        pairs = [{"prompt": prompt, "answer": answer}]
    pairs = [{"prompt": strip_image_token(t["prompt"] or ""), "answer": t["answer"].strip()}
             for t in pairs]
    if pairs and not pairs[0]["prompt"]:
        raise BadInput("no_prompt", f"record '{rid}' has no question before its first answer.")
    if not pairs:
        raise BadInput("no_answer", f"record '{rid}' has no assistant turn.")
    if turns == "first" and len(pairs) > 1:
        notes.append(f"later_turns_not_read:{len(pairs) - 1}")
        pairs = pairs[:1]
    image = raw.get("image")
    if image is None and isinstance(raw.get("images"), list) and raw["images"]:
        image = raw["images"][0]
    if not isinstance(image, str) or not image:
        if text_only == "skip":
            raise BadInput("no_image", f"record '{rid}' has no image path.")
        image = None
    rec = {"id": rid, "image": image, "prompt": pairs[0]["prompt"], "answer": pairs[0]["answer"]}
    if len(pairs) > 1:
        rec["turns"] = pairs
    if image is None:
        rec["text_only"] = True
    if notes:
        rec["notes"] = notes
    return rec


def read_records(path: str | Path, image_root: str | Path | None = None, limit: int | None = None,
                 summary=None, turns: str = "all", text_only: str = "keep") -> list[dict]:
    """VIG samples of a data file (`csr.data.read_raw_records`: JSON list, JSONL or ``datasets`` folder);
    images resolved against `image_root`, else the file's folder (`csr.data.resolve_image_path`).

    With a `summary` (`csr.io.StageSummary`), skipped records are counted by reason and
    `summary.extra["records"]` counts text-only samples, multi-turn samples, turns read, and turns
    dropped or joined (by reason).
    """
    from collections import Counter

    from csr.data import image_root_of, read_raw_records, resolve_image_path

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file '{path}' does not exist.")
    root = image_root_of(path, image_root)
    out, seen = [], set()
    counts: Counter = Counter()
    for i, raw in enumerate(read_raw_records(path)):
        try:
            rec = parse_record(raw, i, turns=turns, text_only=text_only)
            if rec["id"] in seen:
                raise BadInput("duplicate_id", f"id '{rec['id']}' appears more than once; later copy skipped.")
        except BadInput as e:
            if summary is not None:
                summary.skip(e.reason, f"record {i}")
            else:
                log.warning("skipped record %d: %s", i, e)
            continue
        if rec["image"] is not None:
            rec["image"] = str(resolve_image_path(rec["image"], root, allow_absolute=True, resolve=False,
                                                  record=f"'{rec['id']}'"))
        for k in ("kind", "category"):
            if k in raw and isinstance(raw[k], (str, int, float)):
                rec[k] = raw[k]
        for note in rec.pop("notes", []):
            counts[note] += 1
        counts["text_only_kept"] += int(rec.get("text_only", False))
        counts["multi_turn"] += int("turns" in rec)
        counts["turns_read"] += len(record_turns(rec))
        seen.add(rec["id"])
        out.append(rec)
        if limit is not None and len(out) >= limit:
            break
    if summary is not None:
        summary.extra["records"] = {"turns": turns, "text_only": text_only, **dict(counts)}
    return out


# ---------------------------------------------------------------------------------------------
# Stage: csr vig score
# ---------------------------------------------------------------------------------------------


def _batched(seq, size):
    for i in range(0, len(seq), size):
        yield seq[i:i + size]


def run_vig_score(model_path: str, data_path: str | Path, out_dir: str | Path, options: VIGOptions, *,
                  image_root: str | None = None, limit: int | None = None, device: str = "auto",
                  dtype: str = "auto", model=None, processor=None, turns: str = "all",
                  text_only: str = "keep") -> dict:
    """Score a dataset into `<out_dir>/vig.jsonl` (resumable), with a histogram and DONE.json."""
    from tqdm.auto import tqdm

    from csr.data import load_image
    from csr.io import (JsonlAppender, StageSummary, is_done, iter_jsonl, mark_done, read_done,
                        repair_jsonl_tail)

    options.validate()
    out_dir = Path(out_dir)
    if is_done(out_dir):
        log.info("[vig score] %s is finished; skipping", out_dir)
        return read_done(out_dir)
    t0 = time.time()
    summary = StageSummary("vig score")
    records = read_records(data_path, image_root, limit, summary, turns=turns, text_only=text_only)
    scores_path = out_dir / SCORES_FILE
    repair_jsonl_tail(scores_path)
    finished = {r["id"] for r in iter_jsonl(scores_path)} if scores_path.exists() else set()
    todo = [r for r in records if r["id"] not in finished]
    if model is None:
        from csr.models import load_policy

        model, processor = load_policy(model_path, dtype=dtype, device=device)
    with JsonlAppender(scores_path) as sink, tqdm(total=len(todo), desc="vig score", unit="sample") as bar:
        for batch in _batched(todo, max(options.batch_size * 4, 1)):
            items = []
            for rec in batch:
                try:
                    items.append({**rec, "image_path": rec["image"],
                                  "image": load_image(rec["image"]) if rec["image"] is not None else None})
                except BadInput as e:
                    summary.skip(e.reason, f"record {rec['id']} ({e})")
            scored = score_items(model, processor, items, options, progress=bar.update)
            for it, s in zip(items, scored):
                rec = {k: v for k, v in it.items() if k not in ("image", "image_path")}
                sink.write({"id": rec.pop("id"), "image": it["image_path"], **rec, **s})
                summary.processed += 1
    all_records = [r for r in iter_jsonl(scores_path) if r.get("vig") is not None]   # text-only: no VIG
    stats = summarize_vigs([r["vig"] for r in all_records], [r["vig_tokens"] for r in all_records])
    hist = None
    if all_records:
        from csr.vig.view import histogram_png

        tau = selection_threshold([r["vig"] for r in all_records], 70.0)
        hist = str(histogram_png([r["vig"] for r in all_records], out_dir / HISTOGRAM_FILE, tau=tau,
                                 title=f"sample VIG ({options.content_free})", keep_percent=70.0))
    summary.extra.update(model=str(model_path), data=str(data_path), options=options.as_dict(),
                         scores=str(scores_path), histogram=hist, stats=stats,
                         tau_keep70={m: selection_threshold([r["vig"] for r in all_records], 70.0, m)
                                     for m in TAU_MODES} if all_records else None,
                         seconds=round(time.time() - t0, 2))
    summary.log()
    mark_done(out_dir, summary.as_dict())
    return summary.as_dict()


def read_scores(path: str | Path) -> list[dict]:
    """The records of a `csr vig score` output (its folder or its vig.jsonl)."""
    from csr.io import read_jsonl

    p = Path(path)
    if p.is_dir():
        p = p / SCORES_FILE
    if not p.is_file():
        raise FileNotFoundError(f"VIG scores '{p}' do not exist: run `csr vig score` first.")
    return read_jsonl(p)
