"""CLIP image-text scores for the visual constraint R_I = 100 · cos(CLIP_image(x), CLIP_text(s)).

Two backends behind one interface:
- open_clip: a model name with a pretrained tag (`ViT-L-14-336` + `openai`, the official choice),
  a model name with a local `.safetensors` checkpoint, or a folder holding
  `open_clip_config.json` + `open_clip_model.safetensors` (what `csr.tiny` and `csr world` write);
- hf: a transformers `CLIPModel` hub id or folder.
Texts longer than CLIP's context are truncated (the official code would fail on them instead).
Images are encoded once each; sentences are encoded in batches.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from csr.models import ModelLoadError, check_model_source, in_halving_chunks, resolve_device

log = logging.getLogger(__name__)


class ClipScorer:
    def __init__(self, encode_image, encode_text, preprocess, tokenize, device, batch_size: int = 64):
        self._encode_image, self._encode_text = encode_image, encode_text
        self.preprocess, self.tokenize = preprocess, tokenize
        self.device, self.batch_size = device, batch_size

    def _batched(self, items: list, encode) -> torch.Tensor:
        """Normalised features of `items` in batches; out of memory halves the batch (kept for later calls)."""
        parts, self.batch_size = in_halving_chunks(
            items, self.batch_size, lambda chunk: torch.nn.functional.normalize(encode(chunk).float(), dim=-1),
            "CLIP inputs", "score.clip_batch_size")
        return torch.cat(parts)

    @torch.no_grad()
    def image_features(self, images: list) -> torch.Tensor:
        return self._batched(images, lambda chunk: self._encode_image(
            torch.stack([self.preprocess(im) for im in chunk]).to(self.device)))

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        def encode(chunk):
            tokens = self.tokenize(chunk)
            tokens = {k: v.to(self.device) for k, v in tokens.items()} if isinstance(tokens, dict) \
                else tokens.to(self.device)
            return self._encode_text(tokens)
        return self._batched(texts, encode)

    def scores(self, image, texts: list[str]) -> list[float]:
        """100 · cos between one image and each text."""
        return self.scores_many([image], [texts])[0]

    def scores_many(self, images: list, texts_per_image: list[list[str]]) -> list[list[float]]:
        """100 · cos for many images, each with its own sentences: every image encoded once, and
        all sentences encoded together in batches of `batch_size`."""
        flat = [t for texts in texts_per_image for t in texts]
        if not flat:
            return [[] for _ in images]
        owner = torch.tensor([i for i, texts in enumerate(texts_per_image) for _ in texts], device=self.device)
        sims = 100.0 * (self.text_features(flat) * self.image_features(images)[owner]).sum(dim=-1)
        out, start = [], 0
        for texts in texts_per_image:
            out.append(sims[start:start + len(texts)].tolist())
            start += len(texts)
        return out


def trimmed_text_encoder(model):
    """open_clip's CLIP.encode_text without the padding columns: exact, and ~77/L times cheaper.

    open_clip pads every sentence to the 77-token context; with the causal mask and pooling at
    the end-of-text token, columns after the longest sentence cannot change any output, so they
    are cut. Models of another shape fall back to the library's encode_text.
    """
    from open_clip.model import CLIP
    from open_clip.transformer import text_global_pool

    if type(model) is not CLIP or getattr(model, "attn_mask", None) is None:
        return model.encode_text

    def encode(text):
        length = int((text != 0).sum(dim=1).max())  # 0 pads; every text has at least SOT and EOT
        text = text[:, :length]
        cast = model.transformer.get_cast_dtype()
        x = model.token_embedding(text).to(cast) + model.positional_embedding[:length].to(cast)
        x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
        x = text_global_pool(model.ln_final(x), text, model.text_pool_type,
                             eos_token_id=getattr(model, "text_eos_id", None))
        if model.text_projection is not None:
            x = model.text_projection(x) if isinstance(model.text_projection, torch.nn.Linear) \
                else x @ model.text_projection
        return x
    return encode


# ---------------------------------------------------------------------------------------------
# The open_clip folder format (written by csr.tiny and csr world, read by the open_clip backend):
# open_clip_config.json = {"model_name", "model_cfg"} + open_clip_model.safetensors.
# ---------------------------------------------------------------------------------------------


def register_open_clip_config(name: str, config: dict) -> None:
    """Make `name` known to open_clip (its registry reads JSON files from a folder)."""
    import tempfile

    import open_clip

    folder = Path(tempfile.mkdtemp(prefix="csr_open_clip_cfg_"))
    (folder / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)


def create_open_clip(name: str, config: dict):
    """(model, preprocess, tokenizer) for a config registered under `name` (random weights)."""
    import open_clip

    register_open_clip_config(name, config)
    root = logging.getLogger()
    was = root.disabled
    root.disabled = True  # open_clip warns "No pretrained weights loaded" on the root logger
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    finally:
        root.disabled = was
    return model, preprocess, open_clip.get_tokenizer(name)


def save_open_clip_folder(model, name: str, config: dict, out_dir: str | Path) -> None:
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "open_clip_config.json").write_text(json.dumps({"model_name": name, "model_cfg": config}, indent=2))
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
              str(out / "open_clip_model.safetensors"))


def load_open_clip_folder(folder: str | Path):
    """(model, preprocess, tokenizer) from an open_clip folder, in eval mode."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_file, weights = folder / "open_clip_config.json", folder / "open_clip_model.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise ModelLoadError(f"CLIP folder '{folder}' must hold open_clip_config.json and "
                             f"open_clip_model.safetensors.")
    meta = json.loads(cfg_file.read_text())
    model, preprocess, tokenizer = create_open_clip(meta["model_name"], meta["model_cfg"])
    model.load_state_dict(load_file(str(weights)))
    return model.eval(), preprocess, tokenizer


