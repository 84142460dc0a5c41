"""One set of config dataclasses for every stage, read from a recipe YAML plus command-line overrides.

A recipe is a YAML file with one section per stage::

    run:      {output_dir: data/runs/x, rounds: 3}
    model:    {model_name_or_path: llava-hf/llava-1.5-7b-hf}
    data:     {prompts: data/prompts.json, image_root: data/coco/train2014}
    generate: {num_candidates: 5, ...}
    score:    {reward_lambda: 0.9, ...}
    pairs:    {...}
    train:    {learning_rate: 1.0e-7, ...}   # any trl.DPOConfig field, plus LoRA fields

Overrides use dotted keys: ``csr run --config r.yaml generate.num_candidates=3 train.beta=0.2``.
Unknown keys are refused here, before any model loads, with the closest valid key named.
Defaults are the paper's (arXiv 2405.14622); ``recipes/*/official.yaml`` reproduces the authors'
released code where it differs, and each field's help says which is which.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from csr.content_free import CALIBRATION_INPUTS, SAMPLING_INPUTS, VIG_INPUTS


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message names the key and the fix."""


def _f(default, help: str, choices: tuple | None = None, **kw):
    """A dataclass field with a help string (and optional allowed values)."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    output_dir: str = _f("data/runs/default", "Run directory: one subfolder per round and stage.")
    rounds: int = _f(3, "CSR rounds (paper: 3 in the main results, up to 5 in the appendix).")
    seed: int = _f(42, "Seed for generation and training.")
    eval_pope: str = _f("", "POPE-format JSONL evaluated on the base model and after every round ('' = none).")
    eval_chair: str = _f("", "CHAIR caption set evaluated on the base model and after every round ('' = none).")
    eval_image_root: str = _f("", "Folder the eval files' image names are relative to.")
    eval_max_samples: Optional[int] = _f(None, "Evaluate on the first N items of each eval set (None: all).")
    eval_presets: str = _f("", "Standard protocols evaluated on the base model and after every round, comma "
                                "separated: coco-chair (500 COCO val2014 images, 'Please describe this image in "
                                "detail.', greedy, 512 new tokens, reference CHAIR), coco-pope (the three official "
                                "POPE files, LLaVA's answer suffix); see csr/eval/presets.py. '' = none. They need "
                                "eval_image_root = COCO's val2014 image folder.")
    eval_coco_annotations: str = _f("", "coco-chair: folder with COCO's instances_{train,val}2014.json and "
                                         "captions_{train,val}2014.json.")
    eval_synonyms: str = _f("", "coco-chair: the reference CHAIR synonym list ('' = synonyms.txt in "
                                "eval_coco_annotations).")
    eval_pope_dir: str = _f("", "coco-pope: folder holding coco_pope_{random,popular,adversarial}.json.")
    build_world: str = _f("", "Build the grounded synthetic world and its base models in this folder "
                              "first if missing (the default recipe's ground truth; '' = off).")
    report_to: typing.Union[str, list] = _f("none", "Trackers for training and the round loop: none, wandb, "
                                                    "tensorboard, or several as a list or comma-separated "
                                                    "('wandb,tensorboard'); see csr/tracking.py.")
    policy_dtype: str = _f("float32", "Saved dtype of each round's merged model (round_N/merge), the next round's "
                                      "policy. float32 keeps the whole LoRA update: at the paper's lr 1e-7 a bf16 "
                                      "save keeps at most 28-45% of it (docs/results/merge-precision.md); auto: the "
                                      "base's saved dtype.", choices=("float32", "auto", "bfloat16", "float16"))
    export_dtype: str = _f("auto", "Dtype of round_N/export, each merged model as others load it (`csr push` uploads "
                                   "it): auto = model.torch_dtype, or the base's saved dtype when that is auto; none = "
                                   "no export. No copy is written when it equals the policy's dtype (the merge folder "
                                   "serves).", choices=("auto", "bfloat16", "float16", "float32", "none"))
    max_shard_size: str = _f("5GB", "Largest safetensors file of a saved model folder; bigger models are sharded "
                                    "with an index, as on the Hub.")
    num_threads: int = _f(0, "torch CPU threads for the run (0: torch's default, one per core). On a CPU the "
                             "results depend on the thread count; the world recipe sets 1 so that its numbers "
                             "are the same on any machine (one thread is also the fastest for tiny models on a "
                             "shared machine).")
    num_processes: int = _f(1, "Processes (GPUs) for the generate and train stages; > 1 launches them with "
                               "accelerate (generate sharded, train under run.accelerate_config).")
    num_machines: int = _f(1, "Machines (nodes) of a multi-node launch; each runs `csr run` with its own "
                              "run.machine_rank on a shared run folder (recipes/launch.slurm). num_processes "
                              "counts the processes of one machine.")
    machine_rank: int = _f(0, "This machine's rank, 0 to num_machines - 1. Rank 0 runs every stage; the others "
                              "join the generate and train launches and wait for rank 0's other stages.")
    main_process_ip: str = _f("", "Address of the rank-0 machine, for a multi-node launch (accelerate's "
                                  "--main_process_ip).")
    main_process_port: int = _f(29500, "Port on the rank-0 machine for a multi-node launch (accelerate's "
                                       "--main_process_port).")
    accelerate_config: str = _f("zero2", "accelerate config for multi-process stages: a YAML path or a shipped "
                                         "name (ddp, zero2, zero2_offload, zero3; paper: DeepSpeed ZeRO-2).")

    def validate(self):
        _require(self.rounds >= 1, "run.rounds", self.rounds, "must be at least 1")
        _require(self.num_threads >= 0, "run.num_threads", self.num_threads, "must be >= 0")
        _require(self.num_machines >= 1, "run.num_machines", self.num_machines, "must be at least 1")
        _require(0 <= self.machine_rank < self.num_machines, "run.machine_rank", self.machine_rank,
                 f"must be in [0, run.num_machines - 1 = {self.num_machines - 1}]")
        _require(self.num_machines == 1 or self.main_process_ip, "run.main_process_ip", self.main_process_ip,
                 "must name the rank-0 machine for a multi-node launch (run.num_machines > 1)")
        _require(1 <= self.main_process_port <= 65535, "run.main_process_port", self.main_process_port,
                 "must be a port number")
        from csr.tracking import tracker_names

        try:
            self.report_to = ",".join(tracker_names(self.report_to)) or "none"
        except ValueError as e:
            raise ConfigError(f"run.report_to={self.report_to!r}: {e}.") from None
        names = [n.strip() for n in self.eval_presets.split(",") if n.strip()]
        from csr.eval.presets import PRESETS

        for n in names:
            _require(n in PRESETS, "run.eval_presets", self.eval_presets, f"names '{n}'; choose from {', '.join(PRESETS)}")
        kinds = {PRESETS[n].kind for n in names}
        _require(not ("chair" in kinds and self.eval_chair), "run.eval_presets", self.eval_presets,
                 "and run.eval_chair both give CHAIR metrics: keep one")
        _require(not ("pope" in kinds and self.eval_pope), "run.eval_presets", self.eval_presets,
                 "and run.eval_pope both give POPE metrics: keep one")
        _require(not names or self.eval_image_root, "run.eval_image_root", self.eval_image_root,
                 "must name COCO's val2014 image folder for run.eval_presets")
        _require("chair" not in kinds or self.eval_coco_annotations, "run.eval_coco_annotations",
                 self.eval_coco_annotations, "must name the COCO 2014 annotation folder for coco-chair")
        _require("pope" not in kinds or self.eval_pope_dir, "run.eval_pope_dir", self.eval_pope_dir,
                 "must name the folder of the official POPE files for coco-pope")


@dataclass
class ModelConfig:
    model_name_or_path: str = _f("llava-hf/llava-1.5-7b-hf",
                                 "Starting policy: a hub id or a local folder of a supported class "
                                 "(config.json's model_type: llava, llava_next, qwen2_5_vl; see "
                                 "csr.models.SUPPORTED_CLASSES). Any other class is refused before work starts.")
    torch_dtype: str = _f("auto", "Weights dtype for generation and scoring.",
                          choices=("auto", "float32", "bfloat16", "float16"))
    device: str = _f("auto", "Device for generation and scoring: auto (cuda if present), cpu, cuda, cuda:N.")
    trust_remote_code: bool = _f(False, "Allow code from the model folder to run. Off unless you trust it.")
    allow_pickle_weights: bool = _f(False, "Allow loading .bin/.pt (pickle) weights. Off: only safetensors load.")
    chat_template: str = _f("model", "Prompt format for generation and training. model: the model's own chat "
                                     "template (llava-hf's 'USER: <image>\\n... ASSISTANT:'); vicuna_v1 (official "
                                     "code, how LLaVA-1.5 was trained): LLaVA's vicuna_v1 conversation with its "
                                     "system sentence, the assistant turn closed by EOS. LLaVA classes only.",
                            choices=("model", "vicuna_v1"))
    image_aspect: str = _f("processor", "Image shape before the processor, for generation and training. processor: "
                                        "the processor's own resize (llava-hf centre-crops); pad (official code, how "
                                        "LLaVA-1.5 was trained): pad to a square with the processor's mean colour "
                                        "first, so nothing is cropped away.", choices=("processor", "pad"))


    def validate(self):
        device = self.device.strip()
        if device not in ("auto", "cpu") and not device.startswith("cuda"):
            raise ConfigError(f"model.device={self.device!r}: use auto, cpu, cuda or cuda:N.")
        if device.startswith("cuda"):
            import torch

            index = device.split(":", 1)[1] if ":" in device else "0"
            if not index.isdigit():
                raise ConfigError(f"model.device={self.device!r}: use cuda or cuda:N.")
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if int(index) >= count:
                raise ConfigError(f"model.device={self.device!r}, but this machine has {count} CUDA device(s). "
                                  f"Use model.device=auto{'' if count else ' (the CPU here)'}.")

@dataclass
class DataConfig:
    prompts: str = _f("", "Prompt file: official CSR JSON ({id, image, input} with <image> in the "
                          "text), JSONL with the same or {id, image, prompt}, or a `datasets` folder.")
    image_root: str = _f("", "Folder the prompt records' image names are relative to.")
    image_pattern: str = _f("{image}", "How a record's image field becomes a file name. The released "
                                       "CSR-Prompt-Dataset-12k uses bare COCO ids: 'COCO_train2014_{image}'.")
    max_prompts: Optional[int] = _f(None, "Use only the first N prompts (None: all).")
    allow_absolute_image_paths: bool = _f(False, "Allow image fields that are absolute or leave image_root.")
    max_prompt_chars: int = _f(4000, "Prompts longer than this are skipped (logged): they would not fit the "
                                     "model's context with the image.")

    def validate(self):
        from csr.data import check_image_pattern

        try:
            check_image_pattern(self.image_pattern)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        _require(self.max_prompts is None or self.max_prompts >= 1, "data.max_prompts", self.max_prompts,
                 "must be >= 1 (or null for all)")
        _require(self.max_prompt_chars >= 1, "data.max_prompt_chars", self.max_prompt_chars, "must be >= 1")


@dataclass
class GenerateConfig:
    num_candidates: int = _f(5, "K: candidate next sentences per tree node = token-level beam groups "
                                "of the diverse group beam search (official: 5 groups, one beam each).")
    diversity_penalty: float = _f(3.0, "Hamming diversity penalty between token-level beam groups (official: 3.0).")
    sentence_beam_width: int = _f(5, "N: nodes a tree level keeps. 'official' pruning keeps the best N//2-1 "
                                     "and the worst N//2 (N=5: 1 best + 2 worst).")
    pruning: str = _f("official", "official: best N//2-1 + worst N//2, keeps bad paths alive so a clearly "
                                  "bad response exists for the rejected side; best: plain top-N.",
                      choices=("official", "best"))
    selection: str = _f("calibrated", "Score that ranks nodes during the search. calibrated (paper): the "
                                      "calibrated reward, CLIP included; self (official code): self-score only.",
                        choices=("calibrated", "self"))
    max_new_tokens: int = _f(74, "Tokens per sentence before it is cut (paper: 74; official code: 70).")
    max_response_chars: int = _f(1024, "A node is final when its text reaches this many characters (official: 1024; "
                                       "what is counted is generate.length_limit).")
    length_limit: str = _f("response", "What max_response_chars counts. response (csr): the response alone; "
                                       "prompt_and_response (official code): the decoded chat prompt plus the "
                                       "response (the released prompts are 206-238 characters, leaving the response "
                                       "about 790-820).", choices=("response", "prompt_and_response"))
    sentence_end: str = _f("punctuation", "Which tokens end a candidate sentence, derived from the vocabulary "
                                          "(csr.models.sentence_end_ids). punctuation (csr): every token that reads "
                                          "as a sentence end ('.', ' .', '...', '.\"', '.)', and a period merged with "
                                          "newlines such as Qwen's '.\\n'); official (released code): only the token "
                                          "that is exactly '.' (LLaMA's 29889).", choices=("punctuation", "official"))
    continuation: str = _f("tokens", "What a node's next level is conditioned on. tokens (csr): exactly the tokens "
                                     "generated so far, after the prompt; text (released code): the decoded text "
                                     "re-tokenised with the prompt (newlines kept; a sentence's first token can "
                                     "merge differently than it was generated).", choices=("tokens", "text"))
    stop_at_eos: bool = _f(True, "Whether EOS ends a candidate sentence. true (csr): a sentence stops at a period "
                                 "token or EOS; false (official code): only the period token or max_new_tokens "
                                 "stops it. Either way a candidate holding EOS makes its node final.")
    max_sentences: int = _f(24, "Safety cap on tree depth; a path this deep is final. Not in the paper.")
    node_batch_size: int = _f(0, "Memory knob: tree nodes expanded in one forward batch (0: all active nodes "
                                 "of the trees in flight). Out of memory halves it and retries, logged.")
    prompt_batch_size: int = _f(8, "Trees grown in lockstep (their images and prompts encoded once, together, "
                                   "and their active nodes batched). 1 = one tree at a time.")
    candidate_mode: str = _f("beam", "beam: diverse group beam search on the model's logits (paper, official); "
                                     "debias: the same search on debiased logits (1+α)·l − α·l_cf with the "
                                     "plausibility cutoff (Zhang et al. 2024); the stored log-probs, and so R_T, "
                                     "are then the debiased distribution's.", choices=("beam", "debias"))
    debias_alpha: float = _f(1.0, "α of debias candidate generation (paper: 1).")
    debias_beta: float = _f(0.1, "β, the adaptive plausibility cutoff, of debias candidate generation (paper: 0.1).")
    debias_content_free: str = _f("none", "Content-free input for debias candidates: none (image removed), "
                                          "unk (an <unk> placeholder), mean (of both).", choices=SAMPLING_INPUTS)
    debias_recipe: str = _f("", "A named debias-sampling recipe (csr.debias.recipes) whose α, β and content-free "
                                "input replace debias_alpha, debias_beta and debias_content_free: toolkit (α 1, β 0.1, "
                                "no image) or authors (the authors' code: α 1, β 0.1, the mean of the no-image and "
                                "<unk> branches). Empty: the three fields as set. The search itself stays the CSR "
                                "diverse group beam search (the authors sample; here the sentence search decodes).")
    implementation: str = _f("cached", "cached: each tree's image and prompt encoded once and their key/value "
                                       "cache reused by every node; reference: the official per-node "
                                       "re-encoding (same results, for checking and benchmarks).",
                             choices=("cached", "reference"))
    prefix_attention: str = _f("cascade", "How the cached path's rows read their prompt's keys/values. cascade: "
                                          "one copy per tree, read by all its rows, and one copy of each node's path, read "
                                          "by its groups (shared-prefix attention combined by log-sum-exp, "
                                          "csr.generate.cascade): less memory, faster; "
                                          "copies: every row (node x group) its own copy. Both exact (same trees). "
                                          "A model whose attention cascade cannot honour (sliding window) uses "
                                          "copies, logged.", choices=("cascade", "copies"))
    reuse_decode_kv: bool = _f(True, "Cached path: a node's children start from the keys/values its own decode "
                                     "computed (its path's tokens after the prompt, kept per candidate) instead of "
                                     "re-encoding those tokens. Exact: a node is reused only when the token ids the "
                                     "reference would feed are the decoded ones (else re-encoded). false: re-encode "
                                     "every node's path (for checking and benchmarks).")

    def validate(self):
        _require(self.num_candidates >= 1, "generate.num_candidates", self.num_candidates, "must be >= 1")
        _require(self.sentence_beam_width >= 1, "generate.sentence_beam_width", self.sentence_beam_width,
                 "must be >= 1")
        _require(self.pruning != "official" or self.sentence_beam_width >= 2, "generate.sentence_beam_width",
                 self.sentence_beam_width, "must be >= 2 with pruning=official (it keeps N//2-1 best + N//2 worst)")
        _require(self.diversity_penalty >= 0, "generate.diversity_penalty", self.diversity_penalty, "must be >= 0")
        _require(self.max_new_tokens >= 1, "generate.max_new_tokens", self.max_new_tokens, "must be >= 1")
        _require(self.max_response_chars >= 1, "generate.max_response_chars", self.max_response_chars, "must be >= 1")
        _require(self.max_sentences >= 1, "generate.max_sentences", self.max_sentences, "must be >= 1")
        _require(self.node_batch_size >= 0, "generate.node_batch_size", self.node_batch_size, "must be >= 0")
        _require(self.prompt_batch_size >= 1, "generate.prompt_batch_size", self.prompt_batch_size, "must be >= 1")
        from csr.debias.recipes import SAMPLING_RECIPES

        _require(self.debias_recipe in ("",) + tuple(SAMPLING_RECIPES), "generate.debias_recipe", self.debias_recipe,
                 f"is not a recipe; choose from {', '.join(SAMPLING_RECIPES)} (or leave it empty)")

    def debias_settings(self) -> dict:
        """α, β and the content-free input of debias candidates: the named recipe's, else the fields."""
        if self.debias_recipe:
            from csr.debias.recipes import sampling_recipe

            r = sampling_recipe(self.debias_recipe)
            return {"alpha": r.alpha, "beta": r.beta, "cf_mode": r.cf}
        return {"alpha": self.debias_alpha, "beta": self.debias_beta, "cf_mode": self.debias_content_free}


