"""`csr run`: CSR rounds end to end, resumable.

    run_dir/
      config.yaml                     the resolved recipe
      round_1/generate/trees.jsonl    sentence-level search trees
      round_1/score/scored.jsonl      the same trees with calibrated rewards
      round_1/pairs/pairs.jsonl       chosen/rejected pairs (TRL format) + pairs_csr.json
      round_1/yesno/pairs.jsonl      with yesno.enabled: those pairs + yes/no pairs (csr.yesno)
      round_1/train/adapter/          the LoRA adapter (checkpoints while training)
      round_1/merge/                  the merged model folder: next round's policy and reference (float32,
                                      run.policy_dtype), with its model card README.md
      round_1/export/                 the same model in the recipe's dtype (run.export_dtype): what others load
      round_2/...
      eval/round_0.json ...           metrics of the base model and of every round
      summary.json                    per-round stage summaries and metrics

Every stage writes DONE.json last; a rerun skips finished stages and resumes a half-finished
generate or score stage at the first unfinished prompt.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
import yaml

from csr.config import CSRConfig, load_config
from csr.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


def round_dir(run_dir: Path, r: int) -> Path:
    return run_dir / f"round_{r}"


def _diff(old: dict, new: dict, prefix="") -> list[str]:
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _diff(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return keys


def save_run_config(cfg: CSRConfig, run_dir: Path) -> None:
    path = run_dir / "config.yaml"
    new = cfg.to_dict()
    if path.exists():
        changed = _diff(yaml.safe_load(path.read_text()) or {}, new)
        if changed:
            log.warning("resuming %s with a changed recipe (finished stages are kept as they are): %s",
                        run_dir, "; ".join(changed))
    atomic_write_text(path, yaml.safe_dump(new, sort_keys=False))


def evaluate(cfg: CSRConfig, model_path: str, out_file: Path) -> dict | None:
    """Eval metrics for one model, cached in `out_file`; None when the recipe names no eval set."""
    r = cfg.run
    if not (r.eval_pope or r.eval_chair or r.eval_presets):
        return None
    if out_file.exists():
        return json.loads(out_file.read_text())
    from csr.eval.run import evaluate_model

    model = processor = None
    if r.eval_presets:                  # one model load for the recipe's own sets and the presets
        from csr.models import load_policy

        model, processor = load_policy(model_path, dtype=cfg.model.torch_dtype, device=cfg.model.device,
                                       trust_remote_code=cfg.model.trust_remote_code)
    metrics = {"model": model_path}
    if r.eval_pope or r.eval_chair:
        metrics = evaluate_model(model_path, pope_path=r.eval_pope or None, chair_path=r.eval_chair or None,
                                 image_root=r.eval_image_root or None, limit=r.eval_max_samples,
                                 device=cfg.model.device, out_dir=out_file.parent / out_file.stem,
                                 model=model, processor=processor)
    if r.eval_presets:
        from csr.eval.presets import run_presets

        metrics.update(run_presets(r.eval_presets, model_path, model=model, processor=processor,
                                   out_dir=out_file.parent / out_file.stem,
                                   coco_annotations=r.eval_coco_annotations, synonyms=r.eval_synonyms or None,
                                   image_root=r.eval_image_root, pope_dir=r.eval_pope_dir,
                                   limit=r.eval_max_samples))
    atomic_write_json(out_file, metrics)
    return metrics


def run_round(cfg: CSRConfig, policy: str, rd: Path, accelerate_config: str | None = None,
              train_env: dict | None = None) -> tuple[str, dict]:
    """One CSR round from `policy`; returns (the merged model folder, stage summaries).

    With an accelerate config, generate and train run as multi-process launches (see csr.launch).
    `train_env`: environment for the train stage's trackers (TRL's wandb run id, TensorBoard folder).
    """
    from csr.tracking import environment

    from csr.generate.stage import run_generate
    from csr.io import is_done, read_done
    from csr.pairs import run_pairs
    from csr.score.stage import run_score
    from csr.train.merge import export_model, merge_lora
    from csr.train.stage import run_train

    def heavy(stage: str, out: Path, in_process, extra: list[str]) -> dict:
        if accelerate_config is None or is_done(out):
            return in_process()
        from csr.launch import launch_stage

        launch_stage(cfg, accelerate_config, stage, ["--config", str(Path(cfg.run.output_dir) / "config.yaml"),
                                                     "--policy", policy, "--out", str(out), *extra])
        return read_done(out)

    summaries = {}
    summaries["generate"] = heavy("generate", rd / "generate",
                                  lambda: run_generate(cfg, policy, rd / "generate"), [])
    if cfg.run.machine_rank > 0:  # another machine of a multi-node run: join the launches, wait for the rest
        return follow_round(cfg, policy, rd, heavy), summaries
    summaries["score"] = run_score(cfg, rd / "generate", rd / "score", policy)
    summaries["pairs"] = run_pairs(cfg, rd / "score", rd / "pairs")
    if cfg.yesno.enabled:  # yes/no pairs from the model itself, mixed into the round's pairs
        from csr.yesno.stage import run_yesno

        summaries["yesno"] = run_yesno(cfg, policy, rd / "score", rd / "pairs", rd / "yesno")
    pairs_dir = train_pairs_dir(cfg, rd)
    with environment(train_env or {}):
        summaries["train"] = heavy("train", rd / "train", lambda: run_train(cfg, policy, pairs_dir, rd / "train"),
                                   ["--pairs", str(pairs_dir)])
    merged = merge_lora(policy, rd / "train" / "adapter", rd / "merge", dtype=cfg.run.policy_dtype,
                        trust_remote_code=cfg.model.trust_remote_code,
                        allow_pickle_weights=cfg.model.allow_pickle_weights, max_shard_size=cfg.run.max_shard_size)
    dtype = export_dtype(cfg, merged)
    if dtype is not None:
        export_model(merged, rd / EXPORT, dtype, max_shard_size=cfg.run.max_shard_size)
    return str(merged), summaries


EXPORT = "export"


def train_pairs_dir(cfg: CSRConfig, rd: Path) -> Path:
    """The folder whose pairs.jsonl the round trains on: the pairs stage's, or the yes/no stage's mix."""
    return rd / "yesno" if cfg.yesno.enabled else rd / "pairs"


def follow_round(cfg: CSRConfig, policy: str, rd: Path, heavy) -> str:
    """A round on a machine of rank > 0: machine 0 scores, pairs and merges; this one joins the train launch."""
    from csr.launch import wait_for

    pairs_dir = train_pairs_dir(cfg, rd)
    wait_for(pairs_dir, pairs_dir.name)
    from csr.io import read_done

    heavy("train", rd / "train", lambda: read_done(rd / "train"), ["--pairs", str(pairs_dir)])
    wait_for(rd / "merge", "merge")
    return str(rd / "merge")


def export_dtype(cfg: CSRConfig, merged: Path) -> str | None:
    """The dtype of a round's export (run.export_dtype), None when no copy is needed."""
    from csr.train.merge import saved_dtype

    want = cfg.run.export_dtype
    if want == "none":
        return None
    if want == "auto":
        want = cfg.model.torch_dtype
    if want == "auto":  # the base's saved dtype
        from transformers import AutoConfig

        want = str(saved_dtype(AutoConfig.from_pretrained(cfg.model.model_name_or_path,
                                                          trust_remote_code=cfg.model.trust_remote_code)))
        want = want.replace("torch.", "")
    merged_dtype = json.loads((Path(merged) / "DONE.json").read_text()).get("dtype")
    return None if want == merged_dtype else want


