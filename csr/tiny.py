"""Tiny models built locally from config: a LLaVA and a CLIP small enough for CPU tests and the
default run, and a tiny LLaVA-NeXT and Qwen2.5-VL (same architecture classes as the real models)
for the per-class tests. They are saved as ordinary model folders, loaded by the same code as real
models.
"""

from __future__ import annotations

from pathlib import Path

import torch

# LLaVA-1.5's conversation format ("USER: <image>\n... ASSISTANT: ..."), as a chat template that
# accepts both plain-string and typed-list message contents (TRL and the processor use both).
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% elif message['role'] == 'assistant' %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}</s>{% else %} {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# Qwen2-VL / Qwen2.5-VL's ChatML format with its default system turn, as in the released models'
# template (images as <|vision_start|><|image_pad|><|vision_end|>, expanded by the processor).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# llava-hf's LLaVA-1.5 format as its released template renders it: an assistant turn is its text and a
# space, with no EOS after it (what a real llava-hf folder trains with unless csr closes the answer).
LLAVA_HF_STYLE_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}"
    "{% else %}{% for item in message['content'] if item['type'] == 'image' %}<image>\n{% endfor %}"
    "{% for item in message['content'] if item['type'] == 'text' %}{{ item['text'] + ' ' }}{% endfor %}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# Qwen2's pre-tokenisation: punctuation keeps the newlines after it, so '.\n' becomes one token.
QWEN2_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                       r"|\s*[\r\n]+|\s+(?!\S)|\s+")

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>"]

DEFAULT_CORPUS = [
    "Describe this image in detail.",
    "The image shows a red circle and a blue square on a white background.",
    "There is a green triangle in the top left corner. A yellow star is near the bottom.",
    "Is there a dog in the image? Yes, there is. No, there is not.",
    "A cat sits on a mat. The sky is blue. Two people walk along the street.",
    "What is in the picture? The picture contains a car, a tree and a house.",
]


