"""The DPO train stage on a tiny LLaVA: what moves, what must not, and the stage's bookkeeping."""

import dataclasses
import json
import math
import shutil
import logging

import pytest
import torch
from PIL import Image

from csr.config import ConfigError, load_config
from csr.io import StageInputMissing, is_done, mark_done, read_done, write_jsonl
from csr.train_config import LM_LINEAR_REGEX, TrainConfig
from csr.train.args import build_train_args, shipped_deepspeed_configs
from csr.train.data import TrainInputError, pairs_dataset, read_pairs
from csr.train.stage import run_train
from csr.train.trainer import build_trainer, lora_module_names

# Small and fast: a few steps at a learning rate high enough to move the weights visibly.
FAST = {"max_steps": 3, "per_device_train_batch_size": 2, "learning_rate": 1.0e-3, "lora_r": 8,
        "lora_alpha": 16, "activation_checkpointing": False, "save_strategy": "no"}


def make_cfg(**train):
    overrides = [f"train.{k}={json.dumps(v)}" for k, v in {**FAST, **train}.items()]  # JSON is YAML
    return load_config(None, overrides)


def make_pairs(folder, images_dir, n=6):
    colours = ["red", "green", "blue"]
    records = []
    for i in range(n):
        c = colours[i % 3]
        records.append({
            "id": f"p{i}",
            "prompt": [{"role": "user", "content": [{"type": "image"},
                                                    {"type": "text", "text": "Describe this image in detail."}]}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": f"The image shows a {c} square."}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "A cat sits on a mat. A dog."}]}],
            "images": [str(images_dir / f"{c}.png")],
        })
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "pairs.jsonl", records)
    mark_done(folder, {"stage": "pairs", "processed": n})
    return folder


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def fixed_batch(trainer, n=2):
    ds = trainer.train_dataset
    return trainer.data_collator([ds[i] for i in range(n)])


def ref_logps(trainer, batch):
    """TRL's own reference pass (adapters disabled), in eval mode."""
    trainer.model.eval()
    chosen, rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    return torch.cat([chosen, rejected]).detach().clone()


def policy_logits(model, batch):
    model.eval()
    keys = ("input_ids", "attention_mask", "pixel_values")
    with torch.no_grad():
        return model(**{k: batch[k] for k in keys}).logits.detach().clone()


# ---------------------------------------------------------------------------------------------


def test_defaults_are_the_papers():
    defaults = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
                for f in dataclasses.fields(TrainConfig)}
    assert defaults["lora_r"] == 128 and defaults["lora_alpha"] == 256 and defaults["lora_dropout"] == 0.05
    assert defaults["learning_rate"] == 1e-7 and defaults["beta"] == 0.1
    assert defaults["loss_type"] == ["sigmoid"] and defaults["lr_scheduler_type"] == "cosine"
    assert defaults["num_train_epochs"] == 1 and defaults["warmup_steps"] == 0.03 and defaults["bf16"] is True
    assert defaults["lora_target_modules"] == LM_LINEAR_REGEX
    assert defaults["train_projector"] is False and defaults["projector_learning_rate"] == 2e-5
    # every field this project adds or overrides explains itself
    own = {f.name for f in dataclasses.fields(TrainConfig)} - set(TrainConfig.__mro__[1].__dataclass_fields__)
    own |= set(TrainConfig.__dict__.get("__annotations__", {}))
    for name in own:
        assert TrainConfig.__dataclass_fields__[name].metadata.get("help"), name
    # and a built config resolves them as TrainingArguments reads them
    args = TrainConfig(use_cpu=True, bf16=False)
    assert args.warmup_steps == 0.03 and args.get_warmup_steps(1000) == 30
    assert args.lr_scheduler_type == "cosine" and args.output_dir  # output_dir not required
    assert args.activation_checkpointing is True and args.disable_dropout is False
    lora = args.lora_config()
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, lora.modules_to_save) == (128, 256, 0.05, None)


def test_cpu_turns_bf16_off_with_a_note(tmp_path, caplog):
    cfg = load_config(None, ["run.seed=7", "run.report_to=none"])
    with caplog.at_level(logging.INFO, logger="csr.train.args"):
        args = build_train_args(cfg, tmp_path / "out", cuda_available=False)
    assert args.bf16 is False and args.use_cpu is True and args.seed == 7
    assert args.output_dir == str(tmp_path / "out") and args.report_to in ([], ["none"], "none")
    assert "bf16" in caplog.text


