"""Every supported model class, on a tiny model of the same architecture class built from config:
the registry knows it, the search positions it as transformers' own generate() does, and one round
of every stage (generate -> score -> pairs -> train -> merge) runs on it, ending in a merged folder
that loads back as the same class. An unsupported class is refused before any work."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from csr.config import load_config
from csr.models import SUPPORTED_CLASSES, ModelLoadError, build_chat_prompt, check_model_class, load_policy
from csr.tree_format import prefix_text
from csr.tiny import TINY_BUILDERS

ROOT = Path(__file__).parent.parent


def test_every_supported_class_has_a_tiny_model():
    assert set(SUPPORTED_CLASSES) == set(TINY_BUILDERS)


@pytest.fixture(scope="session", params=sorted(SUPPORTED_CLASSES))
def tiny_model(request, tmp_path_factory):
    """(model_type, folder) of a tiny random model of each supported class (LLaVA: the shared one)."""
    if request.param == "llava":
        return "llava", request.getfixturevalue("tiny_llava_dir")
    out = tmp_path_factory.mktemp(f"tiny_{request.param}")
    TINY_BUILDERS[request.param](out)
    return request.param, out


def test_registry_reads_the_class_from_the_config(tiny_model):
    model_type, folder = tiny_model
    spec = check_model_class(str(folder))
    assert spec.model_type == model_type
    assert json.loads((folder / "config.json").read_text())["architectures"] == [spec.architecture]
    model, _ = load_policy(str(folder), device="cpu")
    names = {n for n, _ in model.named_modules()}
    assert any(n.endswith(spec.projector) for n in names) and any(n.endswith(spec.vision_tower) for n in names)


# ---------------------------------------------------------------------------------------------
# generate: positions as generate() computes them, the cached path equal to the reference
# ---------------------------------------------------------------------------------------------


def self_score(siblings):
    return [n["logprob_sum"] for n in siblings]


def test_search_matches_generate_and_the_reference_path(tiny_model, images_dir):
    """Group 0 of a node's expansion is plain greedy decoding (no diversity penalty): it must give
    generate()'s tokens and log-probs on the node's full text. With Qwen2.5-VL's 3-D rope, 1-D
    positions would move the log-probs by ~1e-3 here; LLaVA-NeXT needs image_sizes."""
    from csr.generate.expander import CachedLlavaExpander, LlavaExpander
    from csr.generate.tree import TreeSettings, grow_tree, grow_trees
    from csr.models import sentence_end_ids

    model, processor = load_policy(str(tiny_model[1]), device="cpu")
    kw = dict(num_candidates=3, diversity_penalty=3.0, max_new_tokens=6, stop_ids=sentence_end_ids(processor.tokenizer))
    reference = LlavaExpander(model, processor, node_batch_size=1, **kw)
    fast = CachedLlavaExpander(model, processor, node_batch_size=4, **kw)
    images = [Image.open(images_dir / "red.png").convert("RGB"), Image.new("RGB", (64, 30), (20, 20, 220))]
    prompts = [build_chat_prompt(processor, "<image>\nDescribe this image in detail."),
               build_chat_prompt(processor, "What shapes do you see?")]

    sentences = ["The image shows a red circle."]
    text = prefix_text(prompts[1], sentences)
    processor.tokenizer.padding_side = "left"
    enc = processor(images=[images[1]], text=[text], return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    cache = fast.encode_prompts(images, prompts)
    group0 = fast.expand_many(cache, [(1, sentences)])[0][0][1]
    n = group0.n_tokens
    assert group0.token_ids == out.sequences[0, enc["input_ids"].shape[1]:][:n].tolist()
    want = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, group0.token_ids)]
    assert group0.logprobs == pytest.approx(want, abs=1e-4)

    settings = TreeSettings(sentence_beam_width=3, pruning="official", max_response_chars=200, max_sentences=3)
    expected = [grow_tree(lambda r, i=i: reference.expand(images[i], prompts[i], r), self_score, settings)
                for i in range(2)]
    got = grow_trees(lambda requests: fast.expand_many(cache, requests), [self_score] * 2, settings)
    for want_tree, have_tree in zip(expected, got):
        assert len(want_tree) > 1 + 3  # past the first level
        assert [nd["text"] for nd in have_tree] == [nd["text"] for nd in want_tree]
        for a, b in zip(have_tree[1:], want_tree[1:]):
            assert a["logprob_sum"] == pytest.approx(b["logprob_sum"], abs=1e-4)


# ---------------------------------------------------------------------------------------------
# one round of every stage
# ---------------------------------------------------------------------------------------------


def round_cfg(model_dir, clip_dir, images_dir, tmp_path, *extra):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"id": "p0", "image": "red.png", "input": "<image>\nDescribe this image in detail."},
                                   {"id": "p1", "image": "blue.png", "input": "What shapes do you see?\n<image>"}]))
    return load_config(ROOT / "recipes" / "tiny" / "csr.yaml", [
        f"model.model_name_or_path={model_dir}", f"score.clip_model={clip_dir}", f"data.prompts={prompts}",
        f"data.image_root={images_dir}", f"run.output_dir={tmp_path / 'run'}", *extra])


def test_one_round_of_every_stage(tiny_model, tiny_clip_dir, images_dir, tmp_path):
    from transformers import AutoModelForImageTextToText

    from csr.io import read_jsonl
    from csr.loop import run_round

    model_type, base_dir = tiny_model
    spec = SUPPORTED_CLASSES[model_type]
    # VIG in the reward: the score stage runs the policy itself (teacher-forced log-probs with
    # and without the image); the projector trains too, as the official recipe does
    cfg = round_cfg(base_dir, tiny_clip_dir, images_dir, tmp_path, "score.vig_weight=0.5",
                    "train.train_projector=true", "train.projector_learning_rate=1.0e-2")
    rd = tmp_path / "run" / "round_1"
    merged, stages = run_round(cfg, str(base_dir), rd)

    assert stages["generate"]["processed"] == 2
    for tree in read_jsonl(rd / "score" / "scored.jsonl"):
        assert all("vig" in n and "reward" in n for n in tree["nodes"][1:])
    assert stages["pairs"]["pairs"] >= 1
    train = stages["train"]
    assert train["steps"] >= 1 and train["reference_unchanged"] is True
    assert json.loads((rd / "train" / "train_args.json").read_text())["projector_module"] == spec.projector
    adapter = json.loads((rd / "train" / "adapter" / "adapter_config.json").read_text())
    assert adapter["modules_to_save"] == [spec.projector]

    # the merged folder is the same class, loads with the generic auto class, and only the
    # language model (LoRA) and the projector moved
    model = AutoModelForImageTextToText.from_pretrained(merged)
    assert type(model).__name__ == spec.architecture and check_model_class(merged) == spec
    # compared as loaded: the files may hold a class's legacy key layout
    base, new = AutoModelForImageTextToText.from_pretrained(base_dir).state_dict(), model.state_dict()
    assert set(base) == set(new)
    moved = {k for k in base if not torch.equal(base[k], new[k])}

    def under(module, key):
        return f".{module}." in f".{key}."
    assert any(under("language_model", k) and "q_proj" in k for k in moved), sorted(moved)
    assert any(under(spec.projector, k) for k in moved)
    assert all(under("language_model", k) or under(spec.projector, k) for k in moved), sorted(moved)
    # (Qwen2.5-VL's projector, visual.merger, sits inside its vision tower)
    assert not any(under(spec.vision_tower, k) and not under(spec.projector, k) for k in moved), sorted(moved)
    load_policy(merged, device="cpu")  # the next round's policy loads like the first


# ---------------------------------------------------------------------------------------------
# an unsupported class
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def unsupported_dir(tmp_path):
    """A finished-looking folder of a class csr does not support (config only: nothing may load)."""
    d = tmp_path / "paligemma"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "paligemma", "architectures": ["PaliGemmaForConditionalGeneration"]}))
    return d


def test_unsupported_class_is_refused_naming_the_supported_ones(unsupported_dir):
    with pytest.raises(ModelLoadError) as err:
        check_model_class(str(unsupported_dir))
    message = str(err.value)
    assert "'paligemma'" in message
    assert all(t in message for t in ("llava", "llava_next", "qwen2_5_vl"))
    with pytest.raises(ModelLoadError, match="paligemma"):
        load_policy(str(unsupported_dir), device="cpu")


@pytest.mark.slow  # subprocesses: ~15-25 s
def test_csr_run_refuses_an_unsupported_class_before_any_work(unsupported_dir, tiny_clip_dir, images_dir, tmp_path):
    cfg = round_cfg(unsupported_dir, tiny_clip_dir, images_dir, tmp_path)
    from csr.loop import run

    with pytest.raises(ModelLoadError, match="Supported model types"):
        run(cfg)
    assert not (tmp_path / "run" / "round_1").exists()
    # the command line: one clear line, exit status 2
    res = subprocess.run([sys.executable, "-m", "csr.cli", "generate", "--config", str(ROOT / "recipes/tiny/csr.yaml"),
                          "--policy", str(unsupported_dir), "--out", str(tmp_path / "gen"),
                          f"data.prompts={tmp_path / 'prompts.json'}", f"data.image_root={images_dir}"],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "does not support" in res.stderr and "qwen2_5_vl" in res.stderr
    assert "Traceback" not in res.stderr
