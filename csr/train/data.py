"""The DPO stage's data: the pairs stage's records read and checked, rendered to TRL's prompt /
completion text by the chat template, and measured against `train.max_length` before training.
"""

from __future__ import annotations

from pathlib import Path

from csr.config import ConfigError
from csr.data import resolve_image_path
from csr.io import iter_jsonl, require_done

PAIRS_FILE = "pairs.jsonl"
PAIR_KEYS = ("prompt", "chosen", "rejected", "images")


class TrainInputError(ValueError):
    """The pairs cannot be trained on; the message names the file and what is wrong."""


def read_pairs(pairs_dir: Path) -> list[dict]:
    """The finished pairs stage's records, checked: required keys present, images on disk.

    Relative image paths are taken relative to `pairs_dir`.
    """
    pairs_dir = Path(pairs_dir)
    require_done(pairs_dir, "pairs")
    path = pairs_dir / PAIRS_FILE
    if not path.is_file():
        raise TrainInputError(f"{path} is missing although {pairs_dir} is marked done; rerun the 'pairs' stage.")
    records = []
    for n, rec in enumerate(iter_jsonl(path), 1):
        missing = [k for k in PAIR_KEYS if k not in rec]
        if missing:
            raise TrainInputError(f"{path}:{n}: record lacks {missing}; expected TRL's conversational "
                                  f"preference format with keys {list(PAIR_KEYS)}.")
        images = rec["images"] if isinstance(rec["images"], list) else [rec["images"]]
        images = [str(resolve_image_path(p, pairs_dir, allow_absolute=True, record=f"{path}:{n}", resolve=False))
                  for p in images]  # relative paths are relative to the pairs folder
        for p in images:
            if not Path(p).is_file():
                raise TrainInputError(f"{path}:{n}: image '{p}' does not exist.")
        records.append({"prompt": rec["prompt"], "chosen": rec["chosen"], "rejected": rec["rejected"],
                        "images": images, "chosen_ends_with_eos": bool(rec.get("chosen_ends_with_eos", False)),
                        "rejected_ends_with_eos": bool(rec.get("rejected_ends_with_eos", False))})
    if not records:
        raise TrainInputError(f"{path} holds no pairs: nothing to train on. Check the 'pairs' stage's "
                              f"summary ({pairs_dir / 'DONE.json'}) for why every prompt was skipped.")
    return records


def render_pair(example: dict, processor) -> dict:
    """One conversational pair as TRL's plain prompt / completion text, rendered by the chat template.

    The same text TRL would render, except that a completion the model ended with EOS
    (`<side>_ends_with_eos`) is closed by EOS whatever the template renders: llava-hf's LLaVA-1.5
    template renders an assistant turn as `text + ' '` with no EOS, so DPO would never see where an
    answer stops. A template that already renders EOS (vicuna_v1, Qwen's `<|im_end|>`) is left as is.
    """
    from csr.models import close_answer

    prompt = processor.apply_chat_template(example["prompt"], add_generation_prompt=True, tokenize=False)
    out = {"prompt": prompt}
    for side in ("chosen", "rejected"):
        full = processor.apply_chat_template(example["prompt"] + example[side], tokenize=False)
        if not full.startswith(prompt):
            raise TrainInputError(f"the chat template renders the prompt differently on its own than before an "
                                  f"answer ({prompt[-40:]!r} vs {full[len(prompt) - 40:len(prompt)]!r}); csr "
                                  f"cannot cut the completion out of it. Use model.chat_template=vicuna_v1 or "
                                  f"fix the template.")
        completion = full[len(prompt):]
        out[side] = close_answer(completion, processor) if example.get(f"{side}_ends_with_eos") else completion
    return out


def image_token_count(processor, size: tuple[int, int], cache: dict) -> int:
    """Tokens one image of `size` (width, height) becomes in the prompt, as the processor expands it."""
    from csr.models import image_token_text

    if size not in cache:
        w, h = size
        counter = getattr(processor, "_get_num_multimodal_tokens", None)
        n = None
        if counter is not None:
            try:
                n = int(counter(image_sizes=[(h, w)]).num_image_tokens[0])
            except (AttributeError, TypeError, KeyError, IndexError, ValueError):
                n = None
        if n is None:  # ask the processor itself on a blank image of that size
            from PIL import Image

            text = image_token_text(processor)
            ids = processor(images=[Image.new("RGB", size)], text=[text], return_tensors="pt")["input_ids"][0]
            n = len(ids) - len(processor.tokenizer(text, add_special_tokens=False)["input_ids"]) + 1
        cache[size] = n
    return cache[size]


def longest_pair_tokens(dataset, processor, image_aspect: str = "processor", bos: int = 0) -> tuple[int, dict]:
    """(tokens, breakdown) of the longest prompt + completion in a rendered pairs dataset, image tokens
    included, without loading the images (their sizes come from the file headers)."""
    from datasets import Image as ImageFeature
    from PIL import Image

    try:
        from datasets import List
    except ImportError:  # pragma: no cover - datasets 3.x
        from datasets import Sequence as List
    from csr.models import image_token_text

    tok = getattr(processor, "tokenizer", processor)
    placeholder = tok(image_token_text(processor), add_special_tokens=False)["input_ids"]
    paths = dataset.cast_column("images", List(ImageFeature(decode=False)))["images"]
    texts = dataset.select_columns(["prompt", "chosen", "rejected"])
    cache: dict = {}
    best, breakdown = 0, {}
    for row, images in zip(texts, paths):
        image_tokens = 0
        for im in images:
            with Image.open(im["path"]) as f:
                size = f.size
            if image_aspect == "pad":
                size = (max(size), max(size))
            image_tokens += image_token_count(processor, size, cache) - len(placeholder)
        prompt = len(tok(row["prompt"], add_special_tokens=False)["input_ids"]) + image_tokens + bos
        completion = max(len(tok(row[k], add_special_tokens=False)["input_ids"]) for k in ("chosen", "rejected"))
        if prompt + completion > best:
            best = prompt + completion
            breakdown = {"prompt": prompt, "image": image_tokens + len(placeholder), "completion": completion}
    return best, breakdown


def check_token_budget(dataset, processor, max_length: int | None, image_aspect: str = "processor",
                       bos: int = 0) -> int:
    """Refuse, before training, pairs whose prompt + image + completion cannot fit `train.max_length`:
    TRL would cut into the image tokens and fail mid-run ("Image features and image tokens do not match")."""
    need, parts = longest_pair_tokens(dataset, processor, image_aspect, bos)
    if max_length is not None and need > max_length:
        raise ConfigError(f"train.max_length={max_length} cannot hold the longest pair: {need} tokens "
                          f"({parts['prompt']} of prompt, {parts['image']} of them the image, and "
                          f"{parts['completion']} of completion). Set train.max_length to at least {need}.")
    return need


def pairs_dataset(records: list[dict]):
    """A `datasets.Dataset` whose `images` column decodes to PIL images for the trainer."""
    from datasets import Dataset, Image

    try:
        from datasets import List  # datasets >= 4
    except ImportError:  # pragma: no cover - datasets 3.x
        from datasets import Sequence as List
    return Dataset.from_list(records).cast_column("images", List(Image()))