def _open_clip_scorer(model_name: str, pretrained: str, device, batch_size: int) -> ClipScorer:
    import open_clip

    folder = Path(model_name)
    if folder.is_dir():
        model, preprocess, tokenizer = load_open_clip_folder(folder)
    else:
        if pretrained and (pretrained.endswith((".bin", ".pt", ".pth"))):
            raise ModelLoadError(f"CLIP checkpoint '{pretrained}' is a pickle file; csr loads only "
                                 f"safetensors. Convert it first.")
        if pretrained and ("/" in pretrained or pretrained.endswith(".safetensors")) \
                and not Path(pretrained).is_file():
            raise ModelLoadError(f"CLIP checkpoint '{pretrained}' does not exist.")
        if model_name not in open_clip.list_models():
            raise ModelLoadError(f"unknown open_clip model '{model_name}'; pass a name from "
                                 f"open_clip.list_models() or a folder with open_clip_config.json.")
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained or None)
        tokenizer = open_clip.get_tokenizer(model_name)  # truncates to the context length, EOT kept last
    model = model.to(device).eval()
    return ClipScorer(model.encode_image, trimmed_text_encoder(model), preprocess, tokenizer, device, batch_size)


def _hf_clip_scorer(name_or_path: str, device, batch_size: int) -> ClipScorer:
    from transformers import CLIPModel, CLIPProcessor

    check_model_source(name_or_path)
    model = CLIPModel.from_pretrained(name_or_path, use_safetensors=True).to(device).eval()
    processor = CLIPProcessor.from_pretrained(name_or_path)
    max_len = model.config.text_config.max_position_embeddings

    def preprocess(image):
        return processor.image_processor(images=image, return_tensors="pt")["pixel_values"][0]

    def tokenize(texts):
        return dict(processor.tokenizer(texts, padding=True, truncation=True, max_length=max_len,
                                        return_tensors="pt"))

    def encode_image(pixels):
        out = model.get_image_features(pixel_values=pixels)
        return out if torch.is_tensor(out) else out.pooler_output

    def encode_text(tokens):
        out = model.get_text_features(**tokens)
        return out if torch.is_tensor(out) else out.pooler_output

    return ClipScorer(encode_image, encode_text, preprocess, tokenize, device, batch_size)


def load_clip(backend: str, model: str, pretrained: str = "", device: str = "auto",
              batch_size: int = 64) -> ClipScorer:
    dev = resolve_device(device)
    if backend == "open_clip":
        return _open_clip_scorer(model, pretrained, dev, batch_size)
    if backend == "hf":
        return _hf_clip_scorer(model, dev, batch_size)
    raise ModelLoadError(f"unknown CLIP backend '{backend}' (open_clip, hf).")


def load_clip_from_config(score_cfg, device: str = "auto") -> ClipScorer:
    return load_clip(score_cfg.clip_backend, score_cfg.clip_model, score_cfg.clip_pretrained, device,
                     score_cfg.clip_batch_size)
