"""Merging a round's LoRA (and trained projector) into a plain model folder."""

import json
import logging

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from csr.io import is_done, read_done
from csr.models import build_chat_prompt, load_processor
from csr.train_config import TrainConfig
from csr.train.merge import MergeError, merge_lora


def load_base(path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()


def make_adapter(base_dir, out, *, projector=True, scale=0.05, seed=0):
    """A LoRA adapter (+ projector copy) with non-zero weights, saved like the train stage saves it."""
    from peft import get_peft_model

    lora = TrainConfig(use_cpu=True, bf16=False, lora_r=4, lora_alpha=8, train_projector=projector,
                       projector_module="multi_modal_projector").lora_config()
    model = get_peft_model(load_base(base_dir), lora)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=gen) * scale)
    model.save_pretrained(out)
    return model.eval()


def fixed_inputs(model_dir, images_dir):
    processor = load_processor(str(model_dir))
    text = build_chat_prompt(processor, "Describe this image.") + " The image shows a red square."
    return dict(processor(images=Image.open(images_dir / "red.png"), text=text, return_tensors="pt"))


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_merge_matches_the_adapter_and_round_trips(tmp_path, tiny_llava_dir, images_dir):
    from peft import PeftModel

    peft_model = make_adapter(tiny_llava_dir, tmp_path / "adapter")
    inputs = fixed_inputs(tiny_llava_dir, images_dir)
    with_adapter = logits(peft_model, inputs)
    assert not torch.allclose(with_adapter, logits(load_base(tiny_llava_dir), inputs))  # the adapter matters

    in_memory = PeftModel.from_pretrained(load_base(tiny_llava_dir), str(tmp_path / "adapter")).merge_and_unload()
    assert torch.allclose(logits(in_memory.eval(), inputs), with_adapter, atol=1e-5, rtol=0)

    out = merge_lora(tiny_llava_dir, tmp_path / "adapter", tmp_path / "merged")
    assert out == tmp_path / "merged" and is_done(out)
    reloaded = load_base(out)
    assert torch.allclose(logits(reloaded, inputs), with_adapter, atol=1e-5, rtol=0)
    assert torch.equal(logits(reloaded, inputs), logits(in_memory, inputs))

    # a plain model folder: safetensors only, no adapter leftovers, no temp folder beside it
    files = {p.name for p in out.iterdir()}
    assert any(f.endswith(".safetensors") for f in files)
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    assert not any(n for n, _ in reloaded.named_parameters() if "lora_" in n or "modules_to_save" in n)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".merged")] == []
    summary = read_done(out)
    assert summary["dtype"] == "float32" and summary["changed_fraction"] == 1.0
    assert summary["modules_to_save"] == ["multi_modal_projector"]

    # the trained projector is the one in the merged model
    trained = {n.split("modules_to_save.default.")[1]: p for n, p in peft_model.named_parameters()
               if "multi_modal_projector.modules_to_save.default." in n}
    merged_proj = dict(reloaded.model.multi_modal_projector.named_parameters())
    assert trained and all(torch.equal(trained[k], merged_proj[k]) for k in trained)
    assert processor_matches(out, tiny_llava_dir)


def processor_matches(folder, base):
    """The folder's processor turns a chat prompt with an image into the base's tokens and pixels."""
    image = Image.new("RGB", (40, 30), (200, 30, 30))
    got, want = load_processor(str(folder)), load_processor(str(base))
    enc = [p(text=[build_chat_prompt(p, "What is red?")], images=[image], return_tensors="pt") for p in (got, want)]
    return (torch.equal(enc[0]["input_ids"], enc[1]["input_ids"])
            and torch.equal(enc[0]["pixel_values"], enc[1]["pixel_values"]))


def test_merge_skips_when_done_and_never_overwrites_a_folder_it_did_not_finish(tmp_path, tiny_llava_dir):
    make_adapter(tiny_llava_dir, tmp_path / "adapter", projector=False)
    foreign = tmp_path / "merged"
    foreign.mkdir()
    (foreign / "model.safetensors").write_bytes(b"a user's file")  # a merge is renamed into place whole,
    with pytest.raises(MergeError, match="not a finished model folder"):  # so this was not written by one
        merge_lora(tiny_llava_dir, tmp_path / "adapter", foreign)
    assert (foreign / "model.safetensors").read_bytes() == b"a user's file"
    (foreign / "model.safetensors").unlink()  # an empty folder is fine
    merge_lora(tiny_llava_dir, tmp_path / "adapter", foreign)
    merged, base = load_base(foreign).state_dict(), load_base(tiny_llava_dir).state_dict()
    assert is_done(foreign) and merged.keys() == base.keys()
    assert any(not torch.equal(merged[k], base[k]) for k in base)  # the adapter folded in
    stamp = (foreign / "DONE.json").stat().st_mtime_ns
    merge_lora(tiny_llava_dir, tmp_path / "adapter", foreign)  # done: untouched
    assert (foreign / "DONE.json").stat().st_mtime_ns == stamp


