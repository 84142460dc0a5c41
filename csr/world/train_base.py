"""Base models for the grounded world, trained on CPU in a few minutes.

- A tiny open_clip CLIP (custom config `world_clip_config`: ViT 32 px, patch 16 so each of the
  4 patches is one grid cell, width 64, 3 layers, exact GELU; text transformer width 64, 2 layers,
  context 20), trained contrastively on the training split. Every step contrasts a batch of
  images with all 160 possible one-object sentences ("A red circle is at the top left.", one
  random template each), with *multi-positive* targets: a sentence is a positive for every image
  that holds its object (same shape, colour and position). The 49408-row token embedding stays at
  its random init (only ~20 rows are used; training it doubles the step time for nothing).
  Saved like `csr.tiny.build_tiny_clip`: ``open_clip_config.json`` ({model_name, model_cfg}) +
  ``open_clip_model.safetensors``, which `csr.score.clip` loads.
- A tiny LLaVA (`csr.tiny.build_tiny_llava`: Llama hidden 128, 2 layers; tokenizer trained on the
  world's conversations) whose vision tower is the trained CLIP image trunk, converted to a
  transformers ``CLIPVisionModel`` (`open_clip_visual_to_hf`; features from the second-to-last
  layer, 4 image tokens), with an MLP projector and the Llama trained by supervised fine-tuning on
  the captions and yes/no questions of the training split (loss on the answer tokens only; the
  vision tower stays frozen, as in LLaVA). Saved with save_pretrained like any LLaVA folder.

- An *alignment-only* LLaVA (`train_aligned_llava`), the world's counterpart of LLaVA-1.5 after
  projector alignment and before instruction tuning, where the VIG paper scores its data and from
  which it instruction-tunes (docs/method.md §3). LLaVA starts from a pretrained chat language
  model (Vicuna); the world has none, so stage 1 trains the tiny Llama as one: the world's
  conversations as text with the image removed (`csr.content_free.content_free_prompt`,
  'none'), loss on the answers; the projector and vision tower do not train. Stage 2 is LLaVA's
  alignment: the caption records with their images, the projector alone trained (language model
  and vision tower frozen).

The defaults (`DEFAULT_CLIP`, `DEFAULT_LLAVA`) give a base LLaVA that reads most shapes but names
absent co-occurrence partners of present shapes, mostly where an object is small (see
`csr.world.generate`; docs/results/world.md). Defaults were tuned for seed 0.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path

import torch

from csr.io import read_jsonl
from csr.score.clip import create_open_clip, load_open_clip_folder, save_open_clip_folder

log = logging.getLogger(__name__)

WORLD_CLIP_NAME = "csr-world-clip"

# Defaults of the default run (`csr world`): about 3 minutes for both on 2 CPU cores.
DEFAULT_CLIP = {"steps": 2400, "batch_size": 256, "lr": 3e-3}
DEFAULT_LLAVA = {"steps": 1000, "batch_size": 32, "lr": 1e-3, "hidden_size": 128, "num_layers": 2,
                 "vocab_size": 400}
# The alignment-only checkpoint (`train_aligned_llava`): language-model stage, then projector alignment.
DEFAULT_ALIGNED = {"lm_steps": 1000, "align_steps": 600, "batch_size": 32, "lm_lr": 1e-3, "align_lr": 1e-3,
                   "hidden_size": 128, "num_layers": 2, "vocab_size": 400}


# ---------------------------------------------------------------------------------------------
# CLIP
# ---------------------------------------------------------------------------------------------


def world_clip_config(image_size: int = 32, patch_size: int = 16, width: int = 64, layers: int = 3,
                      head_width: int = 16, text_width: int = 64, text_layers: int = 2,
                      embed_dim: int = 64, context_length: int = 20) -> dict:
    """An open_clip model config: ViT image tower (GELU), causal text transformer."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "layers": layers, "width": width,
                       "patch_size": patch_size, "head_width": head_width},
        "text_cfg": {"context_length": context_length, "vocab_size": 49408, "width": text_width,
                     "heads": max(1, text_width // 32), "layers": text_layers},
    }


def _image_tensor(paths: list[Path], preprocess) -> torch.Tensor:
    from PIL import Image

    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(preprocess(im.convert("RGB")))
    return torch.stack(out)


def _lr_at(step: int, total: int, lr: float, warmup: float = 0.05, floor: float = 0.1) -> float:
    w = max(1, int(total * warmup))
    if step < w:
        return lr * (step + 1) / w
    p = (step - w) / max(1, total - w)
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


def _sentence(key: tuple, template: int) -> str:
    from csr.world.generate import object_sentence

    return object_sentence({"shape": key[0], "color": key[1], "position": key[2]}, template)


def train_clip(world_dir: str | Path, out_dir: str | Path, *, steps: int = DEFAULT_CLIP["steps"],
               batch_size: int = DEFAULT_CLIP["batch_size"], lr: float = DEFAULT_CLIP["lr"], seed: int = 0,
               config: dict | None = None, max_images: int | None = None) -> dict:
    """Train the world CLIP on train/scenes.jsonl and save it to `out_dir`; returns a summary."""
    from csr.data import record_image_paths
    from csr.world.generate import CAPTION_TEMPLATES, COLORS, POSITIONS, SHAPES

    world = Path(world_dir)
    t0 = time.time()
    torch.manual_seed(seed)
    scenes = read_jsonl(world / "train" / "scenes.jsonl")[:max_images]
    image_size = json.loads((world / "vocab.json").read_text())["config"]["image_size"]
    config = config or world_clip_config(image_size=image_size)
    model, preprocess, tokenizer = create_open_clip(WORLD_CLIP_NAME, config)
    images = _image_tensor(record_image_paths(scenes, world / "train" / "scenes.jsonl"), preprocess)

    # Every possible object (shape, colour, position) is a column in every step: each image is
    # contrasted with all 160 object sentences (a random template each), so every wrong shape,
    # colour and position is a negative, and the text side costs a fixed 160 short sequences.
    objects = [(shape, color, position) for shape in SHAPES for color in COLORS for position in POSITIONS]
    n_t = len(CAPTION_TEMPLATES)
    tokens = tokenizer([_sentence(k, t) for k in objects for t in range(n_t)]).view(len(objects), n_t, -1)
    obj_index = {k: j for j, k in enumerate(objects)}
    truth = torch.zeros(len(scenes), len(objects))
    for i, s in enumerate(scenes):
        for o in s["objects"]:
            truth[i, obj_index[(o["shape"], o["color"], o["position"])]] = 1.0

    # The token embedding (49408 x width, almost all rows unused here) stays at its random init:
    # random input vectors serve the text transformer as well, and it halves the step time.
    model.token_embedding.weight.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.05)
    model.train()
    losses = []
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, lr)
        idx = torch.randperm(len(scenes), generator=gen)[:batch_size]
        tmpl = torch.randint(0, n_t, (len(objects),), generator=gen)
        text = tokens[torch.arange(len(objects)), tmpl]
        pos = truth[idx]
        img_f, txt_f, scale = model(images[idx], text)[:3]  # normalised features, exp(logit_scale)
        logits = scale * img_f @ txt_f.T
        loss_i = -(pos / pos.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
        has_pos = pos.sum(0) > 0
        pt, lt = pos[:, has_pos], logits[:, has_pos].log_softmax(0)
        loss_t = -(pt / pt.sum(0, keepdim=True) * lt).sum(0).mean()
        loss = (loss_i + loss_t) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            log.info("clip step %d/%d loss %.3f", step + 1, steps, loss.item())
    model.eval()
    save_open_clip_folder(model, WORLD_CLIP_NAME, config, out_dir)
    return {"steps": steps, "batch_size": batch_size, "lr": lr, "images": len(scenes),
            "final_loss": sum(losses[-20:]) / len(losses[-20:]), "seconds": round(time.time() - t0, 1),
            "config": config}


# ---------------------------------------------------------------------------------------------
# open_clip vision trunk -> transformers CLIPVisionModel
# ---------------------------------------------------------------------------------------------


def open_clip_visual_to_hf(visual, quick_gelu: bool = False):
    """A transformers CLIPVisionModel with the weights of an open_clip VisionTransformer.

    Supported: the standard ViT (class-token pooling, learnable positions, ln_pre, no layer
    scale, no attentional pooler). The projection (`visual.proj`) is not part of a
    CLIPVisionModel; its `pooler_output` equals open_clip's pooled features before it.
    `quick_gelu` must match the open_clip config (open_clip uses exact GELU unless it is set).
    """
    from transformers import CLIPVisionConfig, CLIPVisionModel

    if getattr(visual, "attn_pool", None) is not None or visual.pool_type != "tok" or visual.final_ln_after_pool:
        raise ValueError("only class-token pooling without attentional pooler converts to CLIPVisionModel")
    if isinstance(visual.ln_pre, torch.nn.Identity):
        raise ValueError("open_clip no_ln_pre=True has no CLIPVisionModel equivalent")
    blocks = visual.transformer.resblocks
    b0 = blocks[0]
    if not (isinstance(b0.ls_1, torch.nn.Identity) and isinstance(b0.ls_2, torch.nn.Identity)):
        raise ValueError("layer scale (ls_init_value) has no CLIPVisionModel equivalent")
    act = type(b0.mlp.gelu).__name__
    if quick_gelu or act == "QuickGELU":
        hidden_act = "quick_gelu"
    elif act == "GELU" and getattr(b0.mlp.gelu, "approximate", "none") == "none":
        hidden_act = "gelu"
    else:
        raise ValueError(f"unsupported activation {act}")
    width = visual.conv1.out_channels
    cfg = CLIPVisionConfig(
        hidden_size=width, intermediate_size=b0.mlp.c_fc.out_features,
        num_hidden_layers=len(blocks), num_attention_heads=b0.attn.num_heads,
        image_size=visual.image_size[0], patch_size=visual.patch_size[0], num_channels=3,
        hidden_act=hidden_act, layer_norm_eps=visual.ln_post.eps,
        projection_dim=visual.proj.shape[1] if visual.proj is not None else width)
    sd = {"embeddings.class_embedding": visual.class_embedding,
          "embeddings.patch_embedding.weight": visual.conv1.weight,
          "embeddings.position_embedding.weight": visual.positional_embedding,
          "pre_layrnorm.weight": visual.ln_pre.weight,
          "pre_layrnorm.bias": visual.ln_pre.bias,
          "post_layernorm.weight": visual.ln_post.weight,
          "post_layernorm.bias": visual.ln_post.bias}
    for i, blk in enumerate(blocks):
        p = f"encoder.layers.{i}."
        qw, kw, vw = blk.attn.in_proj_weight.chunk(3, dim=0)
        qb, kb, vb = blk.attn.in_proj_bias.chunk(3, dim=0)
        sd |= {p + "self_attn.q_proj.weight": qw, p + "self_attn.q_proj.bias": qb,
               p + "self_attn.k_proj.weight": kw, p + "self_attn.k_proj.bias": kb,
               p + "self_attn.v_proj.weight": vw, p + "self_attn.v_proj.bias": vb,
               p + "self_attn.out_proj.weight": blk.attn.out_proj.weight,
               p + "self_attn.out_proj.bias": blk.attn.out_proj.bias,
               p + "layer_norm1.weight": blk.ln_1.weight, p + "layer_norm1.bias": blk.ln_1.bias,
               p + "layer_norm2.weight": blk.ln_2.weight, p + "layer_norm2.bias": blk.ln_2.bias,
               p + "mlp.fc1.weight": blk.mlp.c_fc.weight, p + "mlp.fc1.bias": blk.mlp.c_fc.bias,
               p + "mlp.fc2.weight": blk.mlp.c_proj.weight, p + "mlp.fc2.bias": blk.mlp.c_proj.bias}
    hf = CLIPVisionModel(cfg)
    # transformers 5 keeps the trunk's modules at the top level; 4.x nests them in `vision_model`
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in hf.state_dict()) else ""
    missing, unexpected = hf.load_state_dict({prefix + k: v.detach().clone() for k, v in sd.items()},
                                             strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"conversion mismatch: missing {missing}, unexpected {unexpected}")
    return hf.eval()