def model_folders(rd: Path) -> list[Path]:
    """A finished round's model folders: the merged policy and, when written, its export."""
    return [p for p in (rd / "merge", rd / EXPORT) if (p / "DONE.json").is_file()]


def check_before_work(cfg: CSRConfig) -> None:
    """Everything a recipe can get wrong, refused before any folder is made or model loaded."""
    from csr.runstate import check_output_dir

    check_output_dir(cfg.run.output_dir, "run.output_dir")
    if cfg.train:  # the train section is checked now, not when round 1 reaches it
        from csr.train.args import build_train_args

        build_train_args(cfg, Path(cfg.run.output_dir) / "round_1" / "train")


def run(cfg: CSRConfig, redo_from: str | None = None, redo_round: int = 1) -> dict:
    """CSR rounds end to end. `redo_from` (a stage name) first moves that stage's outputs and everything
    after them, from round `redo_round` on, aside into <run>/stale/ so they are made again."""
    from csr.launch import check_launch
    from csr.runstate import FolderLock, check_resume, claim_folder, redo_from as move_aside

    check_before_work(cfg)
    accelerate_config = check_launch(cfg)  # refuse a bad launch before any work
    if cfg.run.num_threads:  # the same numbers on any CPU (see run.num_threads)
        torch.set_num_threads(cfg.run.num_threads)
    if cfg.run.machine_rank > 0:  # another machine of a multi-node run: machine 0 owns and locks the folder
        run_dir = Path(cfg.run.output_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        return follow(cfg, run_dir, accelerate_config)
    run_dir = claim_folder(cfg.run.output_dir, "run.output_dir")
    with FolderLock(run_dir):  # one writer per run folder
        if redo_from:
            move_aside(run_dir, redo_from, redo_round)
        check_resume(cfg, run_dir)  # a kept stage made with other settings: refused, never mixed
        return _run_locked(cfg, run_dir, accelerate_config)


def _run_locked(cfg: CSRConfig, run_dir: Path, accelerate_config) -> dict:
    save_run_config(cfg, run_dir)
    if cfg.run.build_world:
        from csr.world.build import ensure_world

        ensure_world(cfg.run.build_world, seed=cfg.run.seed)
    from csr.models import check_model_class

    # an unsupported model class is refused here, before the base eval and round 1's search
    spec = check_model_class(cfg.model.model_name_or_path, trust_remote_code=cfg.model.trust_remote_code,
                             allow_pickle=cfg.model.allow_pickle_weights)
    log.info("model %s: %s", cfg.model.model_name_or_path, spec.architecture)
    from csr.tracking import log_eval, log_round_stages, make_tracker

    tracker = make_tracker(cfg.run.report_to, run_dir, cfg.to_dict())
    policy = cfg.model.model_name_or_path
    summary = {"run_dir": str(run_dir), "base_model": policy, "rounds": []}
    base_metrics = evaluate(cfg, policy, run_dir / "eval" / "round_0.json")
    if base_metrics is not None:
        summary["base_eval"] = base_metrics
        log_eval(tracker, 0, base_metrics)
    for r in range(1, cfg.run.rounds + 1):
        rd = round_dir(run_dir, r)
        started = time.perf_counter()
        log.info("===== round %d/%d from %s =====", r, cfg.run.rounds, policy)
        torch.manual_seed(cfg.run.seed + r)
        policy, stages = run_round(cfg, policy, rd, accelerate_config, tracker.train_env(r))
        entry = {"round": r, "model": policy, "stages": stages,
                 "seconds": round(time.perf_counter() - started, 1)}
        log_round_stages(tracker, r, rd, stages["pairs"])
        metrics = evaluate(cfg, policy, run_dir / "eval" / f"round_{r}.json")
        if metrics is not None:
            entry["eval"] = metrics
            log_eval(tracker, r, metrics)
        from csr.card import write_round_card

        for folder in model_folders(rd):  # after the eval, so the card holds the round's metrics
            write_round_card(run_dir, r, folder)
        summary["rounds"].append(entry)
        atomic_write_json(run_dir / "summary.json", summary)
    tracker.finish(summary)
    if cfg.run.rounds and (base_metrics is not None):
        from csr.report import write_report

        write_report(run_dir, summary)
    log.info("finished %d rounds; final model: %s", cfg.run.rounds, policy)
    return summary


def follow(cfg: CSRConfig, run_dir: Path, accelerate_config: str) -> dict:
    """`csr run` on a machine of rank > 0: the rounds' generate and train launches, nothing else."""
    while not (run_dir / "config.yaml").is_file():  # machine 0 writes the resolved recipe the stages read
        time.sleep(5)
    policy = cfg.model.model_name_or_path
    for r in range(1, cfg.run.rounds + 1):
        log.info("===== round %d/%d (machine %d) =====", r, cfg.run.rounds, cfg.run.machine_rank)
        policy, _ = run_round(cfg, policy, round_dir(run_dir, r), accelerate_config)
    log.info("machine %d: finished %d rounds", cfg.run.machine_rank, cfg.run.rounds)
    return {"run_dir": str(run_dir), "machine_rank": cfg.run.machine_rank, "rounds": cfg.run.rounds}


def main(argv=None) -> int:
    from csr.runstate import STAGES

    p = argparse.ArgumentParser(description="Run CSR rounds end to end (resumable: rerun to continue).")
    p.add_argument("--config", default="recipes/world/default.yaml",
                   help="Recipe YAML (default: the grounded-world recipe that runs on CPU).")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. run.rounds=2.")
    p.add_argument("--redo-from", metavar="STAGE", choices=STAGES,
                   help="Move this stage's outputs and everything after them aside (into <run>/stale/) and redo "
                        "them: the way to resume a run under a changed recipe.")
    p.add_argument("--redo-round", type=int, default=1, metavar="N",
                   help="With --redo-from: keep rounds before N as they are (default 1: redo every round).")
    args = p.parse_args(argv)
    run(load_config(args.config, args.overrides), args.redo_from, args.redo_round)
    return 0

