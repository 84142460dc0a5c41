"""`csr plan`: what a recipe means before a launch, without loading weights.

Prints the resolved recipe, the stages of each round, the prompt count, how many candidate sentences
a tree can need, which modules LoRA targets and how many parameters train (the model is built on
PyTorch's meta device from its config.json: shapes, no memory), and a memory estimate per device
for generation and for DPO under the recipe's accelerate config (ZeRO stage, processes, machines).

The estimates are first-order, to size a launch, not to replace a trial run:
- generation: the weights in model.torch_dtype plus the key/value cache of one node batch (every
  active node of `prompt_batch_size` trees, `num_candidates` beams each, at the longest sequence);
- DPO: the frozen base in train.model_dtype, the LoRA weights, gradients and AdamW states in float32
  (16 bytes a trainable parameter), split across devices as the ZeRO stage splits them, and the
  activations of a chosen + rejected batch (one layer's input per layer kept with activation
  checkpointing) plus their float32 logits.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import yaml

from csr.config import ConfigError, CSRConfig, load_config

GIB = 1024 ** 3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
PROMPT_TOKENS = 64      # the chat template and the question, a typical LLaVA prompt
CHARS_PER_TOKEN = 4     # English text in a LLaMA-family tokenizer, roughly


# ---------------------------------------------------------------------------------------------
# The tree
# ---------------------------------------------------------------------------------------------


def kept(open_nodes: int, width: int, pruning: str) -> int:
    """Nodes a level keeps out of `open_nodes` (csr.generate.tree.prune)."""
    if pruning == "best":
        return min(open_nodes, width)
    return open_nodes if open_nodes < width else width // 2 - 1 + width // 2


def tree_candidates(k: int, width: int, depth: int, pruning: str) -> tuple[int, int]:
    """(candidates when no path ends early, an upper bound whatever ends early) for one tree.

    Level 1 expands the root into K candidates; each later level expands every kept node into K.
    Paths that end early leave fewer open nodes, which official pruning may all keep (up to N - 1).
    """
    active, full = 1, 0
    for _ in range(depth):
        full += active * k
        active = kept(active * k, width, pruning)
    most = max(kept(n, width, pruning) for n in range(1, max(width, k) * max(width, k) + 1))
    bound = k + (depth - 1) * most * k
    return full, max(full, bound)


# ---------------------------------------------------------------------------------------------
# The model, on the meta device
# ---------------------------------------------------------------------------------------------


def model_config(name_or_path: str, trust_remote_code: bool = False):
    """The model's transformers config from its config.json (a folder, or a hub id's cached config)."""
    from transformers import AutoConfig

    from csr.models import ModelLoadError, check_model_class

    folder = Path(name_or_path).expanduser()
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise ConfigError(f"{folder / 'config.json'}: no such file; `csr plan` reads the model's config.json "
                          f"(model.model_name_or_path must be a save_pretrained folder or a hub id).")
    try:
        check_model_class(name_or_path, trust_remote_code=trust_remote_code)
        return AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, ModelLoadError) as e:
        raise ConfigError(f"cannot read config.json of model.model_name_or_path '{name_or_path}': {e}") from None


def meta_model(config):
    import torch
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config)


def _train_value(cfg: CSRConfig, key: str):
    import dataclasses

    from csr.config import _train_fields

    if key in cfg.train:
        return cfg.train[key]
    f = _train_fields()[key]
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


@dataclass
class LoraPlan:
    total_params: int
    modules: dict[str, int]        # module kind (q_proj ...) -> how many get LoRA
    lora_params: int
    projector: str | None
    projector_params: int

    @property
    def trainable(self) -> int:
        return self.lora_params + self.projector_params


def lora_plan(model, cfg: CSRConfig, model_type: str) -> LoraPlan:
    """Which linear layers LoRA wraps (PEFT's own matching) and the parameters that train."""
    import torch
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    from csr.models import SUPPORTED_CLASSES

    r = int(_train_value(cfg, "lora_r"))
    lora = LoraConfig(r=r, target_modules=_train_value(cfg, "lora_target_modules"))
    modules: dict[str, int] = {}
    lora_params = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and check_target_module_exists(lora, name):
            kind = name.rsplit(".", 1)[-1]
            modules[kind] = modules.get(kind, 0) + 1
            lora_params += r * (module.in_features + module.out_features)
    projector, projector_params = None, 0
    if _train_value(cfg, "train_projector"):
        projector = _train_value(cfg, "projector_module")
        if projector == "auto":
            projector = SUPPORTED_CLASSES[model_type].projector
        projector_params = sum(p.numel() for p in model.get_submodule(projector).parameters())
    return LoraPlan(sum(p.numel() for p in model.parameters()), modules, lora_params, projector, projector_params)


def image_tokens(config) -> int:
    """Tokens one image takes in the prompt (LLaVA: (size/patch)^2; LLaVA-NeXT: its largest grid; Qwen: 1280)."""
    vision = getattr(config, "vision_config", None)
    if config.model_type in ("llava", "llava_next") and vision is not None:
        base = (vision.image_size // vision.patch_size) ** 2
        if config.model_type == "llava_next":
            grids = getattr(config, "image_grid_pinpoints", None) or [[vision.image_size, vision.image_size]]
            tiles = max((h // vision.image_size) * (w // vision.image_size) for h, w in grids)
            return base * (1 + tiles)
        return base
    return 1280  # Qwen2.5-VL: dynamic; a 1000x700 image at its default patching, roughly


def _text_config(config):
    return getattr(config, "text_config", None) or config


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------


def accelerate_setup(cfg: CSRConfig) -> dict:
    """ZeRO stage, offload and world size of the recipe's multi-process stages."""
    procs, machines = cfg.run.num_processes, getattr(cfg.run, "num_machines", 1)
    if procs <= 1:
        return {"zero_stage": None, "offload": False, "world": 1, "name": "one process"}
    from csr.launch import resolve_accelerate_config

    path = resolve_accelerate_config(cfg.run.accelerate_config)
    acc = yaml.safe_load(Path(path).read_text()) or {}
    ds = acc.get("deepspeed_config") or {}
    stage = ds.get("zero_stage") if acc.get("distributed_type") == "DEEPSPEED" else None
    return {"zero_stage": stage, "offload": ds.get("offload_optimizer_device", "none") not in ("none", None),
            "world": procs * machines, "name": Path(path).stem}


def generation_memory(cfg: CSRConfig, config, total_params: int, per_tree_active: int) -> dict:
    text = _text_config(config)
    dtype = cfg.model.torch_dtype if cfg.model.torch_dtype != "auto" else "bfloat16"
    b = DTYPE_BYTES[dtype]
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    g = cfg.generate
    prompt, path = image_tokens(config) + PROMPT_TOKENS, g.max_response_chars // CHARS_PER_TOKEN
    seq = prompt + path + g.max_new_tokens
    nodes = g.node_batch_size or g.prompt_batch_size * per_tree_active
    sequences = nodes * g.num_candidates
    if g.prefix_attention == "cascade":  # each prompt once per tree, each path once per node, rows their own tokens
        trees = min(g.prompt_batch_size, nodes)
        tokens = trees * prompt + nodes * path + sequences * g.max_new_tokens
        layout = (f"cascade: {trees} prompts x {prompt} tokens, {nodes} nodes' paths x {path}, "
                  f"{sequences} rows x {g.max_new_tokens}, each stored once")
    else:  # copies: every row holds its prompt and path
        tokens = sequences * seq
        layout = f"{nodes} nodes x {g.num_candidates} beams = {sequences} sequences of <= {seq} tokens"
    kv = 2 * text.num_hidden_layers * kv_heads * head_dim * b * tokens
    return {"dtype": dtype, "weights": total_params * b, "kv_cache": kv, "sequences": sequences, "seq_len": seq,
            "nodes": nodes, "layout": layout, "total": total_params * b + kv}


def dpo_memory(cfg: CSRConfig, config, lp: LoraPlan, setup: dict) -> dict:
    text = _text_config(config)
    bf16 = bool(_train_value(cfg, "bf16"))
    dtype = _train_value(cfg, "model_dtype")
    if dtype == "auto":
        dtype = "bfloat16" if bf16 else "float32"
    b = DTYPE_BYTES[dtype]
    world, stage = setup["world"], setup["zero_stage"]
    frozen = (lp.total_params - lp.projector_params) * b
    t = lp.trainable
    weights_t, grads_t, adam_t = 4 * t, 4 * t, 8 * t  # float32 LoRA (and projector copy)
    if stage == 3:
        frozen, weights_t, grads_t, adam_t = frozen / world, weights_t / world, grads_t / world, adam_t / world
    elif stage == 2:
        grads_t, adam_t = grads_t / world, adam_t / world
    elif stage == 1:
        adam_t = adam_t / world
    if setup["offload"]:
        adam_t = 0
    max_len = _train_value(cfg, "max_length") or 2048
    seq = min(max_len, image_tokens(config) + PROMPT_TOKENS + cfg.generate.max_response_chars // CHARS_PER_TOKEN)
    batch = 2 * int(_train_value(cfg, "per_device_train_batch_size"))  # chosen + rejected
    act_b = 2 if bf16 else 4
    h, layers = text.hidden_size, text.num_hidden_layers
    if _train_value(cfg, "activation_checkpointing") is not False:
        acts = batch * seq * h * act_b * layers + batch * seq * h * 34 / 2 * act_b  # layer inputs + one layer
    else:
        acts = batch * seq * h * layers * 34 / 2 * act_b
    logits = batch * seq * text.vocab_size * 4
    total = frozen + weights_t + grads_t + adam_t + acts + logits
    return {"dtype": dtype, "frozen": frozen, "lora_weights": weights_t, "grads": grads_t, "optimizer": adam_t,
            "activations": acts, "logits": logits, "seq_len": seq, "batch": batch, "total": total}


# ---------------------------------------------------------------------------------------------
# The printout
# ---------------------------------------------------------------------------------------------


def _gib(n: float) -> str:
    return f"{n / GIB:6.1f} GiB"


def _billions(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def count_prompts(cfg: CSRConfig) -> str:
    from csr.data import BadInput, read_raw_records

    path = Path(cfg.data.prompts)
    if not cfg.data.prompts:
        return "no prompt file (data.prompts is empty)"
    try:
        n = len(read_raw_records(path))
    except (OSError, BadInput, ValueError) as e:
        return f"unknown ({path}: {str(e).splitlines()[0] if str(e) else 'not readable'})"
    if cfg.data.max_prompts is not None:
        return f"{min(n, cfg.data.max_prompts)} (of {n} in {path}, data.max_prompts)"
    return f"{n} ({path})"


def make_plan(cfg: CSRConfig) -> str:
    config = model_config(cfg.model.model_name_or_path, cfg.model.trust_remote_code)
    model = meta_model(config)
    lp = lora_plan(model, cfg, config.model_type)
    g = cfg.generate
    full, bound = tree_candidates(g.num_candidates, g.sentence_beam_width, g.max_sentences, g.pruning)
    per_tree_active = kept(g.num_candidates * g.sentence_beam_width, g.sentence_beam_width, g.pruning)
    setup = accelerate_setup(cfg)
    gen = generation_memory(cfg, config, lp.total_params, per_tree_active)
    dpo = dpo_memory(cfg, config, lp, setup)
    evals = [n for n in (cfg.run.eval_presets and f"presets {cfg.run.eval_presets}",
                         cfg.run.eval_pope and "POPE", cfg.run.eval_chair and "CHAIR") if n]
    procs = cfg.run.num_processes
    machines = getattr(cfg.run, "num_machines", 1)
    launch = "in this process" if procs <= 1 else f"{procs * machines} processes on {machines} machine(s), " \
                                                   f"accelerate config {setup['name']}"
    stages = [f"generate ({launch})", "score (CLIP, this process)", "pairs", f"train (LoRA DPO, {launch})",
              f"merge (policy in {cfg.run.policy_dtype})"]
    export = cfg.run.export_dtype
    if export == "auto":
        export = cfg.model.torch_dtype if cfg.model.torch_dtype != "auto" else \
            str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32").replace("torch.", "")
    if export not in ("none", cfg.run.policy_dtype):
        stages.append(f"export ({export})")
    if evals:
        stages.append("eval (" + ", ".join(evals) + ")")
    lines = ["# resolved recipe", yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip(), "",
             "# plan",
             f"model          {cfg.model.model_name_or_path} ({config.model_type}, {_billions(lp.total_params)} "
             f"parameters, from config.json on the meta device)",
             f"rounds         {cfg.run.rounds}, each: " + " -> ".join(stages),
             f"prompts        {count_prompts(cfg)}",
             f"tree           K={g.num_candidates} candidates a node, N={g.sentence_beam_width} ({g.pruning} pruning "
             f"keeps {per_tree_active} of a full level), at most {g.max_sentences} sentences: {full} candidate "
             f"sentences a tree when no path ends early, at most {bound}; up to {g.max_new_tokens} tokens each",
             "lora           r={} on {} linear layers: {}".format(
                 _train_value(cfg, "lora_r"), sum(lp.modules.values()),
                 ", ".join(f"{k} x{v}" for k, v in sorted(lp.modules.items())) or "none (check train.lora_target_modules)"),
             f"trainable      {_billions(lp.trainable)} ({100 * lp.trainable / lp.total_params:.2f}% of "
             f"{_billions(lp.total_params)}): LoRA {_billions(lp.lora_params)}"
             + (f" + projector {lp.projector} {_billions(lp.projector_params)}" if lp.projector else ""),
             "",
             "# memory per device (estimates)",
             f"generate       {_gib(gen['total'])} = weights {_gib(gen['weights'])} ({gen['dtype']}) + KV cache "
             f"{_gib(gen['kv_cache'])} ({gen['layout']}; generate.node_batch_size lowers it)",
             f"train (DPO)    {_gib(dpo['total'])} under "
             + (f"ZeRO-{setup['zero_stage']}" if setup["zero_stage"] else "DDP" if procs > 1 else "one process")
             + (" + optimizer offload" if setup["offload"] else "") + f" on {setup['world']} device(s):",
             f"  frozen base   {_gib(dpo['frozen'])} ({dpo['dtype']})",
             f"  LoRA weights  {_gib(dpo['lora_weights'])}, gradients {_gib(dpo['grads'])}, AdamW states "
             f"{_gib(dpo['optimizer'])} (float32)",
             f"  activations   {_gib(dpo['activations'])} + logits {_gib(dpo['logits'])} ({dpo['batch']} sequences "
             f"(chosen + rejected) of <= {dpo['seq_len']} tokens)"]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="csr plan", description="What a recipe means before a launch: stages, "
                                "prompts, tree size, LoRA parameters, memory per device. Loads no weights.")
    p.add_argument("--config", required=True, help="Recipe YAML (see recipes/).")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. run.num_processes=8.")
    args = p.parse_args(argv)
    print(make_plan(load_config(args.config, args.overrides)))
    return 0