def test_merge_refuses_a_folder_that_is_not_an_adapter(tmp_path, tiny_llava_dir):
    with pytest.raises(MergeError, match="adapter_config.json"):
        merge_lora(tiny_llava_dir, tmp_path / "nothing", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_low_precision_merge_reports_lost_updates(tmp_path, tiny_llava_dir, caplog):
    # an update of the size lr 1e-7 DPO makes: below half a bf16 step of most weights
    make_adapter(tiny_llava_dir, tmp_path / "adapter", projector=False, scale=1e-5)
    with caplog.at_level(logging.WARNING, logger="csr.train.merge"):
        out = merge_lora(tiny_llava_dir, tmp_path / "adapter", tmp_path / "bf16", dtype="bfloat16")
    summary = read_done(out)
    assert summary["dtype"] == "bfloat16" and summary["changed_fraction"] < 0.5
    assert "float32" in caplog.text
    assert json.loads((out / "config.json").read_text()).get("dtype") == "bfloat16"
    full = read_done(merge_lora(tiny_llava_dir, tmp_path / "adapter", tmp_path / "fp32"))
    assert full["changed_fraction"] > 0.99


def test_merge_of_a_trained_adapter_with_projector(tmp_path, tiny_llava_dir, images_dir):
    from csr.config import load_config
    from csr.io import mark_done, write_jsonl
    from csr.train.stage import run_train

    pairs = tmp_path / "pairs"
    write_jsonl(pairs / "pairs.jsonl", [{
        "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}],
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": f"A {c} square."}]}],
        "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "A cat on a mat."}]}],
        "images": [str(images_dir / f"{c}.png")]} for c in ("red", "green", "blue", "red")])
    mark_done(pairs, {"stage": "pairs"})
    train = {"max_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 1e-3, "lora_r": 4,
             "lora_alpha": 8, "activation_checkpointing": False, "save_strategy": "no",
             "train_projector": True, "projector_learning_rate": 1e-2}
    cfg = load_config(None, [f"train.{k}={json.dumps(v)}" for k, v in train.items()])
    run_train(cfg, str(tiny_llava_dir), pairs, tmp_path / "train")
    adapter = tmp_path / "train" / "adapter"
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    proj = {k.split("multi_modal_projector.")[1]: v for k, v in saved.items() if "multi_modal_projector" in k}
    assert proj  # the trained projector travels with the adapter

    out = merge_lora(tiny_llava_dir, adapter, tmp_path / "merged")
    merged = dict(load_base(out).model.multi_modal_projector.named_parameters())
    base = dict(load_base(tiny_llava_dir).model.multi_modal_projector.named_parameters())
    for name, value in proj.items():
        assert torch.equal(merged[name], value) and not torch.equal(base[name], value)


def test_merged_and_exported_folders_are_sharded_with_the_base_tokenizer_files(tmp_path, tiny_llava_dir):
    from transformers import AutoModelForImageTextToText

    from csr.train.merge import TOKENIZER_FILES, export_model

    make_adapter(tiny_llava_dir, tmp_path / "adapter", projector=False)
    merged = merge_lora(tiny_llava_dir, tmp_path / "adapter", tmp_path / "merged", max_shard_size="300KB")
    exported = export_model(merged, tmp_path / "export", "bfloat16", max_shard_size="300KB")
    base_files = [n for n in TOKENIZER_FILES if (tiny_llava_dir / n).is_file()]
    assert "tokenizer.json" in base_files and "tokenizer_config.json" in base_files
    for folder, dtype in ((merged, torch.float32), (exported, torch.bfloat16)):
        # the Hub's layout: shards no bigger than the limit, an index naming every tensor's shard
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 1 and all((folder / s).stat().st_size <= 300_000 + 50_000 for s in shards)
        assert not (folder / "model.safetensors").exists()
        for name in base_files:  # byte for byte, not re-saved by this transformers
            assert (folder / name).read_bytes() == (tiny_llava_dir / name).read_bytes(), name
        model = AutoModelForImageTextToText.from_pretrained(folder, dtype="auto")
        assert {p.dtype for p in model.parameters()} == {dtype}
        assert processor_matches(folder, tiny_llava_dir)
    reference = load_base(merged).state_dict()
    for name, value in AutoModelForImageTextToText.from_pretrained(exported, dtype="auto").state_dict().items():
        assert torch.equal(value, reference[name].to(torch.bfloat16)), name
    assert read_done(exported)["dtype"] == "bfloat16"


def test_model_card_of_a_round(tmp_path, tiny_llava_dir):
    import yaml

    from csr.card import CONFIG_NAME, front_matter, write_round_card
    from csr.io import atomic_write_json, mark_done

    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: llama2\ntags: [x]\n---\n# a base\n")
    run = tmp_path / "run"
    recipe = {"model": {"model_name_or_path": str(base)}, "generate": {"num_candidates": 5, "sentence_beam_width": 5},
              "score": {"reward_lambda": 0.9, "clip_model": "ViT-L-14-336"}}
    (run / "round_2" / "merge").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(recipe))
    mark_done(run / "round_2" / "pairs", {"pairs": 1234, "margin_mean": 2.5})
    mark_done(run / "round_2" / "train", {"steps": 155, "learning_rate": 1e-7, "beta": 0.1, "lora": {"r": 128, "alpha": 256}})
    mark_done(run / "round_2" / "merge", {"dtype": "float32", "policy": str(run / "round_1" / "merge")})
    atomic_write_json(run / "eval" / "round_2.json", {"model": "x", "pope": {"all": {"f1": 0.8512}}, "chair": {"chair_i": 0.044}})
    card = write_round_card(run, 2, run / "round_2" / "merge").read_text()
    meta = front_matter(card)
    assert meta["base_model"] == str(base) and meta["license"] == "llama2" and "csr" in meta["tags"]
    assert "after 2 rounds" in card and f"[`{CONFIG_NAME}`]({CONFIG_NAME})" in card
    assert "1234 pairs" in card and "r 128, alpha 256, learning rate 1e-07" in card and "155 steps" in card
    assert "| pope/all/f1 | 0.8512 |" in card and "| chair/chair_i | 0.044 |" in card
    assert "saved in float32" in card and "arXiv:2405.14622" in card
    assert yaml.safe_load((run / "round_2" / "merge" / CONFIG_NAME).read_text()) == recipe
