"""`csr plan`: the plan of the 7B recipe on CPU, from a LLaVA-1.5-7B config.json (no weights)."""

import json
from pathlib import Path

import pytest

from csr.cli import main as cli
from csr.config import ConfigError, load_config
from csr.plan import make_plan, tree_candidates

ROOT = Path(__file__).parent.parent

# llava-hf/llava-1.5-7b-hf's published config: Vicuna-7B (LLaMA-2 shapes, 32064 tokens) and CLIP ViT-L/14-336
LLAVA_7B = {
    "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "image_token_index": 32000,
    "projector_hidden_act": "gelu", "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
    "pad_token_id": 32001, "torch_dtype": "float16",
    "text_config": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                    "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064,
                    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False},
    "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
                      "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
                      "projection_dim": 768, "hidden_act": "quick_gelu"},
}


@pytest.fixture
def llava_7b(tmp_path):
    folder = tmp_path / "llava-1.5-7b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAVA_7B))
    return folder


def test_tree_candidates_by_hand():
    # K=5, N=5, official pruning keeps 1 best + 2 worst of a full level: 5 + 3*5 per later level
    assert tree_candidates(5, 5, 5, "official") == (5 + 4 * 15, 5 + 4 * 4 * 5)  # bound: 4 kept when < N are open
    assert tree_candidates(3, 2, 3, "best") == (3 + 2 * 3 + 2 * 3, 3 + 2 * 2 * 3)


def test_plan_of_the_7b_recipe(llava_7b, tmp_path):
    cfg = load_config(ROOT / "recipes/llava-1.5-7b/csr_paper.yaml", [
        f"model.model_name_or_path={llava_7b}", "run.num_processes=1", f"data.prompts={tmp_path / 'none.json'}"])
    text = make_plan(cfg)
    assert "(llava, 7.06 B parameters" in text  # the published count
    # LoRA on every linear layer of the LM, none of the vision tower: 7 kinds x 32 layers
    assert "r=128 on 224 linear layers: down_proj x32, gate_proj x32, k_proj x32, o_proj x32, q_proj x32, " \
           "up_proj x32, v_proj x32" in text
    # r (in + out) per layer: 4 x 128 x 8192 (attention) + 3 x 128 x 15104 (MLP) = 9,994,240; x 32 = 319.82 M
    assert "trainable      319.82 M (4.53% of 7.06 B)" in text
    # K=5, N=5, 24 sentences: 5 + 23 x 15 = 350 with no early end; at most 5 + 23 x 4 x 5 = 465
    assert "350 candidate sentences a tree when no path ends early, at most 465" in text
    # generation weights: 7.06 B x 2 bytes (bfloat16) = 13.2 GiB
    assert "weights   13.2 GiB (bfloat16)" in text
    # KV cache, 2 x 32 layers x 32 heads x 128 x 2 bytes = 0.5 MiB a token; 8 trees in flight keep 3 nodes each
    # (24 nodes, 120 rows). Cascade (the default): 8 x (576 image + 64 prompt) + 24 x 1024 / 4 chars + 120 x 74
    # = 20,144 tokens = 9.8 GiB; copies: 120 rows x (640 + 256 + 74) = 116,400 tokens = 56.8 GiB
    assert "KV cache    9.8 GiB (cascade: 8 prompts x 640 tokens, 24 nodes' paths x 256, 120 rows x 74" in text
    copies = make_plan(load_config(ROOT / "recipes/llava-1.5-7b/csr_paper.yaml", [
        f"model.model_name_or_path={llava_7b}", "run.num_processes=1", f"data.prompts={tmp_path / 'none.json'}",
        "generate.prefix_attention=copies"]))
    assert "KV cache   56.8 GiB (24 nodes x 5 beams = 120 sequences of <= 970 tokens" in copies
    # DPO, one process: the LoRA in float32, 4 + 4 + 8 bytes a parameter = 4.8 GiB beside the 13.2 GiB base
    assert "LoRA weights     1.2 GiB, gradients    1.2 GiB, AdamW states    2.4 GiB" in text
    assert "-> export (bfloat16)" in text
    assert "model_name_or_path: " + str(llava_7b) in text  # the resolved recipe comes first
    assert "prompts        unknown" in text


def test_plan_splits_dpo_memory_as_zero_does(llava_7b):
    def dpo_lines(*extra):
        text = make_plan(load_config(ROOT / "recipes/llava-1.5-7b/csr_paper.yaml",
                                     [f"model.model_name_or_path={llava_7b}", *extra]))
        return text.split("train (DPO)")[1]

    zero2 = dpo_lines("run.num_processes=8", "run.accelerate_config=zero2")
    # ZeRO-2 on 8 devices: gradients and AdamW states split 8 ways, weights whole
    assert "ZeRO-2 on 8 device(s)" in zero2 and "LoRA weights     1.2 GiB, gradients    0.1 GiB, AdamW states    0.3 GiB" in zero2
    zero3 = dpo_lines("run.num_processes=8", "run.accelerate_config=zero3")
    assert "ZeRO-3 on 8 device(s)" in zero3 and "frozen base      1.6 GiB" in zero3  # 13.2 / 8


def test_plan_without_config_json_names_the_file(tmp_path, capsys):
    empty = tmp_path / "model"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"model/config\.json"):
        make_plan(load_config(None, [f"model.model_name_or_path={empty}"]))
    assert cli(["plan", "--config", str(ROOT / "recipes/tiny/csr.yaml"), f"model.model_name_or_path={empty}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "config.json" in err
