"""Tiny models built locally from config: a LLaVA and a CLIP small enough for CPU tests and the
default run. They are saved as ordinary model folders, loaded by the same code as real models.
"""

from __future__ import annotations

import json
import tempfile
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

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]

DEFAULT_CORPUS = [
    "Describe this image in detail.",
    "The image shows a red circle and a blue square on a white background.",
    "There is a green triangle in the top left corner. A yellow star is near the bottom.",
    "Is there a dog in the image? Yes, there is. No, there is not.",
    "A cat sits on a mat. The sky is blue. Two people walk along the street.",
    "What is in the picture? The picture contains a car, a tree and a house.",
]


def build_tokenizer(corpus: list[str] | None = None, vocab_size: int = 400):
    """A byte-level BPE tokenizer trained on `corpus`, with '<image>' as the image token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus or DEFAULT_CORPUS, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>",
                                   extra_special_tokens={"image_token": "<image>"})
    fast.padding_side = "left"  # generation pads on the left
    fast.chat_template = LLAVA_CHAT_TEMPLATE
    return fast


def build_tiny_llava(out_dir: str | Path, *, corpus: list[str] | None = None, vocab_size: int = 400,
                     image_size: int = 32, patch_size: int = 8, hidden_size: int = 64,
                     num_layers: int = 2, vision_model=None, seed: int = 0):
    """Build, save and return (model, processor) for a tiny LlavaForConditionalGeneration.

    `vision_model` (a transformers CLIPVisionModel) replaces the random vision tower when given,
    e.g. one trained contrastively on the grounded world.
    """
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(corpus, vocab_size)
    if vision_model is not None:
        vision_cfg = vision_model.config
        image_size, patch_size = vision_cfg.image_size, vision_cfg.patch_size
    else:
        vision_cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, image_size=image_size, patch_size=patch_size,
                                      projection_dim=32)
    text_cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size,
                           intermediate_size=hidden_size * 2, num_hidden_layers=num_layers,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision_cfg, text_config=text_cfg,
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu")
    config.pad_token_id = tokenizer.pad_token_id
    model = LlavaForConditionalGeneration(config)
    if vision_model is not None:
        model.model.vision_tower.load_state_dict(vision_model.state_dict())
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id

    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               patch_size=patch_size, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
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


def register_open_clip_config(name: str, config: dict) -> None:
    """Make `name` known to open_clip (its registry reads JSON files from a folder)."""
    import open_clip

    folder = Path(tempfile.mkdtemp(prefix="csr_open_clip_cfg_"))
    (folder / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)


def build_tiny_clip(out_dir: str | Path, *, seed: int = 0, **config_kw):
    """Build and save a tiny open_clip model: `open_clip_config.json` + `open_clip_model.safetensors`.

    The folder is what `csr.score.clip.load_clip` takes as a local open_clip checkpoint.
    """
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    config = tiny_open_clip_config(**config_kw)
    register_open_clip_config(TINY_OPEN_CLIP_NAME, config)
    model, _, preprocess = open_clip.create_model_and_transforms(TINY_OPEN_CLIP_NAME, pretrained=None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "open_clip_config.json").write_text(json.dumps({"model_name": TINY_OPEN_CLIP_NAME,
                                                          "model_cfg": config}, indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))
    return model, preprocess


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Build a tiny LLaVA (<out>/llava) and a tiny CLIP (<out>/clip) "
                                            "with random weights, for tests and smoke runs.")
    p.add_argument("--out", default="data/cache/tiny", help="Output folder.")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = Path(args.out)
    build_tiny_llava(out / "llava", seed=args.seed)
    build_tiny_clip(out / "clip", seed=args.seed)
    print(f"tiny models written to {out}/llava and {out}/clip")
    return 0