@dataclass
class ScoreConfig:
    clip_backend: str = _f("open_clip", "CLIP implementation for the visual constraint.",
                           choices=("open_clip", "hf"))
    clip_model: str = _f("ViT-L-14-336", "open_clip model name, or a transformers CLIPModel id/folder "
                                         "with clip_backend=hf (official: openai CLIP ViT-L/14-336).")
    clip_pretrained: str = _f("openai", "open_clip pretrained tag or a local checkpoint file (.safetensors).")
    reward_lambda: float = _f(0.9, "λ in R = λ·R_I + (1-λ)·R_T; the weight is on CLIP (paper: 0.9).")
    calibration: str = _f("raw", "raw (paper): mix the values, R_I = max(100·cos, 0); rank (official code): "
                                 "turn each score into its rank fraction among siblings and mix the ranks.",
                          choices=("raw", "rank"))
    self_reward: str = _f("prob", "R_T. prob (paper): product of token probabilities ×100; mean_prob: "
                                  "geometric-mean token probability ×100; sum_logprob / mean_logprob: "
                                  "log-probs as stored; beam_score (official code): length-normalised "
                                  "group-beam score, diversity penalty included.",
                          choices=("prob", "mean_prob", "sum_logprob", "mean_logprob", "beam_score"))
    clip_clamp: bool = _f(True, "Clamp 100·cos at 0 (paper). The official code does not clamp.")
    clip_batch_size: int = _f(64, "Sentences (and images) per CLIP forward batch.")
    vig_weight: float = _f(0.0, "w_vig in R = λ·R_I + (1−λ)·R_T + w_vig·R_VIG (docs/method.md §3, VIG as a visual "
                                "constraint that needs no CLIP); 0 = off, CSR as published.")
    vig_scale: str = _f("contrast", "contrast: R_VIG = 100·tanh(VIG/2), on CLIP's percent scale; nats: VIG itself.",
                        choices=("contrast", "nats"))
    vig_content_free: str = _f("blur", "I_cf for VIG: a Gaussian-blurred copy (VIG paper), no image, or a blank image.",
                               choices=VIG_INPUTS)
    vig_blur_radius: float = _f(0.1, "Blur sigma as a fraction of the image's shorter side.")
    vig_batch_size: int = _f(16, "Tree nodes per forward when computing node VIG.")
    tree_batch_size: int = _f(32, "Trees scored together: their images encoded once each, their sentences "
                                  "batched across trees.")

    def validate(self):
        _require(0.0 <= self.reward_lambda <= 1.0, "score.reward_lambda", self.reward_lambda, "must be in [0, 1]")
        _require(self.clip_batch_size >= 1, "score.clip_batch_size", self.clip_batch_size, "must be >= 1")
        _require(self.vig_weight >= 0, "score.vig_weight", self.vig_weight, "must be >= 0")
        _require(self.vig_batch_size >= 1, "score.vig_batch_size", self.vig_batch_size, "must be >= 1")
        _require(self.tree_batch_size >= 1, "score.tree_batch_size", self.tree_batch_size, "must be >= 1")