# ---------------------------------------------------------------------------------------------
# LLaVA SFT
# ---------------------------------------------------------------------------------------------


def _answer_loss_steps(model, examples: list, pixels, params: list, *, steps: int, batch_size: int, lr: float,
                       rng: random.Random, pad: int, name: str) -> list[float]:
    """`steps` AdamW steps on random batches of (prompt ids, answer ids, image index | None), loss on the
    answer tokens; a batch of text-only examples (index None) runs without pixel values."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, lr)
        batch = rng.sample(examples, min(batch_size, len(examples)))
        length = max(len(a) + len(b) for a, b, _ in batch)
        ids = torch.full((len(batch), length), pad, dtype=torch.long)
        labels = torch.full((len(batch), length), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), length), dtype=torch.long)
        for j, (a, b, _) in enumerate(batch):
            ids[j, :len(a) + len(b)] = torch.tensor(a + b)
            labels[j, len(a):len(a) + len(b)] = torch.tensor(b)
            mask[j, :len(a) + len(b)] = 1
        index = [i for _, _, i in batch]
        image_inputs = {} if index[0] is None else {"pixel_values": pixels[index]}
        out = model(input_ids=ids, attention_mask=mask, labels=labels, **image_inputs)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(out.loss.item())
        if step % 50 == 0 or step == steps - 1:
            log.info("%s step %d/%d loss %.3f", name, step + 1, steps, out.loss.item())
    return losses


def _new_world_llava(records: list[dict], clip_dir, out_dir, *, vocab_size: int, hidden_size: int, num_layers: int,
                     seed: int):
    """A tiny LLaVA with the world CLIP's image trunk and a tokenizer trained on the records' conversations
    (words as they appear there: " Yes", " There", with the space); saved to `out_dir`."""
    from csr.tiny import build_tiny_llava

    clip, _, _ = load_open_clip_folder(clip_dir)
    corpus = sorted({f"USER: <image>\n{r['prompt']} ASSISTANT: {r['answer']}</s>" for r in records})
    return build_tiny_llava(out_dir, corpus=corpus, vocab_size=vocab_size, hidden_size=hidden_size,
                            num_layers=num_layers, vision_model=open_clip_visual_to_hf(clip.visual), seed=seed)


def _train_images(world: Path, paths: list[str], processor) -> tuple[list, torch.Tensor]:
    """The world's training images (RGB) and their pixel values through the saved processor, in `paths` order."""
    from csr.data import load_image, resolve_image_path

    pil = [load_image(resolve_image_path(p, world / "train", allow_absolute=True, resolve=False)) for p in paths]
    pixels = torch.cat([processor.image_processor(pil[i:i + 512], return_tensors="pt")["pixel_values"]
                        for i in range(0, len(pil), 512)])
    return pil, pixels


