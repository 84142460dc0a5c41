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

Content-free input I_cf (`VIGOptions.content_free`)
---------------------------------------------------
- ``blur`` (the paper's): a Gaussian-blurred copy of I. `blur_radius` is PIL's Gaussian radius
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

from csr.models import PrependBOS, tokenizer_adds_bos  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

CONTENT_FREE = ("blur", "none", "blank")
TAU_MODES = ("keep_boundary", "percentile")
BLUR_UNITS = ("fraction", "pixels")
BOS_MODES = ("auto", "always", "never")
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
# Content-free inputs
# ---------------------------------------------------------------------------------------------


@dataclass
class VIGOptions:
    content_free: str = "blur"
    blur_radius: float = 0.1
    blur_units: str = "fraction"
    blank_color: tuple = (255, 255, 255)
    batch_size: int = 8
    max_length: int | None = None   # as SFTConfig.max_length of the training run (None: no truncation)
    add_bos: str = "auto"           # auto | always | never, as `sft_collator`: BOS first, as generation has it

    def validate(self) -> "VIGOptions":
        if self.content_free not in CONTENT_FREE:
            raise ValueError(f"content_free={self.content_free!r} is not one of {CONTENT_FREE}")
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

    def as_dict(self) -> dict:
        d = asdict(self)
        d["blank_color"] = list(self.blank_color)
        return d


def blur_pixels(image, options: VIGOptions) -> float:
    """The Gaussian radius in pixels of `image` that `options` asks for."""
    if options.blur_units == "pixels":
        return float(options.blur_radius)
    return float(options.blur_radius) * min(image.size)


def content_free_image(image, options: VIGOptions):
    """The content-free counterpart of a PIL image: blurred copy, blank image, or None (no image)."""
    from PIL import Image, ImageFilter

    if options.content_free == "none":
        return None
    if options.content_free == "blank":
        return Image.new("RGB", image.size, tuple(options.blank_color))
    return image.convert("RGB").filter(ImageFilter.GaussianBlur(blur_pixels(image, options)))


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


def sft_collator(processor, max_length: int | None = None, pad_to_multiple_of: int | None = None,
                 add_bos: str = "auto"):
    """TRL's vision collator as SFTTrainer builds it for prompt-completion data (loss on the completion).

    add_bos: "auto" (default) prepends BOS when the tokenizer adds one on plain calls (LLaVA's does)
    and the chat template does not render it, so that training, VIG scoring and generation see the
    same sequence start; "always" / "never" force it on / off ("never": exactly TRL's own collation).
    """
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    inner = DataCollatorForVisionLanguageModeling(processor=processor, max_length=max_length,
                                                  completion_only_loss=True, pad_to_multiple_of=pad_to_multiple_of)
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


def score_batch(model, processor, items: Sequence[dict], options: VIGOptions, collator=None) -> list[dict]:
    """VIG of a batch of {image: PIL, prompt, answer}: token ids, log-probs under both inputs, VIG."""
    collator = collator or sft_collator(processor, options.max_length, add_bos=options.add_bos)
    real = [sft_example(it["prompt"], it["answer"], it["image"]) for it in items]
    cf = [sft_example(it["prompt"], it["answer"], content_free_image(it["image"], options)) for it in items]
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


def score_items(model, processor, items: Sequence[dict], options: VIGOptions, progress=None) -> list[dict]:
    """`score_batch` over many items in batches of `options.batch_size`; out of memory halves the batch."""
    from csr.models import is_oom

    options.validate()
    collator = sft_collator(processor, options.max_length, add_bos=options.add_bos)
    out: list[dict] = []
    size, i = options.batch_size, 0
    while i < len(items):
        chunk = items[i:i + size]
        try:
            out.extend(score_batch(model, processor, chunk, options, collator))
        except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
            if not is_oom(e) or size == 1:
                raise
            size = max(1, size // 2)
            log.warning("vig: out of memory; batch size halved to %d", size)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        i += len(chunk)
        if progress is not None:
            progress(len(chunk))
    return out


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

PROMPT_KEYS = ("prompt", "input", "question")
ANSWER_KEYS = ("answer", "response", "output", "completion")


def _message_text(messages) -> str:
    parts = []
    for m in messages:
        c = m.get("content")
        if isinstance(c, str):
            parts.append(c)
        elif isinstance(c, list):
            parts.extend(x.get("text", "") for x in c if isinstance(x, dict) and x.get("type") == "text")
    return "".join(parts)


def parse_record(raw: dict, index: int) -> dict:
    """{id, image, prompt, answer} from one input record; raises BadInput with a reason.

    Accepted: {image, prompt|input|question, answer|response|output|completion} (the world's
    train/sft.jsonl), LLaVA's {image, conversations: [{from: human}, {from: gpt}]}, and TRL's
    conversational prompt/completion with `images`.
    """
    from csr.data import IMAGE_TOKEN, BadInput

    rid = str(raw.get("id", index))
    prompt = answer = None
    if isinstance(raw.get("conversations"), list):
        human = next((c for c in raw["conversations"] if c.get("from") in ("human", "user")), None)
        gpt = next((c for c in raw["conversations"] if c.get("from") in ("gpt", "assistant")), None)
        prompt, answer = (human or {}).get("value"), (gpt or {}).get("value")
    else:
        for k in PROMPT_KEYS:
            if k in raw:
                prompt = raw[k]
                break
        for k in ANSWER_KEYS:
            if k in raw:
                answer = raw[k]
                break
        if isinstance(prompt, list):
            prompt = _message_text(prompt)
        if isinstance(answer, list):
            answer = _message_text(answer)
    if not isinstance(prompt, str) or not prompt.replace(IMAGE_TOKEN, "").strip():
        raise BadInput("no_prompt", f"record '{rid}' has no prompt ({'/'.join(PROMPT_KEYS)} or conversations).")
    if not isinstance(answer, str) or not answer.strip():
        raise BadInput("no_answer", f"record '{rid}' has no answer ({'/'.join(ANSWER_KEYS)} or conversations).")
    image = raw.get("image")
    if image is None and isinstance(raw.get("images"), list) and raw["images"]:
        image = raw["images"][0]
    if not isinstance(image, str) or not image:
        raise BadInput("no_image", f"record '{rid}' has no image path.")
    return {"id": rid, "image": image, "prompt": prompt.replace(IMAGE_TOKEN, "").strip(), "answer": answer.strip()}


def read_records(path: str | Path, image_root: str | Path | None = None, limit: int | None = None,
                 summary=None) -> list[dict]:
    """Records of a JSON list or JSONL file; images resolved against `image_root`, else the file's folder."""
    from csr.data import BadInput, _read_raw

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file '{path}' does not exist.")
    root = Path(image_root) if image_root else (path if path.is_dir() else path.parent)
    out, seen = [], set()
    for i, raw in enumerate(_read_raw(path)):
        try:
            rec = parse_record(raw, i)
            if rec["id"] in seen:
                raise BadInput("duplicate_id", f"id '{rec['id']}' appears more than once; later copy skipped.")
        except BadInput as e:
            if summary is not None:
                summary.skip(e.reason, f"record {i}")
            else:
                log.warning("skipped record %d: %s", i, e)
            continue
        img = Path(rec["image"])
        rec["image"] = str(img if img.is_absolute() else root / img)
        for k in ("kind", "category"):
            if k in raw and isinstance(raw[k], (str, int, float)):
                rec[k] = raw[k]
        seen.add(rec["id"])
        out.append(rec)
        if limit is not None and len(out) >= limit:
            break
    return out


# ---------------------------------------------------------------------------------------------
# Stage: csr vig score
# ---------------------------------------------------------------------------------------------


def _batched(seq, size):
    for i in range(0, len(seq), size):
        yield seq[i:i + size]


def run_vig_score(model_path: str, data_path: str | Path, out_dir: str | Path, options: VIGOptions, *,
                  image_root: str | None = None, limit: int | None = None, device: str = "auto",
                  dtype: str = "auto", model=None, processor=None) -> dict:
    """Score a dataset into `<out_dir>/vig.jsonl` (resumable), with a histogram and DONE.json."""
    from tqdm.auto import tqdm

    from csr.data import BadInput, load_image
    from csr.io import (JsonlAppender, StageSummary, is_done, iter_jsonl, mark_done, read_done,
                        repair_jsonl_tail)

    options.validate()
    out_dir = Path(out_dir)
    if is_done(out_dir):
        log.info("[vig score] %s is finished; skipping", out_dir)
        return read_done(out_dir)
    t0 = time.time()
    summary = StageSummary("vig score")
    records = read_records(data_path, image_root, limit, summary)
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
                    items.append({**rec, "image_path": rec["image"], "image": load_image(rec["image"])})
                except BadInput as e:
                    summary.skip(e.reason, f"record {rec['id']} ({e})")
            scored = score_items(model, processor, items, options, progress=bar.update)
            for it, s in zip(items, scored):
                rec = {k: v for k, v in it.items() if k not in ("image", "image_path")}
                sink.write({"id": rec.pop("id"), "image": it["image_path"], **rec, **s})
                summary.processed += 1
    all_records = list(iter_jsonl(scores_path))
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