@dataclass
class PairsConfig:
    min_margin: float = _f(0.0, "Drop a pair whose chosen-minus-rejected path score is below this.")
    rejected_quantile: float = _f(0.0, "Which path is rejected, as a quantile of the tree's path scores: 0 = the "
                                  "lowest (paper and official code); higher = a harder negative, closer to the "
                                  "chosen (a csr option, not in the paper).")
    rejected_pool: str = _f("all", "Which paths the rejected one is picked from (then by rejected_quantile). all "
                                   "(paper and official code): every path of the tree; same_length (a csr option, "
                                   "issue 24): only paths with as many sentences as the chosen, so that the "
                                   "rejected cannot lose by naming fewer objects (every path, when no other has "
                                   "the chosen's length).",
                            choices=("all", "same_length"))
    cleaning: str = _f("strict", "Filters that drop a sentence with its whole subtree before rewards are ranked "
                                 "(csr.cleaning). official: the released code's filters exactly (6+ identical "
                                 "words, 11+ of one character, &nbsp;&nbsp;, >5 newlines, Korean/Japanese/"
                                 "Cyrillic); strict (csr default): tunable and stricter (max_repeats, "
                                 "max_newlines, drop_unexpected_scripts, emoji too); none: no filter.",
                       choices=("official", "strict", "none"))
    min_sentence_chars: int = _f(4, "A sentence shorter than this (stripped) is dropped with its whole subtree before "
                                    "ranking, in every cleaning mode (official: 4; 0 = off).")
    max_newlines: int = _f(5, "cleaning=strict: a sentence or response with more newlines is dropped (official "
                              "filter: fixed at 5).")
    max_repeats: int = _f(4, "cleaning=strict: a run of the same word or character longer than this drops the "
                             "subtree (official filter: fixed 6 words / 11 characters).")
    drop_unexpected_scripts: bool = _f(True, "cleaning=strict: drop subtrees holding Korean, Japanese, Cyrillic or emoji.")
    path_score: str = _f("mean", "A path's score from its sentence rewards. mean (paper): their mean; official "
                                 "(released code): their sum divided by the nodes including the root, n + 1.",
                         choices=("mean", "official"))
    single_path: str = _f("skip", "A tree with one usable path. skip (csr): no pair, counted in the summary; "
                                  "duplicate (official code): chosen == rejected, a pair DPO learns nothing from.",
                          choices=("skip", "duplicate"))
    vig_filter: bool = _f(False, "Drop a pair whose chosen response has lower VIG than its rejected one (the score "
                                 "stage then computes node VIG). Not in the CSR paper.")
    vig_min_gap: float = _f(0.0, "With vig_filter: drop when chosen VIG < rejected VIG + this.")

    def validate(self):
        _require(0.0 <= self.rejected_quantile <= 1.0, "pairs.rejected_quantile", self.rejected_quantile,
                 "must be in [0, 1]")
        _require(self.min_sentence_chars >= 0, "pairs.min_sentence_chars", self.min_sentence_chars, "must be >= 0")
        _require(self.max_newlines >= 0, "pairs.max_newlines", self.max_newlines, "must be >= 0")
        _require(self.max_repeats >= 1, "pairs.max_repeats", self.max_repeats, "must be >= 1")