def build_tokenizer(corpus: list[str] | None = None, vocab_size: int = 400, *,
                    special_tokens: list[str] = SPECIAL_TOKENS, bos: str | None = "<s>", eos: str = "</s>",
                    pad: str = "<pad>", unk: str | None = "<unk>", named_tokens: dict | None = None,
                    chat_template: str = LLAVA_CHAT_TEMPLATE, split_pattern: str | None = None):
    """A byte-level BPE tokenizer trained on `corpus`.

    Defaults: LLaVA-1.5's (Llama) special tokens, BOS put first by plain tokenisation, '<image>' as
    the image token. `bos=None` adds no BOS (Qwen); `named_tokens` are the processor-visible
    special tokens (e.g. {"image_token": "<image>"}). `split_pattern` replaces GPT-2's
    pre-tokenisation (e.g. `QWEN2_SPLIT_PATTERN`, which merges a period with the newlines after it).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=unk))
    if split_pattern is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split_pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus or DEFAULT_CORPUS, trainer)
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    named = {"image_token": "<image>"} if named_tokens is None else named_tokens
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=unk,
                                   pad_token=pad, extra_special_tokens=named)
    fast.padding_side = "left"  # generation pads on the left
    fast.chat_template = chat_template
    return fast


def _tiny_llama_config(tokenizer, hidden_size: int, num_layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size,
                       intermediate_size=hidden_size * 2, num_hidden_layers=num_layers,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)


def _tiny_clip_vision_config(image_size: int, patch_size: int):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=image_size, patch_size=patch_size, projection_dim=32)


def _save(model, processor, tokenizer, out_dir) -> None:
    """Generation ids from the tokenizer, then model + processor into one folder."""
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)


def build_tiny_llava(out_dir: str | Path, *, corpus: list[str] | None = None, vocab_size: int = 400,
                     image_size: int = 32, patch_size: int = 8, hidden_size: int = 64,
                     num_layers: int = 2, vision_model=None, seed: int = 0, tokenizer=None,
                     chat_template: str = LLAVA_CHAT_TEMPLATE):
    """Build, save and return (model, processor) for a tiny LlavaForConditionalGeneration.

    `vision_model` (a transformers CLIPVisionModel) replaces the random vision tower when given,
    e.g. one trained contrastively on the grounded world. `tokenizer` (holding '<image>' and a pad
    token) and `chat_template` replace the toy ones, e.g. the real LLaMA vocabulary and llava-hf's
    template (`real_llama_tokenizer`).
    """
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    torch.manual_seed(seed)
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(corpus, vocab_size)
    if vision_model is not None:
        vision_cfg = vision_model.config
        image_size, patch_size = vision_cfg.image_size, vision_cfg.patch_size
    else:
        vision_cfg = _tiny_clip_vision_config(image_size, patch_size)
    config = LlavaConfig(vision_config=vision_cfg, text_config=_tiny_llama_config(tokenizer, hidden_size, num_layers),
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu")
    config.pad_token_id = tokenizer.pad_token_id
    model = LlavaForConditionalGeneration(config)
    if vision_model is not None:
        model.model.vision_tower.load_state_dict(vision_model.state_dict())

    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               patch_size=patch_size, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=chat_template)
    _save(model, processor, tokenizer, out_dir)
    return model, processor


PARAGRAPH_CORPUS = DEFAULT_CORPUS + [
    "The dog sat.\nA cat ran.\n\nIt is red.", "A man (with a hat) said \"hi.\" Then... he left.",
    "Two dogs play.\nThe sky is blue.\n\nA car is parked.", "There is a tree.\nThere is a house.",
]


def build_sentencepiece_tokenizer(corpus: list[str] | None = None, vocab_size: int = 500):
    """A SentencePiece BPE tokenizer with LLaMA's properties, trained on `corpus`: '▁' marks a word
    start, characters it never saw (a newline among them) fall back to byte tokens ('<0x0A>'), '.'
    stays apart from what follows it; `<image>` and `<pad>` added after the vocabulary as llava-hf
    does. Needs the `sentencepiece` package."""
    import io

    try:
        import sentencepiece as spm
    except ImportError:
        raise RuntimeError("build_sentencepiece_tokenizer needs the sentencepiece package "
                           "(pip install sentencepiece; it is in csr's test extra)") from None
    # the training text has no newline: a newline then reaches the model as the byte token <0x0A>, as in LLaMA
    lines = [line.replace("\n", " ") for line in (corpus or PARAGRAPH_CORPUS)] * 20
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0, unk_id=0,
                                   bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
                                   hard_vocab_limit=False, minloglevel=2)
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".model", delete=False) as f:
        f.write(model.getvalue())
    try:
        return real_llama_tokenizer(f.name)
    finally:
        Path(f.name).unlink()


def build_bpe_paragraph_tokenizer(corpus: list[str] | None = None, vocab_size: int = 500):
    """A byte-level BPE tokenizer with Qwen2's properties: its pre-tokenisation keeps a period and the
    newlines after it together, so '.\n' and '.\n\n' are single tokens; Qwen's special tokens and
    ChatML template (`build_tiny_qwen2_5_vl`'s)."""
    return build_tokenizer(corpus or PARAGRAPH_CORPUS, vocab_size, special_tokens=QWEN_SPECIAL_TOKENS, bos=None,
                           eos="<|im_end|>", pad="<|endoftext|>", unk=None,
                           named_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                         "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"},
                           chat_template=QWEN_CHAT_TEMPLATE, split_pattern=QWEN2_SPLIT_PATTERN)


def real_llama_tokenizer(sentencepiece_model: str | Path):
    """LLaMA's 32,000-piece tokenizer from its `tokenizer.model`, with llava-hf's additions:
    `<image>` = 32000 and `<pad>` = 32001 (needs the `sentencepiece` package to convert)."""
    import shutil
    import tempfile

    from transformers import AddedToken, LlamaTokenizer

    with tempfile.TemporaryDirectory() as folder:
        shutil.copy(sentencepiece_model, Path(folder) / "tokenizer.model")
        tokenizer = LlamaTokenizer.from_pretrained(folder)
    tokenizer.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)  # 32000
    tokenizer.add_special_tokens({"pad_token": "<pad>"})                                                 # 32001
    tokenizer.image_token = "<image>"
    return tokenizer


