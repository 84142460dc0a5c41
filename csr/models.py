"""The supported model classes, and loading the policy and its processor."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from csr.data import IMAGE_TOKEN, strip_image_token

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """The model named in a recipe cannot be used; the message says which and why."""


@dataclass(frozen=True)
class ModelClass:
    """What the stages need to know about one supported architecture class.

    Every class here keeps its language model under a `language_model` module, which is where the
    default LoRA targets (`csr.train_config.LM_LINEAR_REGEX`) point.
    """
    model_type: str      # config.json's model_type
    architecture: str    # the class AutoModelForImageTextToText builds for it
    example: str         # a hub id of this class (recipes/ has one per class)
    projector: str       # the vision-to-text projector: trained with train.train_projector
    vision_tower: str    # never gets LoRA; stays frozen
    mrope: bool = False  # 3-D multimodal rope: positions depend on the image grid (Qwen2-VL family)


SUPPORTED_CLASSES = {c.model_type: c for c in (
    ModelClass("llava", "LlavaForConditionalGeneration", "llava-hf/llava-1.5-7b-hf",
               projector="multi_modal_projector", vision_tower="vision_tower"),
    # LLaVA-NeXT's other projector-side weight, `image_newline`, is a bare parameter, not a module:
    # PEFT's modules_to_save cannot copy it, so it stays frozen (training it in place would move the
    # adapters-off reference).
    ModelClass("llava_next", "LlavaNextForConditionalGeneration", "llava-hf/llava-v1.6-vicuna-7b-hf",
               projector="multi_modal_projector", vision_tower="vision_tower"),
    ModelClass("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "Qwen/Qwen2.5-VL-7B-Instruct",
               projector="visual.merger", vision_tower="visual", mrope=True),
)}


def supported_listing() -> str:
    return ", ".join(f"{c.model_type} ({c.architecture}, e.g. {c.example})" for c in SUPPORTED_CLASSES.values())


def _supported(model_type: str | None, what: str) -> ModelClass:
    if model_type in SUPPORTED_CLASSES:
        return SUPPORTED_CLASSES[model_type]
    raise ModelLoadError(f"{what} is a '{model_type}' model, which csr does not support. Supported "
                         f"model types (config.json's model_type): {supported_listing()}.")


def class_of(model) -> ModelClass:
    """The supported class of a loaded model (refused with the supported list otherwise)."""
    return _supported(getattr(model.config, "model_type", None), f"the model ({type(model).__name__})")


def check_model_class(name_or_path: str, *, trust_remote_code: bool = False,
                      allow_pickle: bool = False) -> ModelClass:
    """The supported class of a model folder or hub id, from its config alone (no weights load).

    Refuses, before any work, a folder that `check_model_source` refuses and a model_type that is
    not in `SUPPORTED_CLASSES`, naming the supported ones.
    """
    check_model_source(name_or_path, allow_pickle)
    config_file = Path(name_or_path) / "config.json"
    if config_file.is_file():
        model_type = json.loads(config_file.read_text()).get("model_type")
    else:  # a hub id
        from transformers import AutoConfig

        try:
            model_type = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code).model_type
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot read the config of '{name_or_path}': {e}") from None
    return _supported(model_type, f"'{name_or_path}'")


@functools.lru_cache(maxsize=None)
def _cache_keyword(model_class) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def with_cache(model, cache) -> dict:
    """The forward keyword that passes a key/value cache: `cache` (transformers >= 5.2x, where
    `past_key_values` is deprecated) or `past_key_values` (older releases); read once per class, as
    every decoding step asks."""
    return {_cache_keyword(type(model)): cache}


def output_cache(out):
    """The key/value cache a forward returned, under either name."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def is_oom(err: BaseException) -> bool:
    """An out-of-memory error from any backend (CUDA raises its own type, others a RuntimeError)."""
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def in_halving_chunks(items: list, size: int, run, what: str, knob: str) -> tuple[list, int]:
    """`run(chunk)` over chunks of `size` items (0: all at once), results concatenated in order.

    On out-of-memory the chunk is halved and retried (logged, naming the setting `knob` to lower),
    down to one item; returns the results and the size to use next time: the one asked for (0 stays
    0, so a later call with more items still runs them all at once) unless a halving lowered it.
    """
    asked, size = size, size or len(items) or 1
    halved = False
    out, start = [], 0
    while start < len(items):
        chunk = items[start:start + size]
        try:
            out.append(run(chunk))
        except RuntimeError as err:
            if not is_oom(err) or size == 1:
                raise
            size, halved = max(1, size // 2), True
            log.warning("out of memory on %d %s; retrying with %s=%d", len(chunk), what, knob, size)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        start += len(chunk)
    return out, (size if halved else asked)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def check_model_source(name_or_path: str, allow_pickle: bool = False) -> None:
    """Refuse a local folder that is missing or holds only pickle weights, before loading anything.

    A string that is not an existing path is treated as a hub id when it looks like one
    ('org/name'); anything else that looks like a path but is not there is an error.
    """
    p = Path(name_or_path)
    looks_local = p.is_absolute() or name_or_path.startswith((".", "~")) or p.exists() \
        or name_or_path.count("/") != 1
    if not looks_local:
        return  # a hub id: from_pretrained resolves (or fails offline with its own message)
    if not p.is_dir():
        raise ModelLoadError(f"model path '{name_or_path}' does not exist (or is not a folder). "
                             f"Pass a hub id like 'llava-hf/llava-1.5-7b-hf' or a folder made by "
                             f"save_pretrained.")
    if not (p / "config.json").is_file():
        raise ModelLoadError(f"model folder '{name_or_path}' has no config.json: not a finished "
                             f"save_pretrained folder (an interrupted save?).")
    try:
        json.loads((p / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"'{p / 'config.json'}' is not valid JSON ({type(e).__name__}): an interrupted "
                             f"save? Save the model again.") from None
    # the model's own weights: model.safetensors or its shards (an adapter's or an optimizer's file is not)
    weights = list(p.glob("model*.safetensors")) + list(p.glob("model*.safetensors.index.json"))
    pickles = list(p.glob("*.bin")) + list(p.glob("*.pt")) + list(p.glob("*.pth"))
    if not weights and pickles and not allow_pickle:
        raise ModelLoadError(f"model folder '{name_or_path}' holds only pickle weights "
                             f"({pickles[0].name}); csr loads safetensors only. Convert it "
                             f"(load and save_pretrained) or set model.allow_pickle_weights=true "
                             f"if you trust the file.")


# LLaVA's vicuna_v1 conversation (how LLaVA-1.5 was trained, and the official CSR code's prompt):
#   "{system} USER: <image>\n{question} ASSISTANT: {answer}</s>USER: ..."
# system and roles joined by ' ', each assistant turn closed by EOS; the generation prompt ends
# with "ASSISTANT:". The image placeholder and EOS are filled in per tokenizer (`vicuna_v1_template`).
VICUNA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the human's questions.")
_VICUNA_V1 = (
    "{%- for message in messages -%}"
    "{%- if loop.first -%}{{- SYSTEM + ' ' -}}{%- endif -%}"
    "{%- if message['role'] == 'user' -%}{{- 'USER: ' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- 'ASSISTANT: ' -}}{%- endif -%}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}{%- else -%}"
    "{%- for item in message['content'] if item['type'] == 'image' -%}{{- IMAGE + '\\n' -}}{%- endfor -%}"
    "{%- for item in message['content'] if item['type'] == 'text' -%}{{- item['text'] -}}{%- endfor -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}{{- ' ' -}}{%- else -%}{{- EOS -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)
CHAT_TEMPLATES = ("model", "vicuna_v1")
MAX_TEMPLATE_CHARS = 100_000  # released templates are a few thousand characters
IMAGE_ASPECTS = ("processor", "pad")


def _jinja_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def vicuna_v1_template(image_token: str, eos_token: str) -> str:
    """The vicuna_v1 conversation as a chat template, with this model's image token and EOS."""
    return ("{%- set SYSTEM = " + _jinja_string(VICUNA_V1_SYSTEM) + " -%}"
            "{%- set IMAGE = " + _jinja_string(image_token) + " -%}"
            "{%- set EOS = " + _jinja_string(eos_token) + " -%}" + _VICUNA_V1)


def set_chat_template(processor, name: str, model_type: str | None = None):
    """Use chat template `name` (model: the processor's own; vicuna_v1) for generation and training."""
    if name == "model":
        return processor
    if name != "vicuna_v1":
        raise ModelLoadError(f"model.chat_template={name!r} is not one of {list(CHAT_TEMPLATES)}.")
    if model_type not in (None, "llava", "llava_next"):
        raise ModelLoadError(f"model.chat_template=vicuna_v1 is LLaVA's conversation format; this model is a "
                             f"'{model_type}'. Use model.chat_template=model.")
    tokenizer = getattr(processor, "tokenizer", processor)
    if tokenizer.eos_token is None:
        raise ModelLoadError("model.chat_template=vicuna_v1 closes each answer with EOS, but the tokenizer has none.")
    template = vicuna_v1_template(image_token_text(processor), tokenizer.eos_token)
    processor.chat_template = template
    tokenizer.chat_template = template
    return processor


def pad_to_square(image, fill: tuple[int, int, int]):
    """LLaVA-1.5's `expand2square`: the image centred on a square of colour `fill`, nothing cropped."""
    from PIL import Image

    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    out = Image.new(image.mode, (side, side), fill)
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out


def processor_mean_colour(processor) -> tuple[int, int, int]:
    """The image processor's mean as an 8-bit RGB colour, truncated as LLaVA-1.5's training code does
    (`int(x * 255)`: CLIP's mean gives (122, 116, 104))."""
    mean = getattr(getattr(processor, "image_processor", processor), "image_mean", None) or (0.5, 0.5, 0.5)
    return tuple(int(m * 255) for m in mean[:3])


def prepare_image(image, processor, aspect: str):
    """The image as the processor should receive it: as is, or padded to a square (`pad`)."""
    if aspect == "processor":
        return image
    if aspect == "pad":
        return pad_to_square(image, processor_mean_colour(processor))
    raise ModelLoadError(f"model.image_aspect={aspect!r} is not one of {list(IMAGE_ASPECTS)}.")


class PadImages:
    """Wraps a vision collator: pads every example's images to a square before it processes them."""

    def __init__(self, inner, processor, aspect: str):
        self.inner, self.processor, self.aspect = inner, processor, aspect

    def __call__(self, examples):
        for ex in examples:
            for key in ("images", "image"):
                if key in ex and ex[key] is not None:
                    value = ex[key]
                    ex[key] = ([prepare_image(im, self.processor, self.aspect) for im in value]
                               if isinstance(value, list) else prepare_image(value, self.processor, self.aspect))
        return self.inner(examples)


@contextlib.contextmanager
def model_file_errors(name_or_path: str):
    """A damaged or hostile weight file ends in one line naming the folder, not a traceback."""
    try:
        yield
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors, transformers and torch raise many kinds
        if type(e).__name__ not in ("SafetensorError", "HeaderTooLarge", "HeaderTooSmall", "InvalidHeader") \
                and not isinstance(e, (OSError, ValueError, EOFError)):
            raise
        raise ModelLoadError(f"cannot load the weights in '{name_or_path}' ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200] if str(e) else 'no detail'}): a damaged or "
                             f"truncated file? Save or download the model again.") from None


def load_processor(name_or_path: str, trust_remote_code: bool = False, chat_template: str = "model"):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    template = getattr(processor, "chat_template", None) or ""
    if len(template) > MAX_TEMPLATE_CHARS:  # compiling a huge template takes minutes: refuse it instead
        raise ModelLoadError(f"the chat template of '{name_or_path}' is {len(template):,} characters long (at most "
                             f"{MAX_TEMPLATE_CHARS:,}); is it the right file?")
    if chat_template != "model":
        model_type = None
        config_file = Path(name_or_path) / "config.json"
        if config_file.is_file():
            model_type = json.loads(config_file.read_text()).get("model_type")
        set_chat_template(processor, chat_template, model_type)
    return processor


def load_policy(name_or_path: str, *, dtype: str = "auto", device: str = "auto",
                trust_remote_code: bool = False, allow_pickle_weights: bool = False,
                chat_template: str = "model"):
    """(model, processor) for generation and scoring, in eval mode on the chosen device."""
    from transformers import AutoModelForImageTextToText

    check_model_class(name_or_path, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle_weights)
    dev = resolve_device(device)
    with model_file_errors(name_or_path):
        model = AutoModelForImageTextToText.from_pretrained(
            name_or_path, dtype=resolve_dtype(dtype, dev), trust_remote_code=trust_remote_code,
            use_safetensors=not allow_pickle_weights,
        ).to(dev).eval()
    processor = load_processor(name_or_path, trust_remote_code)
    set_chat_template(processor, chat_template, getattr(model.config, "model_type", None))
    return model, processor


SENTENCE_ENDS = ("punctuation", "official")
# A token ends a sentence (punctuation mode) when its text is one or more periods, optionally closed
# by quotes or brackets, with only whitespace around: '.', ' .', '...', '."', '.)', and the merged
# period-plus-newlines of byte-level BPE vocabularies ('.\n', '.\n\n'). Not 'Mr.' or '1.'.
_SENTENCE_END_TEXT = re.compile(r"\s*\.+[\"')\]\u201d\u2019]*\s*")


class ContinuationDecoder:
    """Token ids decoded as they read after earlier text: a SentencePiece '▁The' is ' The', a
    byte-level 'Ċ' a newline. Decoding ids alone would strip a leading space, so they are decoded
    after an anchor token and cut at the anchor's own text (the anchor is looked up once)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.anchor = tokenizer.encode("a", add_special_tokens=False)[-1]
        self.head = tokenizer.decode([self.anchor])

    def __call__(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode([self.anchor, *ids], skip_special_tokens=skip_special_tokens)[len(self.head):]


def token_texts(tokenizer, ids) -> dict[int, str]:
    """Each id's text as it reads inside a sequence (a SentencePiece '▁.' is ' .')."""
    decode = ContinuationDecoder(tokenizer)
    return {i: decode([i]) for i in ids}


def sentence_end_ids(tokenizer, mode: str = "punctuation") -> list[int]:
    """Token ids that end a candidate sentence, derived from the vocabulary (never a hard-coded id).

    official: the token(s) whose text is exactly '.' (the released code's one period id, 29889 for
    LLaMA). punctuation: every token whose text is a sentence end (`_SENTENCE_END_TEXT`): with Qwen's
    merged '.\n' and '.\n\n' a sentence also ends at a paragraph break. EOS is not among them: the
    search decides on EOS itself (`generate.stop_at_eos`).
    """
    if mode not in SENTENCE_ENDS:
        raise ModelLoadError(f"generate.sentence_end={mode!r} is not one of {list(SENTENCE_ENDS)}.")
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    candidates = [i for piece, i in tokenizer.get_vocab().items() if "." in piece and i not in special]
    texts = token_texts(tokenizer, candidates)
    if mode == "official":
        ids = sorted(i for i, t in texts.items() if t == ".")
    else:
        ids = sorted(i for i, t in texts.items() if _SENTENCE_END_TEXT.fullmatch(t))
    if not ids:
        raise ModelLoadError(f"the tokenizer has no token that ends a sentence (generate.sentence_end={mode}: no "
                             f"token reads '.'{'' if mode == 'official' else ' or a period with quotes or whitespace'}"
                             f"); csr cannot split its output into sentences.")
    return ids


SENTENCE_END_PROBES = (".", " .", ".\n", ".\n\n", '."', ".)", "...")


def describe_sentence_ends(tokenizer) -> str:
    """What ends a sentence in this vocabulary, per mode, and how the usual period forms tokenise."""
    lines = []
    ends = {mode: sentence_end_ids(tokenizer, mode) for mode in SENTENCE_ENDS}
    for mode, ids in ends.items():
        texts = token_texts(tokenizer, ids)
        shown = ", ".join(f"{i} {texts[i]!r}" for i in ids[:12]) + (f", … ({len(ids)} in all)" if len(ids) > 12 else "")
        lines.append(f"{mode}: {shown}")
    ends = {mode: set(ids) for mode, ids in ends.items()}
    lines.append("after 'word':")
    anchor = "word"
    head = tokenizer.encode(anchor, add_special_tokens=False)
    for probe in SENTENCE_END_PROBES:
        ids = tokenizer.encode(anchor + probe + " Next", add_special_tokens=False)[len(head):]
        texts = token_texts(tokenizer, ids)
        marks = " ".join(f"{texts[i]!r}{'*' if i in ends['punctuation'] else ''}{'!' if i in ends['official'] else ''}"
                         for i in ids)
        lines.append(f"  {probe!r:8} -> {marks}")
    lines.append("(* ends a sentence with sentence_end=punctuation, ! with official)")
    return "\n".join(lines)


def sentence_ends_main(argv=None) -> int:
    """`csr sentence-ends MODEL`: the sentence-end tokens a model folder's tokenizer gives, per mode."""
    import argparse

    p = argparse.ArgumentParser(prog="csr sentence-ends", description="Show which tokens end a candidate sentence "
                                "(generate.sentence_end) for a model folder's tokenizer.")
    p.add_argument("model", help="A model or tokenizer folder.")
    args = p.parse_args(argv)
    if not Path(args.model).is_dir():
        raise ModelLoadError(f"'{args.model}' is not a folder; pass a model or tokenizer folder.")
    from transformers import AutoTokenizer

    print(describe_sentence_ends(AutoTokenizer.from_pretrained(args.model)))
    return 0


def image_token_text(processor) -> str:
    return getattr(processor, "image_token", None) or IMAGE_TOKEN


def placeholder_ids(processor) -> list[int]:
    """Token ids that stand for an image or video in the prompt; a model must never generate them."""
    tok = getattr(processor, "tokenizer", processor)
    names = {getattr(processor, a, None) for a in ("image_token", "video_token")} | {IMAGE_TOKEN}
    ids = set()
    for name in names - {None}:
        tid = tok.convert_tokens_to_ids(name)
        if isinstance(tid, int) and tid != tok.unk_token_id and tid is not None:
            ids.add(tid)
    return sorted(ids)


def build_chat_prompt(processor, question: str) -> str:
    """The model's own chat template around one image and one user question, ready for a reply."""
    question = strip_image_token(question, processor)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode_left_padded(processor, model, prompts: list[str], images: list | None) -> dict:
    """A left-padded batch of chat prompts (with `images`, PIL, one per prompt) on the model's device,
    pixel values in its dtype. images=None: a text-only batch, checked to carry no image input
    (`csr.content_free.check_text_only`)."""
    tok = processor.tokenizer
    old = tok.padding_side
    tok.padding_side = "left"
    try:
        if images is None:
            enc = processor(text=prompts, padding=True, return_tensors="pt")
        else:
            enc = processor(text=prompts, images=images, padding=True, return_tensors="pt")
    finally:
        tok.padding_side = old
    enc = dict(enc)
    if images is None:
        from csr.content_free import check_text_only

        check_text_only(enc, model)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    return {k: (v.to(device, dtype) if k == "pixel_values" else v.to(device)) for k, v in enc.items()}


def close_answer(text: str, processor) -> str:
    """An assistant turn as rendered by the chat template, closed by EOS when the template does not
    close it itself (llava-hf's LLaVA-1.5 template renders `text + ' '`): training then learns where an
    answer stops. A template that renders EOS (vicuna_v1, Qwen's `<|im_end|>`) is left as it is."""
    eos = getattr(getattr(processor, "tokenizer", processor), "eos_token", None)
    if eos and not text.rstrip().endswith(eos):
        return text.rstrip() + eos
    return text


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether plain tokenisation (add_special_tokens=True, as generation and `csr eval` use) starts with BOS."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


class PrependBOS:
    """Wraps a collator: puts BOS in front of every row that does not start with it (label -100).

    TRL's vision collators (SFT and DPO, TRL 1.16) tokenise the rendered chat with add_special_tokens=False and LLaVA-1.5's
    chat template holds no `<s>`, so its sequences lack the BOS that generation (`processor(text)`)
    and LLaVA's own training put first. Rows are left-aligned (TRL flushes them left), so the new
    column is position 0 of every row; the sequence grows by one token (beyond max_length by one).
    """

    def __init__(self, inner, bos_token_id: int):
        self.inner = inner
        self.bos = int(bos_token_id)

    def __call__(self, examples):
        batch = self.inner(examples)
        ids = batch["input_ids"]
        if bool((ids[:, 0] == self.bos).all()):
            return batch
        if bool((ids[:, 0] == self.bos).any()):
            raise ValueError("some rows start with BOS and some do not; cannot prepend BOS uniformly")
        col = lambda t, v: torch.cat([torch.full_like(t[:, :1], v), t], dim=1)  # noqa: E731
        batch["input_ids"] = col(ids, self.bos)
        if "attention_mask" in batch:
            batch["attention_mask"] = col(batch["attention_mask"], 1)
        if "labels" in batch:
            batch["labels"] = col(batch["labels"], -100)  # never a training target
        for k in ("token_type_ids", "mm_token_type_ids", "completion_mask"):
            if k in batch:
                batch[k] = col(batch[k], 0)
        return batch