def test_missing_deepspeed_config_is_refused(tmp_path):
    cfg = make_cfg(deepspeed="/no/such/ds_config.json")
    with pytest.raises(ConfigError) as e:
        build_train_args(cfg, tmp_path / "out", cuda_available=False)
    msg = str(e.value)
    assert "/no/such/ds_config.json" in msg and "no such file" in msg
    shipped = shipped_deepspeed_configs()
    assert shipped and all(str(p) in msg for p in shipped)
    # a shipped config by name resolves to its file
    args = build_train_args(make_cfg(deepspeed="zero2"), tmp_path / "out", cuda_available=False)
    assert args.deepspeed.endswith("zero2.json")


def test_missing_or_empty_pairs_are_refused(tmp_path, tiny_llava_dir, images_dir):
    cfg = make_cfg()
    with pytest.raises(StageInputMissing, match="'pairs'"):
        run_train(cfg, str(tiny_llava_dir), tmp_path / "no_pairs", tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "pairs.jsonl").write_text("")
    mark_done(empty, {})
    with pytest.raises(TrainInputError, match="no pairs"):
        run_train(cfg, str(tiny_llava_dir), empty, tmp_path / "out")
    assert not is_done(tmp_path / "out")


def test_dpo_moves_lora_and_nothing_else(tmp_path, tiny_llava_dir, images_dir):
    pairs = make_pairs(tmp_path / "pairs", images_dir)
    args = build_train_args(make_cfg(), tmp_path / "out", cuda_available=False)
    trainer = build_trainer(make_cfg(), str(tiny_llava_dir), pairs_dataset(read_pairs(pairs)), args)

    lora = lora_module_names(trainer.model)
    assert len(lora) == 2 * 7  # 2 layers x q, k, v, o, gate, up, down
    assert all("language_model" in n for n in lora)
    assert not any("vision_tower" in n or "multi_modal_projector" in n for n in lora)

    before = snapshot(trainer.model)
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    trainer.train()
    after = snapshot(trainer.model)
    for name, value in before.items():
        moved = not torch.equal(value, after[name])
        if name in trainable:
            assert moved, f"trainable {name} did not move"
        else:
            assert not moved, f"frozen {name} moved"
    frozen = [n for n in before if n not in trainable]
    assert any("vision_tower" in n for n in frozen) and any("multi_modal_projector" in n for n in frozen)


def test_trained_projector_keeps_the_reference(tmp_path, tiny_llava_dir, images_dir):
    pairs = make_pairs(tmp_path / "pairs", images_dir)
    cfg = make_cfg(train_projector=True, projector_learning_rate=1.0e-2)
    args = build_train_args(cfg, tmp_path / "out", cuda_available=False)
    trainer = build_trainer(cfg, str(tiny_llava_dir), pairs_dataset(read_pairs(pairs)), args)
    batch = fixed_batch(trainer)
    ref_before, logits_before = ref_logps(trainer, batch), policy_logits(trainer.model, batch)
    before = snapshot(trainer.model)

    trainer.train()
    after = snapshot(trainer.model)
    trained_proj = [n for n in before if "multi_modal_projector.modules_to_save" in n]
    original_proj = [n for n in before if "multi_modal_projector.original_module" in n]
    assert trained_proj and original_proj
    assert all(not torch.equal(before[n], after[n]) for n in trained_proj)  # the projector trains
    assert all(torch.equal(before[n], after[n]) for n in original_proj)  # its reference copy does not
    # the reference pass (adapters off) is the round's starting model, bit for bit
    assert torch.equal(ref_logps(trainer, batch), ref_before)
    assert not torch.allclose(policy_logits(trainer.model, batch), logits_before)
    # the projector has its own learning rate
    assert {g["initial_lr"] for g in trainer.optimizer.param_groups} == {1e-3, 1e-2}