# Qwen2's special tokens in their released order: <|endoftext|> is 151643, <|im_end|> 151645,
# <|image_pad|> 151655 (the vocabulary files list the 151,643 ordinary tokens only).
QWEN2_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                        "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                        "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]


def real_qwen2_tokenizer(vocab_json: str | Path, merges_txt: str | Path):
    """Qwen2's byte-level BPE tokenizer from its `vocab.json` and `merges.txt`, with the special tokens
    at their released ids (EOS `<|im_end|>`, pad `<|endoftext|>`)."""
    import shutil
    import tempfile

    from transformers import AddedToken, Qwen2Tokenizer

    with tempfile.TemporaryDirectory() as folder:
        shutil.copy(vocab_json, Path(folder) / "vocab.json")
        shutil.copy(merges_txt, Path(folder) / "merges.txt")
        tokenizer = Qwen2Tokenizer.from_pretrained(folder, unk_token=None, bos_token=None, eos_token=None,
                                                   pad_token=None)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN2_SPECIAL_TOKENS],
                         special_tokens=True)
    tokenizer.add_special_tokens({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
    for name, token in (("image_token", "<|image_pad|>"), ("video_token", "<|video_pad|>"),
                        ("vision_bos_token", "<|vision_start|>"), ("vision_eos_token", "<|vision_end|>")):
        setattr(tokenizer, name, token)
    return tokenizer


def build_tiny_llava_next(out_dir: str | Path, *, corpus: list[str] | None = None, vocab_size: int = 400,
                          image_size: int = 32, patch_size: int = 8, hidden_size: int = 64,
                          num_layers: int = 2, seed: int = 0):
    """Build, save and return (model, processor) for a tiny LlavaNextForConditionalGeneration.

    LLaVA-1.6's AnyRes on a small scale: a 32 px CLIP tower, crops chosen among 32x32, 32x64 and
    64x32 grids, the Llama side and chat template of `build_tiny_llava` (llava-v1.6-vicuna's format).
    """
    from transformers import (LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessor,
                              LlavaNextProcessor)

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(corpus, vocab_size)
    pinpoints = [[image_size, image_size], [image_size, 2 * image_size], [2 * image_size, image_size]]
    config = LlavaNextConfig(vision_config=_tiny_clip_vision_config(image_size, patch_size),
                             text_config=_tiny_llama_config(tokenizer, hidden_size, num_layers),
                             image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                             image_grid_pinpoints=pinpoints, vision_feature_layer=-2,
                             vision_feature_select_strategy="default", projector_hidden_act="gelu")
    config.pad_token_id = tokenizer.pad_token_id
    model = LlavaNextForConditionalGeneration(config)
    image_processor = LlavaNextImageProcessor(size={"shortest_edge": image_size},
                                              crop_size={"height": image_size, "width": image_size},
                                              image_grid_pinpoints=pinpoints)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=LLAVA_CHAT_TEMPLATE)
    _save(model, processor, tokenizer, out_dir)
    return model, processor


def build_tiny_qwen2_5_vl(out_dir: str | Path, *, corpus: list[str] | None = None, vocab_size: int = 400,
                          patch_size: int = 7, hidden_size: int = 64, num_layers: int = 2, seed: int = 0,
                          tokenizer=None, chat_template: str | None = None):
    """Build, save and return (model, processor) for a tiny Qwen2_5_VLForConditionalGeneration.

    A 2-block vision transformer (window attention in the first, full in the second) with the
    released model's 2x2 patch merger; images are resized to between 28x28 and 56x56 pixels, so a
    40 px image becomes 6x6 patches of 7 px, 9 image tokens. ChatML template, no BOS.
    `tokenizer` (with Qwen's special tokens) and `chat_template` replace the toy ones, e.g. the real
    Qwen2 vocabulary and Qwen2.5-VL's template.
    """
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

    torch.manual_seed(seed)
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(
                                corpus, vocab_size, special_tokens=QWEN_SPECIAL_TOKENS, bos=None,
                                eos="<|im_end|>", pad="<|endoftext|>", unk=None,
                                named_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                              "vision_bos_token": "<|vision_start|>",
                                              "vision_eos_token": "<|vision_end|>"},
                                chat_template=QWEN_CHAT_TEMPLATE)
    chat_template = chat_template or QWEN_CHAT_TEMPLATE
    ids = tokenizer.convert_tokens_to_ids
    merge = 2
    vision_cfg = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=patch_size,
                      spatial_merge_size=merge, temporal_patch_size=2, out_hidden_size=hidden_size,
                      window_size=2 * patch_size * merge, fullatt_block_indexes=[1])
    text_cfg = dict(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                    num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=512, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                    # head_dim 16: the 3-D rope sections (t, h, w) must add up to head_dim / 2
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    config = Qwen2_5_VLConfig(vision_config=vision_cfg, text_config=text_cfg, image_token_id=ids("<|image_pad|>"),
                              video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                              vision_end_token_id=ids("<|vision_end|>"), tie_word_embeddings=False)
    config.pad_token_id = tokenizer.pad_token_id
    model = Qwen2_5_VLForConditionalGeneration(config)
    pixels = dict(patch_size=patch_size, merge_size=merge, temporal_patch_size=2,
                  size={"shortest_edge": (patch_size * merge * 2) ** 2, "longest_edge": (patch_size * merge * 4) ** 2})
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**pixels),
                                    video_processor=Qwen2VLVideoProcessor(**pixels), tokenizer=tokenizer,
                                    chat_template=chat_template)
    _save(model, processor, tokenizer, out_dir)
    return model, processor


