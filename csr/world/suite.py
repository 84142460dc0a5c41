"""`csr world suite`: the λ arms of the default recipe on several worlds, one table (issue 24).

    csr world suite build --data DIR [--suite recipes/world/suite.yaml] [--worlds a,b]
    csr world suite run   --data DIR [--suite ...] [--worlds a,b] [--arms x,y] [section.key=value ...]
    csr world suite table --data DIR [--suite ...] [--out FOLDER] [--seed 0] [--resamples 1000]
    csr world suite pairs --data DIR [--suite ...] pairs.key=value ...

The suite file names a recipe, the arms (recipe overrides each) and the worlds (`csr world`'s options
each, by their long names with underscores: seed, bias, caption_noise, n_train, ...). Under DIR:

    worlds/<world>/               an ordinary `csr world` folder (cached by its settings)
    runs/<world>/<arm>/           an ordinary `csr run` folder: rerunning resumes it
    suite/timings/*.json          seconds of each world build and each arm
    suite/diagnostics/*.json      round 1's pair quality of each arm (csr.world.diagnostics.pair_quality)
    suite/suite.md, suite.json    the table and the correlations (the first two arms), rewritten after every arm
                                  (elsewhere with --out); with each CHAIR_I change's paired-bootstrap interval
    suite/pairs/                  `pairs`: round 1's pairs rebuilt from stored scores under other pairs.* settings

`run` builds a missing world first and skips an arm whose run folder holds every round's evaluation.
Torch's thread count comes from the recipe (`run.num_threads`): the worlds and the runs depend on it.
Two `run` processes may share DIR when their --worlds do not overlap (each run folder is locked).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from csr.config import ConfigError
from csr.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

DEFAULT_SUITE = "recipes/world/suite.yaml"
# suite file option -> (WorldConfig field, or None for a training option of ensure_world)
WORLD_OPTIONS = {"seed": "seed", "n_train": "n_train", "n_test": "n_test", "n_prompts": "n_prompts",
                 "bias": "cooccur_bias", "small_fraction": "small_fraction", "caption_noise": "caption_partner_noise",
                 "clip_steps": None, "llava_steps": None}
SUITE_KEYS = ("recipe", "arms", "worlds")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class Suite:
    recipe: str
    arms: dict[str, list[str]]     # arm name -> recipe overrides (section.key=value)
    worlds: dict[str, dict]        # world name -> suite file options (WORLD_OPTIONS)


def load_suite(path: str | Path) -> Suite:
    """Read and check a suite file; an unknown key or option is a ConfigError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"suite file '{path}' does not exist (the default is {DEFAULT_SUITE}).")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a suite file is a mapping with the keys {', '.join(SUITE_KEYS)}.")
    unknown = sorted(set(raw) - set(SUITE_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key '{unknown[0]}'; a suite file has {', '.join(SUITE_KEYS)}.")
    for key in SUITE_KEYS:
        if not raw.get(key):
            raise ConfigError(f"{path}: '{key}' is missing or empty.")
    arms, worlds = raw["arms"], raw["worlds"]
    if not isinstance(arms, dict) or not isinstance(worlds, dict):
        raise ConfigError(f"{path}: 'arms' and 'worlds' are mappings from a name to overrides / options.")
    for kind, names in (("arm", arms), ("world", worlds)):
        for name in names:
            if not NAME.match(str(name)):
                raise ConfigError(f"{path}: {kind} name {name!r} is not a folder name (letters, digits, . _ -).")
    for name, overrides in arms.items():
        if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
            raise ConfigError(f"{path}: arm '{name}' must be a list of section.key=value overrides "
                              f"(e.g. [score.reward_lambda=0.0]).")
    for name, options in worlds.items():
        options = options or {}
        if not isinstance(options, dict):
            raise ConfigError(f"{path}: world '{name}' must map `csr world` options to values.")
        for option in options:
            if option not in WORLD_OPTIONS:
                raise ConfigError(f"{path}: world '{name}': unknown option '{option}'. Valid options: "
                                  f"{', '.join(WORLD_OPTIONS)}.")
        world_config(options)  # the world's own checks (a bias above 1, ...)
    suite = Suite(recipe=str(raw["recipe"]), arms={str(k): list(v) for k, v in arms.items()},
                  worlds={str(k): dict(v or {}) for k, v in worlds.items()})
    for arm in suite.arms:  # every arm's recipe is valid before any world is built
        arm_config(suite, Path("."), next(iter(suite.worlds)), arm)
    return suite


def world_config(options: dict):
    """(WorldConfig, clip_steps, llava_steps) of a world's suite options."""
    from csr.world.generate import WorldConfig

    fields = {WORLD_OPTIONS[k]: v for k, v in options.items() if WORLD_OPTIONS[k]}
    cfg = WorldConfig(**fields)
    try:
        cfg.validate()
    except (ValueError, TypeError) as err:
        raise ConfigError(f"world options {options}: {err}") from None
    return cfg, options.get("clip_steps"), options.get("llava_steps")


def world_dir(data: Path, world: str) -> Path:
    return data / "worlds" / world


def run_dir(data: Path, world: str, arm: str) -> Path:
    return data / "runs" / world / arm


def arm_config(suite: Suite, data: Path, world: str, arm: str, extra: list[str] | None = None):
    """The recipe of one world and arm: the suite's recipe pointed at the world, the arm's overrides."""
    from csr.config import load_config

    w = world_dir(data, world)
    where = [f"run.output_dir={run_dir(data, world, arm)}", "run.build_world=",
             f"model.model_name_or_path={w / 'models' / 'llava'}", f"data.prompts={w / 'train' / 'prompts.jsonl'}",
             f"data.image_root={w / 'train'}", f"score.clip_model={w / 'models' / 'clip'}",
             f"run.eval_pope={w / 'test' / 'pope.jsonl'}", f"run.eval_chair={w / 'test' / 'chair.jsonl'}"]
    return load_config(suite.recipe, [*where, *suite.arms[arm], *(extra or [])])


def _set_threads(suite: Suite) -> None:
    import torch

    from csr.config import load_config

    threads = load_config(suite.recipe).run.num_threads
    if threads:
        torch.set_num_threads(threads)


def _selected(known: dict, option: str, text: str | None) -> list[str]:
    """The names a comma-separated option selects (all when it is not given)."""
    if not text:
        return list(known)
    names = text.split(",")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"{option}: unknown name '{unknown[0]}'; the suite has {', '.join(known)}.")
    return names


def build_world(suite: Suite, data: Path, world: str) -> dict:
    """Build (or find cached) one world; its seconds are recorded in suite/timings/."""
    from csr.world.build import ensure_world

    cfg, clip_steps, llava_steps = world_config(suite.worlds[world])
    started = time.perf_counter()
    summary = ensure_world(world_dir(data, world), seed=cfg.seed, clip_steps=clip_steps, llava_steps=llava_steps,
                           world_config=cfg)
    timing = data / "suite" / "timings" / f"world-{world}.json"
    if any(summary["seconds"].get(k, 0) > 5 for k in ("clip", "llava")):  # built now, not found cached
        atomic_write_json(timing, {"world": world, "seconds": round(time.perf_counter() - started, 1),
                                   "parts": summary["seconds"]})
    return summary


def arm_finished(folder: Path, rounds: int) -> bool:
    """A run folder whose summary holds `rounds` rounds, each evaluated."""
    try:
        summary = json.loads((folder / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    done = [r for r in summary.get("rounds", []) if r.get("eval") is not None]
    return len(done) >= rounds and "base_eval" in summary


def run_arm(suite: Suite, data: Path, world: str, arm: str, extra: list[str] | None = None, runner=None) -> bool:
    """Run (or resume) one arm; False when it was already finished. `runner(cfg)` defaults to `csr run`."""
    cfg = arm_config(suite, data, world, arm, extra)
    folder = run_dir(data, world, arm)
    if arm_finished(folder, cfg.run.rounds):
        log.info("[suite] %s / %s is finished; skipping", world, arm)
        return False
    if runner is None:
        from csr.loop import run as runner
    started = time.perf_counter()
    runner(cfg)
    atomic_write_json(data / "suite" / "timings" / f"arm-{world}-{arm}.json",
                      {"world": world, "arm": arm, "seconds": round(time.perf_counter() - started, 1)})
    return True


def arm_diagnostics(data: Path, world: str, arm: str) -> dict:
    """Round 1's pair quality and DPO fit of a finished arm, cached in suite/diagnostics/."""
    out = data / "suite" / "diagnostics" / f"{world}-{arm}.json"
    if out.is_file():
        return json.loads(out.read_text())
    from csr.world.diagnostics import pair_quality

    folder = run_dir(data, world, arm)
    quality = pair_quality(world_dir(data, world), folder, rounds=[1])
    train = json.loads((folder / "summary.json").read_text())["rounds"][0]["stages"]["train"]
    result = {"pairs": quality[0] if quality else {},
              "dpo": {k: train.get(k) for k in ("final_rewards_margins", "final_rewards_accuracies",
                                                "final_rewards_chosen", "final_rewards_rejected", "final_loss")}}
    atomic_write_json(out, result)
    return result


def world_diagnostics(data: Path, world: str) -> dict:
    """The world CLIP's shape top-1 on the prompt images (csr.world.diagnostics.clip_accuracy), cached."""
    out = data / "suite" / "diagnostics" / f"world-{world}.json"
    if out.is_file():
        return json.loads(out.read_text())
    from csr.world.diagnostics import clip_accuracy

    w = world_dir(data, world)
    result = clip_accuracy(w, w / "models" / "clip")
    atomic_write_json(out, result)
    return result


def rebuilt_pairs(suite: Suite, data: Path, world: str, arm: str, overrides: list[str]) -> dict | None:
    """Round 1's pairs of a finished arm rebuilt from its stored scores under `overrides` (pairs.* keys),
    into suite/pairs/<overrides>/<world>-<arm>/, with their CHAIR against the arm's own pairs; None
    when round 1 has no scores yet. Nothing is generated or trained: this measures the pairs alone."""
    from csr.eval.chair import load_synonyms
    from csr.io import read_jsonl
    from csr.pairs import PAIRS, run_pairs
    from csr.world.diagnostics import pairs_chair, prompt_truth

    if any(not o.startswith("pairs.") for o in overrides):
        raise ConfigError(f"rebuilding pairs takes pairs.* overrides only, not {overrides}.")
    rd = run_dir(data, world, arm) / "round_1"
    if not (rd / "score" / "DONE.json").is_file() or not (rd / "pairs" / "DONE.json").is_file():
        return None
    tag = ",".join(overrides) or "recipe"
    out = data / "suite" / "pairs" / tag / f"{world}-{arm}"
    run_pairs(arm_config(suite, data, world, arm, overrides), rd / "score", out)
    truth, table = prompt_truth(world_dir(data, world)), load_synonyms(world_dir(data, world) / "test" / "synonyms.json")
    return {"world": world, "arm": arm, "overrides": tag,
            "run": pairs_chair(read_jsonl(rd / "pairs" / PAIRS), truth, table),
            "rebuilt": pairs_chair(read_jsonl(out / PAIRS), truth, table)}


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------

EVAL_COLUMNS = ("chair_s", "chair_i", "recall", "pope_f1", "yes_ratio", "n_hallucinated", "n_mentions")
PAIR_COLUMNS = ("chosen_chair_i", "rejected_chair_i", "chosen_recall", "rejected_recall", "chosen_sentences",
                "rejected_sentences", "margin")


def eval_values(metrics: dict) -> dict:
    """The table's evaluation columns of one eval/round_N.json."""
    chair, pope = metrics.get("chair", {}), metrics.get("pope", {}).get("all", {})
    return {"chair_s": chair.get("chair_s"), "chair_i": chair.get("chair_i"), "recall": chair.get("recall"),
            "pope_f1": pope.get("f1"), "yes_ratio": pope.get("yes_ratio"),
            "n_hallucinated": chair.get("n_hallucinated"), "n_mentions": chair.get("n_mentions")}


def table_row(world: str, arm: str, options: dict, summary: dict, diagnostics: dict | None,
              world_diag: dict | None = None) -> dict:
    """One world and arm: base and last-round evaluation, round 1's pairs (margin: the reward margin
    the pairs stage reports, on each arm's own reward scale) and DPO fit, and the world's options."""
    rounds = [r for r in summary.get("rounds", []) if r.get("eval")]
    row = {"world": world, "arm": arm, **{k: options.get(k) for k in ("seed", "bias", "caption_noise")},
           "rounds": len(rounds)}
    base = eval_values(summary.get("base_eval", {}))
    last = eval_values(rounds[-1]["eval"]) if rounds else dict.fromkeys(EVAL_COLUMNS)
    for k in EVAL_COLUMNS:
        row[f"base_{k}"], row[f"final_{k}"] = base[k], last[k]
    if base["chair_i"] and last["chair_i"] is not None:
        row["chair_i_change"] = last["chair_i"] / base["chair_i"] - 1
    pairs = (diagnostics or {}).get("pairs", {})
    stages = summary["rounds"][0]["stages"] if summary.get("rounds") else {}
    row.update({k: pairs.get(k) for k in PAIR_COLUMNS if k != "margin"})
    row["margin"] = stages.get("pairs", {}).get("margin_mean")
    for k in ("auc_clip", "auc_self_reward", "auc_reward"):
        row[k] = pairs.get(k)
    for k, v in (diagnostics or {}).get("dpo", {}).items():
        row[f"dpo_{k}"] = v
    if world_diag:
        row["clip_top1"] = world_diag.get("top1_normal")
    return row


def _cell(v) -> str:
    if v is None:
        return "–"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _interval_cell(ci, fmt: str) -> str:
    return "–" if ci is None else f"[{fmt.format(ci[0])}, {fmt.format(ci[1])}]"


MD_COLUMNS = [("world", "world"), ("arm", "arm"), ("rounds", "rounds"), ("CHAIR_S base → final", ("base_chair_s", "final_chair_s")),
              ("CHAIR_I base → final", ("base_chair_i", "final_chair_i")), ("CHAIR_I change", "chair_i_change"),
              ("95% interval", "chair_i_change_ci95"),
              ("recall base → final", ("base_recall", "final_recall")),
              ("POPE F1 base → final", ("base_pope_f1", "final_pope_f1")),
              ("yes-ratio base → final", ("base_yes_ratio", "final_yes_ratio")),
              ("pairs r1: chosen / rejected CHAIR_I", ("chosen_chair_i", "rejected_chair_i")),
              ("chosen / rejected recall", ("chosen_recall", "rejected_recall")),
              ("chosen / rejected sentences", ("chosen_sentences", "rejected_sentences")), ("reward margin", "margin")]


def markdown_table(rows: list[dict]) -> str:
    head = "| " + " | ".join(name for name, _ in MD_COLUMNS) + " |"
    lines = [head, "|" + "---|" * len(MD_COLUMNS)]
    for row in rows:
        cells = []
        for name, key in MD_COLUMNS:
            if isinstance(key, tuple):
                a, b = (_cell(row.get(k)) for k in key)
                cells.append(f"{a} → {b}" if "base" in key[0] else f"{a} / {b}")
            elif key == "chair_i_change":
                cells.append("–" if row.get(key) is None else f"{row[key]:+.0%}")
            elif key == "chair_i_change_ci95":
                cells.append(_interval_cell(row.get(key), "{:+.0%}"))
            else:
                cells.append(_cell(row.get(key)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# Candidate causes of how far CHAIR_I falls (issue 24): pair difficulty, DPO strength, CLIP quality,
# base headroom, the world's settings. Each is a column of table_row (or derived in `with_gaps`).
CAUSES = ("rejected_recall", "recall_gap", "sentence_gap", "chair_i_gap", "chosen_chair_i", "rejected_chair_i", "margin",
          "dpo_final_rewards_margins", "dpo_final_rewards_accuracies", "auc_clip", "auc_self_reward", "auc_reward",
          "clip_top1", "base_chair_i", "base_pope_f1", "bias", "caption_noise")


def with_gaps(row: dict) -> dict:
    """The row with the pairs' chosen-minus-rejected recall and rejected-minus-chosen CHAIR_I (the same
    scale in both arms, unlike the reward margin)."""
    def gap(a, b):
        return None if row.get(a) is None or row.get(b) is None else row[a] - row[b]

    return {**row, "recall_gap": gap("chosen_recall", "rejected_recall"),
            "chair_i_gap": gap("rejected_chair_i", "chosen_chair_i"),
            "sentence_gap": gap("chosen_sentences", "rejected_sentences")}


def _pearson(x: list[float], y: list[float]) -> float | None:
    import numpy as np

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 3 or x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def _ranks(v: list[float]) -> list[float]:
    """Ranks from 1, ties given their average rank (for Spearman's correlation)."""
    import pandas as pd

    return pd.Series(v, dtype=float).rank(method="average").tolist()


def correlations(rows: list[dict], outcome: str, causes=CAUSES) -> list[dict]:
    """Pearson and Spearman correlation of `outcome` with each cause over the rows that have both."""
    out = []
    for cause in causes:
        pts = [(r[cause], r[outcome]) for r in rows if r.get(cause) is not None and r.get(outcome) is not None]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        pearson = _pearson(xs, ys)
        out.append({"cause": cause, "n": len(pts), "pearson": pearson,
                    "spearman": _pearson(_ranks(xs), _ranks(ys)) if pearson is not None else None})
    return out


WORLD_LEVEL = ("seed", "bias", "caption_noise", "clip_top1")  # and base_*: the same in every arm of a world


def arm_differences(rows: list[dict], arm: str, other: str) -> list[dict]:
    """Per world, `arm` minus `other` of every numeric column (negative chair_i_change: `arm` lowers
    CHAIR_I more), for the worlds where both arms finished; a world's own columns (WORLD_LEVEL, base_*)
    keep their value, so the advantage can be set against the world too."""
    by = {(r["world"], r["arm"]): r for r in rows}
    out = []
    for (world, a), row in by.items():
        twin = by.get((world, other))
        if a != arm or twin is None:
            continue
        diff = {"world": world}
        for k, v in row.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and isinstance(twin.get(k), (int, float)):
                diff[k] = v if k in WORLD_LEVEL or k.startswith("base_") else v - twin[k]
        out.append(diff)
    return out


def correlation_table(corr: list[dict]) -> str:
    lines = ["| cause | n | Pearson r | Spearman ρ |", "|---|---|---|---|"]
    for c in corr:
        lines.append(f"| {c['cause']} | {c['n']} | {_cell(c['pearson'])} | {_cell(c['spearman'])} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# How sure each CHAIR_I change is: a paired bootstrap over the test images
# ---------------------------------------------------------------------------------------------

CHAIR_I_TARGET = -0.30   # issue 24: CHAIR_I at least 30% below the base on every world
CHAIR_CAPTIONS = "chair_captions.jsonl"  # csr.eval.run's per-image captions and CHAIR bookkeeping


def chair_counts(records: list[dict]) -> dict[str, tuple[int, int]]:
    """Each test image's (hallucinated mentions, mentions) from the records of a chair_captions.jsonl."""
    counts: dict[str, tuple[int, int]] = {}
    for n, r in enumerate(records, 1):
        key = r.get("id") or r.get("image")
        if "mentions" not in r or "hallucinated" not in r:
            raise ValueError(f"record {n} ({key}) has no 'mentions' and 'hallucinated': the captions were "
                             "saved but not scored (rerun the evaluation)")
        if key in counts:
            raise ValueError(f"record {n}: image {key!r} appears twice")
        counts[key] = (len(r["hallucinated"]), len(r["mentions"]))
    return counts


def paired_chair_i(before: dict, after: dict, n_resamples: int = 1000, seed: int = 0) -> dict:
    """CHAIR_I (hallucinated mentions / mentions) of two caption sets of the same test images
    (`chair_counts` each), and the change from `before` to `after`, relative (after / before - 1) and
    absolute (after - before), each with a 95% percentile interval from resampling the images with
    replacement, the same draws for both sets. A resample whose `before` names no hallucinated object
    has no relative change: it is left out of that interval and counted (`n_undefined`)."""
    import numpy as np

    from csr.eval.bootstrap import interval95, resample_indices

    if set(before) != set(after):
        only = sorted(set(before) ^ set(after))
        raise ValueError(f"the caption sets cover different images ({len(only)} in one only, e.g. {only[0]!r})")
    ids = sorted(before)
    idx = resample_indices(len(ids), n_resamples, seed)

    def chair_i(counts):  # observed and per resample
        c = np.array([counts[i] for i in ids], dtype=float)
        hall, mentions = c[:, 0][idx].sum(1), c[:, 1][idx].sum(1)
        per = np.divide(hall, mentions, out=np.zeros_like(hall), where=mentions > 0)  # chair_metrics' 0 for none
        return (c[:, 0].sum() / c[:, 1].sum() if c[:, 1].sum() else 0.0), per

    (b, b_per), (a, a_per) = chair_i(before), chair_i(after)
    defined = b_per > 0
    return {"n_images": len(ids), "before": float(b), "after": float(a),
            "change": float(a / b - 1) if b else None,
            "change_ci95": interval95(a_per[defined] / b_per[defined] - 1) if defined.any() else None,
            "n_undefined": int((~defined).sum()),
            "difference": float(a - b), "difference_ci95": interval95(a_per - b_per)}


def interval_side(ci, threshold: float) -> str | None:
    """Where a 95% interval lies against a threshold: 'below', 'above', or 'not distinguishable'
    (the interval contains it); None without an interval."""
    if ci is None:
        return None
    return "below" if ci[1] < threshold else "above" if ci[0] > threshold else "not distinguishable"


TARGET_VERDICT = {"below": "met", "above": "missed", "not distinguishable": "not distinguishable"}
ARM_VERDICT = {"below": "lower", "above": "higher", "not distinguishable": "not distinguishable"}


def _final_round(summary: dict) -> int | None:
    rounds = [r for r in summary.get("rounds", []) if r.get("eval")]
    return rounds[-1].get("round", len(rounds)) if rounds else None


def _run_counts(folder: Path, round_: int, n_hallucinated, n_mentions) -> dict:
    """`chair_counts` of a run's round evaluation, checked against the totals its metrics report."""
    from csr.io import read_jsonl

    path = folder / "eval" / f"round_{round_}" / CHAIR_CAPTIONS
    if not path.is_file():
        raise ValueError(f"{path} does not exist (the evaluation's per-image captions)")
    try:
        counts = chair_counts(read_jsonl(path))
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    totals = tuple(sum(c[k] for c in counts.values()) for k in (0, 1))
    if n_mentions is not None and totals != (n_hallucinated, n_mentions):
        raise ValueError(f"{path} counts {totals[0]} hallucinated of {totals[1]} mentions, eval/round_{round_}.json "
                         f"{n_hallucinated} of {n_mentions}: the captions are not the ones scored")
    return counts


def chair_i_intervals(data: Path, rows: list[dict], arms: tuple[str, str] | None = None,
                      n_resamples: int = 1000, seed: int = 0) -> tuple[list[dict], dict]:
    """The rows with the 95% interval of their relative CHAIR_I change (`chair_i_change_ci95`, from the
    base and last evaluated round's per-image captions, `paired_chair_i`) and its verdict against
    CHAIR_I_TARGET; and, with `arms`, per world the interval of the first arm's last-round CHAIR_I minus
    the second's (the same test images). A run whose captions cannot be used (missing, unscored,
    not the ones scored) keeps its row without an interval: the reason is logged and listed."""
    final, skipped, undefined, out = {}, [], [], []
    for row in rows:
        world, arm = row["world"], row["arm"]
        folder = run_dir(data, world, arm)
        interval = {}
        try:
            summary = json.loads((folder / "summary.json").read_text())
            base = _run_counts(folder, 0, row.get("base_n_hallucinated"), row.get("base_n_mentions"))
            last = _final_round(summary)
            if last is not None:
                final[world, arm] = _run_counts(folder, last, row.get("final_n_hallucinated"),
                                                row.get("final_n_mentions"))
                interval = paired_chair_i(base, final[world, arm], n_resamples, seed)
        except (OSError, ValueError) as err:
            log.warning("[suite] %s / %s: no CHAIR_I interval: %s", world, arm, err)
            skipped.append({"world": world, "arm": arm, "reason": str(err)})
        ci = interval.get("change_ci95")
        out.append({**row, "chair_i_change_ci95": ci,
                    "chair_i_target": TARGET_VERDICT.get(interval_side(ci, CHAIR_I_TARGET))})
        if interval.get("n_undefined"):  # not a row column: arm_differences would subtract it
            undefined.append({"world": world, "arm": arm, "resamples": interval["n_undefined"]})
    differences = {}
    for world in dict.fromkeys(r["world"] for r in rows):
        if arms and (world, arms[0]) in final and (world, arms[1]) in final:
            try:
                d = paired_chair_i(final[world, arms[1]], final[world, arms[0]], n_resamples, seed)
            except ValueError as err:
                log.warning("[suite] %s: no interval of %s minus %s: %s", world, *arms, err)
                skipped.append({"world": world, "arm": f"{arms[0]} - {arms[1]}", "reason": str(err)})
                continue
            differences[world] = {"world": world, arms[0]: d["after"], arms[1]: d["before"],
                                  "difference": d["difference"], "ci95": d["difference_ci95"],
                                  "verdict": ARM_VERDICT[interval_side(d["difference_ci95"], 0.0)]}
    return out, {"n_resamples": n_resamples, "seed": seed, "target": CHAIR_I_TARGET,
                 "arms": list(arms) if arms else None, "final_chair_i_difference": list(differences.values()),
                 "undefined": undefined, "skipped": skipped}


def interval_lines(rows: list[dict], intervals: dict) -> list[str]:
    """suite.md's lines on the intervals: a line per world on the target, a table of the arm difference."""
    target = f"{CHAIR_I_TARGET:+.0%}"
    md = [f"CHAIR_I at least {-CHAIR_I_TARGET:.0%} below the base, per world (the last round's relative change, "
          f"with the 95% interval of a paired bootstrap over the test images, {intervals['n_resamples']} "
          f"resamples, seed {intervals['seed']}; met: the whole interval below {target}, missed: above it, "
          f"not distinguishable: it holds {target}):", ""]
    undefined = {(u["world"], u["arm"]): u["resamples"] for u in intervals.get("undefined", [])}
    for world in dict.fromkeys(r["world"] for r in rows):
        parts = []
        for r in (r for r in rows if r["world"] == world):
            if r.get("chair_i_target") is None:
                parts.append(f"{r['arm']} no interval")
                continue
            n = undefined.get((world, r["arm"]))
            left_out = f", {n} resamples without a base hallucination left out" if n else ""
            parts.append(f"{r['arm']} {r['chair_i_target']} ({r['chair_i_change']:+.0%}, "
                         f"{_interval_cell(r['chair_i_change_ci95'], '{:+.0%}')}{left_out})")
        md.append(f"- {world}: " + "; ".join(parts))
    if intervals.get("final_chair_i_difference"):
        a, b = intervals["arms"]
        md += ["", f"Last-round CHAIR_I, {a} minus {b}, per world (paired over the same test images; "
               f"lower / higher: the whole 95% interval below / above 0):", "",
               f"| world | {a} | {b} | difference | 95% interval | {a} is |", "|---|---|---|---|---|---|"]
        for d in intervals["final_chair_i_difference"]:
            md.append(f"| {d['world']} | {d[a]:.4f} | {d[b]:.4f} | {d['difference']:+.4f} | "
                      f"{_interval_cell(d['ci95'], '{:+.4f}')} | {d['verdict']} |")
    if intervals.get("skipped"):
        md += ["", "No interval (the row keeps its other columns):", ""]
        md += [f"- {s['world']} / {s['arm']}: {s['reason']}" for s in intervals["skipped"]]
    return md


def collect_rows(suite: Suite, data: Path) -> list[dict]:
    """A row for every world and arm whose run folder has a summary (finished or not)."""
    rows = []
    for world, options in suite.worlds.items():
        for arm in suite.arms:
            folder = run_dir(data, world, arm)
            try:
                summary = json.loads((folder / "summary.json").read_text())
            except (OSError, json.JSONDecodeError):
                continue
            diag_file = data / "suite" / "diagnostics" / f"{world}-{arm}.json"
            world_file = data / "suite" / "diagnostics" / f"world-{world}.json"
            diag = json.loads(diag_file.read_text()) if diag_file.is_file() else None
            wdiag = json.loads(world_file.read_text()) if world_file.is_file() else None
            rows.append(table_row(world, arm, options, summary, diag, wdiag))
    return rows


def write_table(rows: list[dict], out_dir: Path, arms: tuple[str, str] | None = None,
                intervals: dict | None = None) -> None:
    """suite.md and suite.json in `out_dir`, each written atomically: the table, (with `intervals`, from
    `chair_i_intervals`) each CHAIR_I change against the target and the arms' difference with their
    intervals, then the correlation of the relative CHAIR_I change with each candidate cause across
    worlds and arms, and (with `arms`) of the first arm's advantage over the second with the causes'
    differences across worlds."""
    rows = [with_gaps(r) for r in rows]
    compared = [r for r in rows if arms is None or r["arm"] in arms]
    corr = correlations(compared, "chair_i_change")
    md = [markdown_table(rows), ""]
    if intervals:
        md += [*interval_lines(rows, intervals), ""]
    md += ["Relative CHAIR_I change (round 3 against base) against each cause, "
          f"over {len(compared)} world/arm rows{' of the arms ' + ' and '.join(arms) if arms else ''} "
          "(negative r: a larger cause value goes with a larger fall):", "", correlation_table(corr)]
    result = {"rows": rows, "correlations": {"chair_i_change": corr}}
    if intervals:
        result["intervals"] = intervals
    if arms:
        diffs = arm_differences(rows, *arms)
        paired = {d["world"]: d for d in (intervals or {}).get("final_chair_i_difference", [])}
        for d in diffs:
            if d["world"] in paired:
                d["final_chair_i_ci95"] = paired[d["world"]]["ci95"]
        diff_corr = correlations(diffs, "chair_i_change")
        md += ["", f"Arm {arms[0]} minus arm {arms[1]}, per world ({len(diffs)} worlds): the difference of the "
               "relative CHAIR_I change (negative: the first arm lowers CHAIR_I more) against the "
               "difference of each cause:", "", correlation_table(diff_corr)]
        result["correlations"]["arm_difference"] = diff_corr
        result["arm_differences"] = diffs
    atomic_write_json(out_dir / "suite.json", result)
    atomic_write_text(out_dir / "suite.md", "\n".join(md))


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="csr world suite",
                                description="Build several worlds and run the recipe's arms on each (resumable); "
                                            "one table of the results.")
    p.add_argument("what", choices=("build", "run", "table", "pairs"),
                   help="build: the worlds; run: the worlds, then every arm on each, then the table; table: "
                        "the table of what has finished; pairs: round 1's pairs of every finished arm rebuilt "
                        "from its stored scores under the pairs.* overrides, their CHAIR against the run's "
                        "(suite/pairs/<overrides>.json).")
    p.add_argument("--data", required=True, type=Path,
                   help="Folder of the suite's worlds, runs and table (outside the git tree, so it survives it).")
    p.add_argument("--suite", default=DEFAULT_SUITE, help=f"Suite file (default {DEFAULT_SUITE}).")
    p.add_argument("--worlds", help="Comma-separated world names to build or run (default: all of the suite's).")
    p.add_argument("--arms", help="Comma-separated arm names to run (default: all of the suite's).")
    p.add_argument("--out", type=Path,
                   help="Folder of suite.md and suite.json (default DATA/suite); the diagnostics cache stays "
                        "in DATA/suite/diagnostics. Lets a finished suite's table be rebuilt without writing "
                        "into DATA/suite.")
    p.add_argument("--seed", type=int, default=0,
                   help="Seed of the paired bootstrap over the test images that gives each CHAIR_I change its "
                        "95%% interval (default 0).")
    p.add_argument("--resamples", type=int, default=1000,
                   help="Resamples of that bootstrap (default 1000).")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides for every arm, e.g. run.rounds=2.")
    args = p.parse_intermixed_args(argv)  # overrides may follow the options
    suite = load_suite(args.suite)
    names = _selected(suite.worlds, "--worlds", args.worlds)
    arms = _selected(suite.arms, "--arms", args.arms)
    data = args.data
    arm_pair = tuple(suite.arms)[:2] if len(suite.arms) >= 2 else None
    if args.resamples < 1:
        raise ConfigError(f"--resamples {args.resamples}: the bootstrap needs at least 1 resample (default 1000).")
    out = args.out or data / "suite"

    def table() -> list[dict]:
        rows, intervals = chair_i_intervals(data, collect_rows(suite, data), arm_pair, args.resamples, args.seed)
        write_table(rows, out, arm_pair, intervals)
        return rows
    if args.what == "pairs":
        rows = [r for w in names for a in suite.arms
                if (r := rebuilt_pairs(suite, data, w, a, args.overrides)) is not None]
        atomic_write_json(data / "suite" / "pairs" / f"{','.join(args.overrides) or 'recipe'}.json", {"rows": rows})
        print(json.dumps(rows, indent=1))
        return 0
    if args.what != "table":
        _set_threads(suite)
        for world in names:
            build_world(suite, data, world)
            if args.what == "run":
                world_diagnostics(data, world)
                for arm in arms:
                    run_arm(suite, data, world, arm, args.overrides)
                    arm_diagnostics(data, world, arm)
                    table()
    else:  # the diagnostics of arms finished by another process, or lost
        for world in names:
            for arm in suite.arms:
                if arm_finished(run_dir(data, world, arm), arm_config(suite, data, world, arm).run.rounds):
                    world_diagnostics(data, world)
                    arm_diagnostics(data, world, arm)
    rows = table()
    print(markdown_table(rows))
    print(f"table: {out / 'suite.md'} and suite.json")
    return 0