def test_run_train_writes_adapter_and_summary_then_skips(tmp_path, tiny_llava_dir, images_dir):
    pairs = make_pairs(tmp_path / "pairs", images_dir)
    out = tmp_path / "out"
    # default activation checkpointing (on) is exercised here
    cfg = make_cfg(activation_checkpointing=None, save_strategy="steps", save_steps=2)
    summary = run_train(cfg, str(tiny_llava_dir), pairs, out)
    assert is_done(out) and read_done(out) == json.loads(json.dumps(summary))
    assert summary["steps"] == 3 and summary["num_pairs"] == 6 and summary["reference_unchanged"] is True
    assert summary["final_loss"] > 0 and math.isfinite(summary["final_rewards_margins"])  # DPO's loss is > 0
    assert 0 <= summary["final_rewards_accuracies"] <= 1
    adapter = out / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    assert not list(adapter.glob("*.bin")) and not list(out.glob("checkpoint-*"))  # cleaned up once done
    assert json.loads((out / "train_args.json").read_text())["learning_rate"] == 1e-3
    # done: the second call returns the stored summary without training
    assert run_train(cfg, str(tiny_llava_dir), pairs, out) == read_done(out)


def test_run_train_resumes_from_a_checkpoint(tmp_path, tiny_llava_dir, images_dir):
    pairs = make_pairs(tmp_path / "pairs", images_dir)
    out = tmp_path / "out"
    first = make_cfg(max_steps=2, save_strategy="steps", save_steps=2, keep_checkpoints=True)
    run_train(first, str(tiny_llava_dir), pairs, out)
    assert (out / "checkpoint-2").is_dir()
    (out / "DONE.json").unlink()  # as if the run had died after its checkpoint
    # the same recipe resumes (checkpoint and logging settings are not results: they may change)
    summary = run_train(make_cfg(max_steps=2), str(tiny_llava_dir), pairs, out)
    assert summary["resumed_from"].endswith("checkpoint-2")
    # another schedule is refused, naming the key, rather than resumed on the old one
    (out / "DONE.json").unlink()
    from csr.runstate import SettingsChanged

    with pytest.raises(SettingsChanged, match=r"train.max_steps: 2 -> 5.*--redo-from train"):
        run_train(make_cfg(max_steps=5), str(tiny_llava_dir), pairs, out)


def test_dpo_batches_start_with_bos_like_generation(tiny_llava_dir, tmp_path):
    """TRL tokenises the chat without special tokens; the stage puts back the BOS generation sees."""
    from csr.models import build_chat_prompt, load_processor
    from csr.train.args import build_train_args
    from csr.train.data import pairs_dataset
    from csr.train.trainer import build_trainer

    processor = load_processor(str(tiny_llava_dir))
    image = tmp_path / "im.png"
    Image.new("RGB", (32, 32), (200, 0, 0)).save(image)
    pair = {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "A red square."}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "A dog."}]}],
            "images": [str(image)]}
    cfg = load_config(None, ["train.use_cpu=true", "train.bf16=false", "train.lora_r=4", "train.lora_alpha=8"])
    trainer = build_trainer(cfg, str(tiny_llava_dir), pairs_dataset([pair, pair]),
                            build_train_args(cfg, tmp_path / "out"))
    batch = next(iter(trainer.get_train_dataloader()))
    generation = processor(images=Image.open(image), text=build_chat_prompt(processor, "Describe."))["input_ids"][0]
    assert batch["input_ids"][0, 0] == processor.tokenizer.bos_token_id == generation[0]
    prompt_len = len(generation)
    assert batch["input_ids"][0, :prompt_len].tolist() == list(generation)  # same prefix as generation
    assert batch["completion_mask"][0, :prompt_len].sum() == 0


def test_a_resumed_train_stage_writes_each_tensorboard_point_once(tmp_path, tiny_llava_dir, images_dir, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pairs = make_pairs(tmp_path / "pairs", images_dir)
    out, tb = tmp_path / "out", tmp_path / "tb"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tb))
    cfg = make_cfg(max_steps=3, save_strategy="steps", save_steps=2, save_total_limit=3, keep_checkpoints=True,
                   logging_steps=1, report_to=["tensorboard"])
    run_train(cfg, str(tiny_llava_dir), pairs, out)
    (out / "DONE.json").unlink()  # as if killed after step 3 had been logged, with checkpoint-2 saved
    shutil.rmtree(out / "checkpoint-3", ignore_errors=True)
    summary = run_train(cfg, str(tiny_llava_dir), pairs, out)
    assert summary["resumed_from"].endswith("checkpoint-2")
    events = EventAccumulator(str(tb))
    events.Reload()
    loss_tag = next(t for t in events.Tags()["scalars"] if t.endswith("loss") and "train" in t)
    assert [e.step for e in events.Scalars(loss_tag)] == [1, 2, 3]  # step 3 logged twice, kept once