@dataclass
class YesNoConfig:
    """The optional yes/no stage of a round (csr.yesno; not in the CSR paper)."""
    enabled: bool = _f(False, "Add yes/no preference pairs to each round (csr.yesno): questions about the "
                              "objects the model's own candidate sentences name and the objects its no-image "
                              "continuation pairs with them; the answer's reward mixes CLIP on the affirmative "
                              "statement with the answer's probability calibrated against content-free inputs. "
                              "Off = CSR as published (caption pairs only).")
    objects: str = _f("", "Object vocabulary the questions ask about: JSON {object: [surface forms]} or CHAIR's "
                          "synonyms.txt. Empty: synonyms.json beside run.eval_chair.")
    question_template: str = _f("Is there a {object} in the image?", "The question (POPE's wording).")
    yes_template: str = _f("Yes, there is a {object}.", "The affirmative answer.")
    no_template: str = _f("No, there is no {object}.", "The negative answer.")
    visual: str = _f("sentences", "What R_I scores. sentences: the highest CLIP among the model's own sentences naming "
                                  "the object (its candidate sentences; a prior partner's, its no-image continuation's), "
                                  "relative to the two-class split of all the round's such scores. statement: CLIP on "
                                  "statement_template relative to reference_quantile over the vocabulary on the same "
                                  "image (issue 22's first design; near chance on the world, docs/results/world.md).",
                     choices=("sentences", "statement"))
    statement_template: str = _f("There is a {object}.", "The affirmative statement CLIP scores against the image "
                                                         "(visual=statement; and a question without a sentence).")
    max_named: int = _f(2, "Questions per image about objects its candidate sentences name (most often named first).")
    max_prior: int = _f(2, "Questions per image about objects the model names, without the image, after one of "
                           "its own sentences (its language prior's partners; the field's adversarial negatives).")
    prior_tokens: int = _f(24, "Greedy tokens of that no-image continuation.")
    reference_quantile: float = _f(0.5, "visual=statement: R_I(yes) = CLIP(statement) - this quantile of CLIP over "
                                        "every vocabulary object's statement on the same image; R_I(no) = -R_I(yes).")
    content_free: str = _f("none,unk", "Content-free inputs for the calibrated self-reward q = p/p_cf "
                                       "(comma-separated of none, unk, blank, noise; the debiasing authors': none,unk).")
    reward_lambda: float = _f(0.9, "λ in R = λ·R_I + (1-λ)·R_T for the answers (default: CSR's 0.9, the weight on "
                                   "CLIP). CLIP on short statements is weaker than on captions "
                                   "(docs/results/world.md, yes/no self-rewarding); 0 = the calibrated "
                                   "probability alone.")
    vig_weight: float = _f(0.0, "Weight of each answer's visual information gain, log p(answer | image) - "
                                "log p(answer | no image) on its first tokens, added to its reward (VIG, "
                                "docs/method.md §3). 0: off (the reward is CSR's two terms).")
    margin: float = _f(1.0, "Keep a yes/no pair only when |R(yes) - R(no)| is at least this.")
    ratio: float = _f(2.0, "Yes/no pairs added per caption pair (a seeded sample when more are available). 2 raised "
                           "POPE F1 and accuracy more than 0.5 on the world (docs/results/world.md).")
    balance: bool = _f(False, "Sample as many yes/no pairs whose chosen answer is yes as no (half of the ratio's "
                              "budget each; the smaller side sets both). false: a plain seeded sample, whose "
                              "share of yes follows the questions (44-61% on the world).")
    batch_size: int = _f(16, "Questions (and continuations) per forward batch.")

    @property
    def content_free_inputs(self) -> list[str]:
        return [k.strip() for k in self.content_free.split(",") if k.strip()]

    def validate(self):
        for key in ("question_template", "yes_template", "no_template", "statement_template"):
            value = getattr(self, key)
            _require("{object}" in value, f"yesno.{key}", value, "must contain {object}")
        _require(self.max_named >= 0 and self.max_prior >= 0 and self.max_named + self.max_prior >= 1,
                 "yesno.max_named", self.max_named, "max_named + max_prior must be >= 1 (both >= 0)")
        _require(self.prior_tokens >= 1, "yesno.prior_tokens", self.prior_tokens, "must be >= 1")
        _require(0.0 <= self.reference_quantile <= 1.0, "yesno.reference_quantile", self.reference_quantile,
                 "must be in [0, 1]")
        kinds = self.content_free_inputs
        _require(bool(kinds) and all(k in CALIBRATION_INPUTS for k in kinds), "yesno.content_free",
                 self.content_free, f"must be a comma-separated subset of {', '.join(CALIBRATION_INPUTS)}")
        _require(0.0 <= self.reward_lambda <= 1.0, "yesno.reward_lambda", self.reward_lambda, "must be in [0, 1]")
        _require(self.margin >= 0, "yesno.margin", self.margin, "must be >= 0")
        _require(self.vig_weight >= 0, "yesno.vig_weight", self.vig_weight, "must be >= 0")
        _require(self.ratio >= 0, "yesno.ratio", self.ratio, "must be >= 0")
        _require(self.batch_size >= 1, "yesno.batch_size", self.batch_size, "must be >= 1")