def train_llava(world_dir: str | Path, clip_dir: str | Path, out_dir: str | Path, *,
                steps: int = DEFAULT_LLAVA["steps"], batch_size: int = DEFAULT_LLAVA["batch_size"],
                lr: float = DEFAULT_LLAVA["lr"], seed: int = 0, hidden_size: int = DEFAULT_LLAVA["hidden_size"],
                num_layers: int = DEFAULT_LLAVA["num_layers"], vocab_size: int = DEFAULT_LLAVA["vocab_size"],
                train_vision: bool = False,
                max_records: int | None = None) -> dict:
    """SFT a tiny LLaVA on train/sft.jsonl with the world CLIP's image trunk; save to `out_dir`."""

    from csr.models import build_chat_prompt

    world = Path(world_dir)
    t0 = time.time()
    rng = random.Random(seed)
    records = read_jsonl(world / "train" / "sft.jsonl")[:max_records]
    model, processor = _new_world_llava(records, clip_dir, out_dir, vocab_size=vocab_size, hidden_size=hidden_size,
                                        num_layers=num_layers, seed=seed)
    tok = processor.tokenizer

    # images once, through the saved processor (exactly what evaluation will feed)
    paths = sorted({r["image"] for r in records})
    img_index = {p: i for i, p in enumerate(paths)}
    pil, pixels = _train_images(world, paths, processor)

    # prompt ids (image tokens expanded by the processor) once per distinct prompt
    prompt_ids = {}
    for p in sorted({r["prompt"] for r in records}):
        enc = processor(text=[build_chat_prompt(processor, p)], images=[pil[0]], return_tensors="pt")
        prompt_ids[p] = enc["input_ids"][0].tolist()
    examples = []
    for r in records:
        ans = tok(" " + r["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        examples.append((prompt_ids[r["prompt"]], ans, img_index[r["image"]]))

    for p in model.model.vision_tower.parameters():
        p.requires_grad_(train_vision)
    params = [p for p in model.parameters() if p.requires_grad]
    losses = _answer_loss_steps(model, examples, pixels, params, steps=steps, batch_size=batch_size, lr=lr,
                                rng=rng, pad=tok.pad_token_id, name="llava")
    model.eval()
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return {"steps": steps, "batch_size": batch_size, "lr": lr, "records": len(records),
            "hidden_size": hidden_size, "num_layers": num_layers, "train_vision": train_vision,
            "final_loss": sum(losses[-20:]) / len(losses[-20:]), "seconds": round(time.time() - t0, 1)}


def train_aligned_llava(world_dir: str | Path, clip_dir: str | Path, out_dir: str | Path, *,
                        lm_steps: int = DEFAULT_ALIGNED["lm_steps"], align_steps: int = DEFAULT_ALIGNED["align_steps"],
                        batch_size: int = DEFAULT_ALIGNED["batch_size"], lm_lr: float = DEFAULT_ALIGNED["lm_lr"],
                        align_lr: float = DEFAULT_ALIGNED["align_lr"], seed: int = 0,
                        hidden_size: int = DEFAULT_ALIGNED["hidden_size"],
                        num_layers: int = DEFAULT_ALIGNED["num_layers"],
                        vocab_size: int = DEFAULT_ALIGNED["vocab_size"], max_records: int | None = None) -> dict:
    """The alignment-only LLaVA of the world (see the module docstring); saved to `out_dir`.

    Stage 1 (language model): every record of train/sft.jsonl as text only, the image placeholder
    removed from the chat prompt; the language model and its embeddings train, loss on the answer.
    Stage 2 (alignment): the caption records (kind 'caption') with their images; only the projector
    trains. The vision tower (the world CLIP's) never trains. Same tokenizer and sizes as
    `train_llava`, so instruction tuning from it is comparable with the world's base LLaVA.
    """

    from csr.content_free import content_free_prompt
    from csr.models import build_chat_prompt

    world = Path(world_dir)
    t0 = time.time()
    rng = random.Random(seed)
    records = read_jsonl(world / "train" / "sft.jsonl")[:max_records]
    captions = [r for r in records if r.get("kind") == "caption"]
    if not captions:
        raise ValueError(f"{world / 'train' / 'sft.jsonl'} has no caption records (kind 'caption') to align on")
    model, processor = _new_world_llava(records, clip_dir, out_dir, vocab_size=vocab_size, hidden_size=hidden_size,
                                        num_layers=num_layers, seed=seed)
    tok = processor.tokenizer

    def answer_ids(r):
        return tok(" " + r["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]

    # stage 1: the language model on the conversations as text (no image)
    text_prompt = {p: processor(text=[content_free_prompt(build_chat_prompt(processor, p), processor, "none")],
                                return_tensors="pt")["input_ids"][0].tolist()
                   for p in sorted({r["prompt"] for r in records})}
    text_examples = [(text_prompt[r["prompt"]], answer_ids(r), None) for r in records]
    inner = model.model
    for p in model.parameters():
        p.requires_grad_(False)
    lm_params = list(inner.language_model.parameters()) + list(model.lm_head.parameters())
    for p in lm_params:
        p.requires_grad_(True)
    lm_params = list(dict.fromkeys(lm_params))  # tied embeddings appear once
    lm_losses = _answer_loss_steps(model, text_examples, None, lm_params, steps=lm_steps, batch_size=batch_size,
                                   lr=lm_lr, rng=rng, pad=tok.pad_token_id, name="aligned/lm")

    # stage 2: the projector alone on captions with their images
    paths = sorted({r["image"] for r in captions})
    img_index = {p: i for i, p in enumerate(paths)}
    pil, pixels = _train_images(world, paths, processor)
    image_prompt = {p: processor(text=[build_chat_prompt(processor, p)], images=[pil[0]],
                                 return_tensors="pt")["input_ids"][0].tolist()
                    for p in sorted({r["prompt"] for r in captions})}
    caption_examples = [(image_prompt[r["prompt"]], answer_ids(r), img_index[r["image"]]) for r in captions]
    for p in model.parameters():
        p.requires_grad_(False)
    proj_params = list(inner.multi_modal_projector.parameters())
    for p in proj_params:
        p.requires_grad_(True)
    align_losses = _answer_loss_steps(model, caption_examples, pixels, proj_params, steps=align_steps,
                                      batch_size=batch_size, lr=align_lr, rng=rng, pad=tok.pad_token_id,
                                      name="aligned/projector")
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)

    def tail(xs):
        return sum(xs[-20:]) / len(xs[-20:]) if xs else None

    return {"lm_steps": lm_steps, "align_steps": align_steps, "batch_size": batch_size, "lm_lr": lm_lr,
            "align_lr": align_lr, "records": len(records), "caption_records": len(captions),
            "hidden_size": hidden_size, "num_layers": num_layers, "lm_final_loss": tail(lm_losses),
            "align_final_loss": tail(align_losses), "seconds": round(time.time() - t0, 1)}
