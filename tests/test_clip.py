"""CLIP scoring: both backends load local folders, batched scores equal the per-sentence loop,
long sentences are truncated, bad checkpoints are refused."""

import pytest
import torch
from PIL import Image

from csr.models import ModelLoadError
from csr.score.clip import load_clip


@pytest.fixture(scope="module")
def images():
    return [Image.new("RGB", (40, 40), c) for c in [(220, 20, 20), (20, 200, 20), (20, 20, 220)]]


TEXTS = [["A red circle.", "A blue square is here.", "Nothing."], [], ["A green triangle on white."]]


def per_sentence_loop(clip, images, texts_per_image):
    """The official scoring: one CLIP call per (image, sentence)."""
    out = []
    for image, texts in zip(images, texts_per_image):
        row = []
        for t in texts:
            img = clip.image_features([image])[0]
            row.append(float(100.0 * clip.text_features([t])[0] @ img))
        out.append(row)
    return out


def test_open_clip_folder_batched_equals_loop(tiny_clip_dir, images):
    clip = load_clip("open_clip", str(tiny_clip_dir), device="cpu", batch_size=2)
    got = clip.scores_many(images, TEXTS)
    want = per_sentence_loop(clip, images, TEXTS)
    assert [len(r) for r in got] == [3, 0, 1]
    for g, w in zip(got, want):
        assert g == pytest.approx(w, abs=1e-4)
    assert all(-100 <= v <= 100 for row in got for v in row)
    assert len(set(round(v, 6) for v in got[0])) == 3  # texts are told apart
    long = "a red circle " * 200  # far past CLIP's 77 tokens: truncated, not an error
    assert len(clip.scores(images[0], [long])) == 1


def test_trimmed_open_clip_text_encoder_is_exact(tiny_clip_dir):
    import open_clip

    clip = load_clip("open_clip", str(tiny_clip_dir), device="cpu")
    model = clip._encode_text.__closure__ and next(c.cell_contents for c in clip._encode_text.__closure__
                                                   if isinstance(c.cell_contents, open_clip.model.CLIP))
    tokens = clip.tokenize(["A red circle.", "A much longer sentence about a small blue square near the top."])
    assert tokens.shape[1] == 77  # open_clip pads to the full context
    full = model.encode_text(tokens)
    assert torch.allclose(clip._encode_text(tokens), full, atol=1e-5)


def build_tiny_hf_clip(out):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor
    from tokenizers import processors

    from csr.tiny import build_tokenizer

    tok = build_tokenizer()
    bos, eos = tok.bos_token_id, tok.eos_token_id
    # CLIP pools the text at EOS: the tokenizer must append it or every text scores the same
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", bos), ("</s>", eos)])
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=bos,
                         eos_token_id=eos, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    CLIPModel(config).save_pretrained(out)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                     crop_size={"height": 32, "width": 32}),
                  tokenizer=tok).save_pretrained(out)


def test_hf_clip_backend(tmp_path, images):
    build_tiny_hf_clip(tmp_path / "hfclip")
    clip = load_clip("hf", str(tmp_path / "hfclip"), device="cpu", batch_size=2)
    got = clip.scores_many(images, TEXTS)
    want = per_sentence_loop(clip, images, TEXTS)
    for g, w in zip(got, want):
        assert g == pytest.approx(w, abs=1e-4)
    assert len(set(round(v, 6) for v in got[0])) == 3
    assert len(clip.scores(images[0], ["word " * 300])) == 1


def test_bad_clip_sources(tmp_path):
    with pytest.raises(ModelLoadError, match="unknown open_clip model"):
        load_clip("open_clip", "ViT-Nope-99", "openai", device="cpu")
    with pytest.raises(ModelLoadError, match="pickle"):
        load_clip("open_clip", "ViT-B-32", str(tmp_path / "ckpt.bin"), device="cpu")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_clip("open_clip", "ViT-B-32", str(tmp_path / "nope.safetensors"), device="cpu")
    (tmp_path / "half").mkdir()
    with pytest.raises(ModelLoadError, match="open_clip_config.json"):
        load_clip("open_clip", str(tmp_path / "half"), device="cpu")
    with pytest.raises(ModelLoadError, match="unknown CLIP backend"):
        load_clip("jax", "x", device="cpu")