@dataclass
class CSRConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    yesno: YesNoConfig = field(default_factory=YesNoConfig)
    # trl.DPOConfig fields plus LoRA fields, validated against csr.train_config.TrainConfig and
    # instantiated by the train stage (DPOConfig's __post_init__ probes devices, so not here).
    train: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {f.name: f for f in dataclasses.fields(CSRConfig)}


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


def _require(ok: bool, key: str, value: Any, why: str):
    if not ok:
        raise ConfigError(f"{key}={value!r} {why}.")


def _train_fields() -> dict[str, dataclasses.Field]:
    from csr.train_config import TrainConfig  # imports trl: only when a train section is checked

    return {f.name: f for f in dataclasses.fields(TrainConfig) if f.init}


def _section_fields(section: str) -> dict[str, dataclasses.Field]:
    if section == "train":
        return _train_fields()
    cls = SECTIONS[section].default_factory
    return {f.name: f for f in dataclasses.fields(cls)}


def _closest(name: str, options) -> str:
    matches = difflib.get_close_matches(name, list(options), n=2, cutoff=0.6)
    if not matches:
        return ""
    return " Did you mean " + " or ".join(f"'{m}'" for m in matches) + "?"


def _coerce(key: str, value: Any, f: dataclasses.Field) -> Any:
    """Check `value` against the field's annotation; YAML already typed it."""
    tp = f.type
    if isinstance(tp, str):  # postponed annotations (`from __future__ import annotations`): "int | None"
        parts = [t.strip() for t in tp.split("|")]
        if "None" in parts and value is None:
            return None
        tp = {"int": int, "float": float, "bool": bool, "str": str}.get(parts[0], Any)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    optional = origin is typing.Union and type(None) in args or (origin is not None and "UnionType" in str(origin))
    if optional:
        if value is None:
            return None
        non_none = [a for a in args if a is not type(None)]
        tp = non_none[0] if len(non_none) == 1 else Any
    if isinstance(value, bool) and (tp is str or isinstance(f.default, (str, enum.Enum))):
        value = "yes" if value else "no"  # YAML 1.1 reads an unquoted `no` (save_strategy: no) as false
    choices = f.metadata.get("choices") if f.metadata else None
    if choices and value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {list(choices)}.")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be true or false.")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r} must be an integer.")
    elif tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-7` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} must be a number.")
        value = float(value)
    elif tp is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{key}={value!r} must be a string.")
        value = str(value)
    elif tp in (list, dict) or typing.get_origin(tp) in (list, dict):
        want = typing.get_origin(tp) or tp
        if want is list and isinstance(value, str):
            value = [value]  # `loss_type: sigmoid` means ["sigmoid"]
        if not isinstance(value, want):
            raise ConfigError(f"{key}={value!r} must be a {want.__name__}.")
    return value


def _merge(raw: dict, source: str) -> dict[str, dict]:
    """Validate the keys of a raw {section: {key: value}} mapping; returns checked values."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a recipe is a mapping of sections {sorted(SECTIONS)}.")
    out: dict[str, dict] = {}
    for section, values in raw.items():
        if section not in SECTIONS:
            raise ConfigError(f"{source}: unknown section '{section}'.{_closest(section, SECTIONS)} "
                              f"Sections: {sorted(SECTIONS)}.")
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section '{section}' must be a mapping of keys to values.")
        out[section] = check_section_values(section, values, _section_fields(section), source)
    return out


def check_section_values(section: str, values: dict, fields: dict[str, dataclasses.Field], source: str,
                         listing: str | None = None) -> dict:
    """Refuse a key that is not one of `fields` (the closest named), type-check the values.

    `listing` names where the valid keys are listed (default: `csr config SECTION`)."""
    checked = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"{source}: unknown key '{section}.{key}'.{_closest(key, fields)} "
                              f"{listing or f'`csr config {section}`'} lists the valid keys.")
        checked[key] = _coerce(f"{section}.{key}", value, fields[key])
    return checked


def parse_overrides(overrides: list[str], default_section: str | None = None) -> dict:
    """['generate.num_candidates=3', 'train.beta=0.2'] -> nested dict with YAML-typed values.

    With `default_section`, a key without a section ('beta=0.2') belongs to that section (a command
    with one section, such as `csr vig train`). Keys are checked by `load_config` /
    `check_section_values`, not here."""
    raw: dict[str, dict] = {}
    for item in overrides:
        dotted = item.split("=", 1)[0]
        if "=" not in item or ("." not in dotted and default_section is None):
            raise ConfigError(f"override '{item}' must look like {'key=value or ' if default_section else ''}"
                              f"section.key=value (e.g. generate.num_candidates=3).")
        text = item.split("=", 1)[1]
        section, key = dotted.split(".", 1) if "." in dotted else (default_section, dotted)
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override '{item}': value is not valid YAML ({e}).") from None
        raw.setdefault(section, {})[key] = value
    return raw


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses a key given twice in one mapping (YAML itself keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: key '{key}' is given twice; keep one.")
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> CSRConfig:
    """Read a recipe, apply overrides, validate everything. Raises ConfigError naming the bad key."""
    layers: list[tuple[dict, str]] = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"recipe '{path}' does not exist.")
        try:
            raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e}).") from None
        layers.append((raw, str(path)))
    if overrides:
        layers.append((parse_overrides(overrides), "command line"))

    merged: dict[str, dict] = {}
    for raw, source in layers:
        for section, values in _merge(raw, source).items():
            merged.setdefault(section, {}).update(values)

    kwargs = {}
    for name, f in SECTIONS.items():
        values = merged.get(name, {})
        kwargs[name] = dict(values) if name == "train" else f.default_factory(**values)
    cfg = CSRConfig(**kwargs)
    for name in SECTIONS:
        section = getattr(cfg, name)
        if hasattr(section, "validate"):
            section.validate()
    _check_modes(cfg, merged)
    return cfg


# Settings that only mean something in one mode of another setting: (mode key, the mode they need, keys).
MODE_ONLY_KEYS = (
    ("pairs.cleaning", "strict", ("pairs.max_repeats", "pairs.max_newlines", "pairs.drop_unexpected_scripts")),
)


def _check_modes(cfg: CSRConfig, explicit: dict[str, dict]) -> None:
    """Refuse a recipe that sets a key of one mode while choosing another mode (it would be ignored)."""
    for mode_key, needed, keys in MODE_ONLY_KEYS:
        section, name = mode_key.split(".")
        mode = getattr(getattr(cfg, section), name)
        if mode == needed:
            continue
        for key in keys:
            sec, k = key.split(".")
            if k in explicit.get(sec, {}):
                raise ConfigError(f"{key} applies only with {mode_key}={needed}, but the recipe sets "
                                  f"{mode_key}={mode}. Remove {key} or set {mode_key}={needed}.")


# trl.DPOConfig / TrainingArguments fields a CSR recipe sets; `csr config train` lists these with
# csr's own TrainConfig fields and keeps the other ~200 behind --all
TRAIN_COMMON = ("learning_rate", "beta", "loss_type", "lr_scheduler_type", "warmup_steps", "num_train_epochs",
                "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "optim", "seed",
                "report_to", "deepspeed", "save_strategy", "dataloader_num_workers")
HELP_WIDTH = 100


def _own_train_fields() -> set[str]:
    from csr.train_config import FineTuneFields, TrainConfig

    own = set(TrainConfig.__dict__.get("__annotations__", {})) | set(FineTuneFields.__dict__.get("__annotations__", {}))
    return own | set(TRAIN_COMMON)


def describe_keys(section: str, all_keys: bool = False) -> str:
    """Help text for one section: key, default, help, wrapped (used by `csr config`). The train section
    lists csr's own fields and the TRL fields a CSR recipe sets; `all_keys` lists every DPOConfig field."""
    import textwrap

    if section not in SECTIONS:
        raise ConfigError(f"unknown section '{section}'.{_closest(section, SECTIONS)}")
    fields = _section_fields(section)
    hidden = 0
    if section == "train" and not all_keys:
        own = _own_train_fields()
        hidden = len(fields) - len(own & set(fields))
        fields = {k: v for k, v in fields.items() if k in own}
    lines = []
    for name, f in fields.items():
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "<required>")
        shown = repr(default)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        lines.append(f"{section}.{name} = {shown}")
        text = " ".join(str(f.metadata.get("help", "")).split())
        lines += textwrap.wrap(text, HELP_WIDTH, initial_indent="    ", subsequent_indent="    ")
    if hidden:
        lines.append(f"(and {hidden} more trl.DPOConfig / TrainingArguments fields: `csr config train --all`)")
    return "\n".join(lines)


def main(argv=None) -> int:
    """`csr config [SECTION ...]`: list keys, defaults and help; `--check R.yaml` validates a recipe."""
    import argparse

    p = argparse.ArgumentParser(description="Show the valid recipe keys, or check a recipe.")
    p.add_argument("sections", nargs="*", help=f"Sections to describe (default: all of {list(SECTIONS)}).")
    p.add_argument("--check", metavar="RECIPE", help="Validate a recipe and print it resolved.")
    p.add_argument("--all", action="store_true", help="train: every trl.DPOConfig / TrainingArguments field, "
                                                      "not only csr's and the ones a CSR recipe sets.")
    args = p.parse_args(argv)
    if args.check:
        cfg = load_config(args.check)
        from csr.loop import check_before_work

        check_before_work(cfg)  # the train section too, as `csr run` checks it before any work
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    for section in args.sections or list(SECTIONS):
        print(f"[{section}]\n{describe_keys(section, args.all)}\n")
    return 0