# ---------------------------------------------------------------------------------------------
# CLIP
# ---------------------------------------------------------------------------------------------

TINY_OPEN_CLIP_NAME = "csr-tiny-clip"


def tiny_open_clip_config(image_size: int = 32, patch_size: int = 8, width: int = 32,
                          embed_dim: int = 32) -> dict:
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "layers": 2, "width": width, "patch_size": patch_size,
                       "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": width, "heads": 2, "layers": 2},
    }


def build_tiny_clip(out_dir: str | Path, *, seed: int = 0, **config_kw):
    """Build and save a tiny open_clip model: `open_clip_config.json` + `open_clip_model.safetensors`.

    The folder is what `csr.score.clip.load_clip` takes as a local open_clip checkpoint.
    """
    from csr.score.clip import create_open_clip, save_open_clip_folder

    torch.manual_seed(seed)
    config = tiny_open_clip_config(**config_kw)
    model, preprocess, _ = create_open_clip(TINY_OPEN_CLIP_NAME, config)
    save_open_clip_folder(model, TINY_OPEN_CLIP_NAME, config, out_dir)
    return model, preprocess


TINY_BUILDERS = {"llava": build_tiny_llava, "llava_next": build_tiny_llava_next, "qwen2_5_vl": build_tiny_qwen2_5_vl}


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Build a tiny LLaVA (<out>/llava; --classes for others) and a tiny "
                                            "CLIP (<out>/clip) with random weights, for tests and smoke runs.")
    p.add_argument("--out", default="data/cache/tiny", help="Output folder.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--classes", nargs="+", default=["llava"], choices=sorted(TINY_BUILDERS),
                   help="Model classes to build, each in <out>/<model_type> (default: llava).")
    args = p.parse_args(argv)
    out = Path(args.out)
    for model_type in args.classes:
        TINY_BUILDERS[model_type](out / model_type, seed=args.seed)
    build_tiny_clip(out / "clip", seed=args.seed)
    print(f"tiny models written to {', '.join(str(out / c) for c in [*args.classes, 'clip'])}")
    return 0
