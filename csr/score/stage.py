"""Stage score: self-reward and CLIP visual constraint for every node, calibrated among siblings.

Reads generate/trees.jsonl, writes score/scored.jsonl: the same trees with, on every node,
`clip` (100·cos), `self_reward`, `visual_reward`, `reward` and the part of every further active
term (`vig_reward` with `score.vig_weight` > 0; see `csr.score.reward`).
CLIP scores computed during the search (selection=calibrated) are reused, not recomputed.

Before rewards are ranked, nodes that the pairs cleaning drops (`csr.cleaning`: short sentences,
the filters) are marked `dropped` with the reason, with their whole subtree, and get no reward;
sibling ranks (calibration=rank) are computed among the survivors only, as the official code does.

`csr score --rescore` recomputes the rewards, and then the pairs, of a finished score stage from
the raw scores its nodes already hold (log-probs, beam score, CLIP, VIG) under another recipe's
score and pairs settings: no model and no CLIP load, so a λ sweep costs no generation.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tqdm.auto import tqdm

from csr.cli import stage_parser
from csr.config import ConfigError, CSRConfig, load_config
from csr.data import load_tree_images
from csr.faults import fault_point
from csr.io import (JsonlAppender, StageSummary, iter_jsonl, mark_done, read_done,
                    repair_jsonl_tail, require_done, write_jsonl)
from csr.cleaning import dropped_nodes
from csr.runstate import StageGuard, lock_if_main_process
from csr.score.reward import calibrated_rewards, term_raw_fields
from csr.tree_format import is_end_marker, siblings_by_parent

log = logging.getLogger(__name__)

SCORED = "scored.jsonl"


def calibrate_tree(tree: dict, score_cfg, pairs_cfg=None) -> dict:
    """Fill the reward and its parts (`csr.score.reward.calibrated_rewards`) on the nodes of a tree whose
    nodes hold their raw scores (`clip`, and `vig` with the VIG term), in place.

    With `pairs_cfg`, the nodes its cleaning drops are marked `dropped` (reason) with reward None,
    and siblings are calibrated among the survivors only.
    """
    dropped = dropped_nodes(tree["nodes"], pairs_cfg) if pairs_cfg is not None else {}
    unranked = set(dropped) | {n["id"] for n in tree["nodes"][1:] if is_end_marker(n)}  # EOS alone: no sentence
    for n in tree["nodes"][1:]:
        if n["id"] in unranked:
            n.update(self_reward=None, visual_reward=None, reward=None)
        if n["id"] in dropped:
            n["dropped"] = dropped[n["id"]]
        else:
            n.pop("dropped", None)
    for group in siblings_by_parent(tree["nodes"]).values():
        siblings = [n for n in group if n["id"] not in unranked]
        if siblings:
            calibrated_rewards(siblings, score_cfg)
    return tree


def add_clip_scores(trees: list[dict], images: list, clip) -> None:
    """`clip` (100·cos) on every node that lacks one, for many trees in one batched pass."""
    missing = [[n for n in t["nodes"][1:] if "clip" not in n] for t in trees]
    scores = clip.scores_many(images, [[n["text"].strip() for n in nodes] for nodes in missing])
    for nodes, values in zip(missing, scores):
        for n, c in zip(nodes, values):
            n["clip"] = c


def _scored_isolated(trees: list[dict], images: list, clip, add_vig, summary: StageSummary) -> list[dict]:
    """The trees of a batch with their CLIP (and VIG) scores; when the batch fails for a reason other
    than memory, each tree is scored alone and a failing one is skipped with its reason counted."""
    from csr.models import is_oom

    if not trees:
        return []
    try:
        add_clip_scores(trees, images, clip)
        if add_vig is not None:
            add_vig(trees, images)
        return trees
    except Exception as err:  # noqa: BLE001 - a bad record must not stop the others
        if is_oom(err):
            raise
        if len(trees) == 1:
            summary.skip("record_error", f"tree {trees[0]['id']} ({type(err).__name__}: {str(err)[:200]})")
            return []
    return [t for tree, image in zip(trees, images) for t in _scored_isolated([tree], [image], clip, add_vig, summary)]


def _batches(iterable, size):
    batch = []
    for item in iterable:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def needs_node_vig(cfg: CSRConfig) -> bool:
    """Whether the reward or the pair filter under `cfg` reads a node field that `add_node_vig` fills."""
    return any(f in required_raw_fields(cfg) for f in ("vig", "vig_sum", "vig_n_tokens"))


def _vig_scorer(cfg: CSRConfig, policy_path: str | None):
    """(trees, images) -> None adding node VIG, when the reward or the pair filter needs it."""
    if not needs_node_vig(cfg):
        return None
    from csr.models import load_policy
    from csr.vig.reward import add_node_vig
    from csr.vig.logprobs import VIGOptions

    model, processor = load_policy(policy_path or cfg.model.model_name_or_path, dtype=cfg.model.torch_dtype,
                                   device=cfg.model.device, trust_remote_code=cfg.model.trust_remote_code,
                                   allow_pickle_weights=cfg.model.allow_pickle_weights,
                                   chat_template=cfg.model.chat_template)  # the prompts the search used
    options = VIGOptions.from_score_config(cfg.score)
    return lambda trees, images: add_node_vig(trees, images, model, processor, options)


def run_score(cfg: CSRConfig, generate_dir: str | Path, out_dir: str | Path, policy_path: str | None = None) -> dict:
    out_dir = Path(out_dir)
    vig_policy = (policy_path or cfg.model.model_name_or_path) if needs_node_vig(cfg) else None
    guard = StageGuard(out_dir, "score", cfg, inputs=(generate_dir, vig_policy))
    done = guard.finished()
    if done is not None:
        return done
    trees_path = require_done(generate_dir, "generate") / "trees.jsonl"
    guard.start()
    scored_path = out_dir / SCORED
    repair_jsonl_tail(scored_path)
    finished = {t["id"] for t in iter_jsonl(scored_path)} if scored_path.exists() else set()  # trees already scored

    from csr.score.clip import load_clip_from_config

    clip = load_clip_from_config(cfg.score, cfg.model.device)
    add_vig = _vig_scorer(cfg, policy_path)  # the round's policy: VIG is the model's own gain
    summary = StageSummary("score")
    todo = (t for t in iter_jsonl(trees_path) if t["id"] not in finished)
    with JsonlAppender(scored_path) as sink, tqdm(desc="score", unit="tree") as bar:
        for batch in _batches(todo, cfg.score.tree_batch_size):
            trees, images = load_tree_images(batch, summary)
            trees = _scored_isolated(trees, images, clip, add_vig, summary)
            for tree in trees:
                sink.write(calibrate_tree(tree, cfg.score, cfg.pairs))
                fault_point("score.tree_written")
                summary.processed += 1
            bar.update(len(batch))
    summary.extra["trees"] = len(finished) + summary.processed
    summary.log()
    mark_done(out_dir, guard.record(summary.as_dict()))
    return read_done(out_dir)


def required_raw_fields(cfg: CSRConfig) -> dict[str, str]:
    """{node field: the stage that writes it} that recomputing rewards and pairs under `cfg` needs."""
    need = term_raw_fields(cfg.score)
    if cfg.pairs.vig_filter:
        need.update(vig_sum="score (with pairs.vig_filter=true)", vig_n_tokens="score (with pairs.vig_filter=true)")
    return need


def check_raw_scores(trees: list[dict], cfg: CSRConfig, source: Path) -> None:
    """Refuse, naming the stage to rerun, when a node lacks a raw score that `cfg` reads."""
    need = required_raw_fields(cfg)
    for tree in trees:
        for n in tree["nodes"][1:]:
            for field, stage in need.items():
                if n.get(field) is None:
                    raise ConfigError(f"{source}: node {n['id']} of tree {tree['id']} has no '{field}', which "
                                      f"these settings need to rescore; rerun the {stage} stage for this round.")


def run_rescore(cfg: CSRConfig, score_dir: str | Path, out_dir: str | Path) -> dict:
    """Rewards and pairs of a finished score stage recomputed under `cfg`, from its stored raw scores.

    Writes `<out_dir>/score/` (scored.jsonl, DONE.json) and `<out_dir>/pairs/` as the stages would;
    loads no model and no CLIP. Search-time settings (generate.*) cannot change here: the trees stay.
    """
    from csr.pairs import run_pairs

    out_dir = Path(out_dir)
    source = require_done(score_dir, "score") / SCORED
    trees = list(iter_jsonl(source))
    check_raw_scores(trees, cfg, source)
    score_out = out_dir / "score"
    guard = StageGuard(score_out, "score", cfg, inputs=(score_dir,))
    if guard.finished() is None:
        guard.start()
        summary = StageSummary("score (rescore)")
        for tree in trees:
            calibrate_tree(tree, cfg.score, cfg.pairs)
            summary.processed += 1
        write_jsonl(score_out / SCORED, trees)
        summary.extra.update(trees=len(trees), rescored_from=str(source),
                             reward_lambda=cfg.score.reward_lambda, calibration=cfg.score.calibration,
                             self_reward=cfg.score.self_reward, cleaning=cfg.pairs.cleaning)
        summary.log()
        mark_done(score_out, guard.record(summary.as_dict()))
    return run_pairs(cfg, score_out, out_dir / "pairs")


def main(argv=None) -> int:
    p = stage_parser("Stage score: calibrated rewards for every tree node.")
    p.add_argument("--trees", help="Folder of a finished generate stage.")
    p.add_argument("--policy", help="The round's policy, for node VIG (default: model.model_name_or_path).")
    p.add_argument("--rescore", metavar="SCORE_DIR",
                   help="Instead of scoring --trees: recompute the rewards and the pairs of this finished score "
                        "stage from its stored raw scores under the given recipe (no model, no CLIP); writes "
                        "OUT/score and OUT/pairs.")
    p.add_argument("--out", required=True, help="Output folder (scored.jsonl, DONE.json; with --rescore: "
                                                 "score/ and pairs/).")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.rescore:
        if args.trees:
            p.error("--rescore reads a finished score stage; do not pass --trees with it")
        with lock_if_main_process(args.out):
            print(json.dumps(run_rescore(cfg, args.rescore, args.out), indent=2))
        return 0
    if not args.trees:
        p.error("--trees is required (or --rescore SCORE_DIR)")
    with lock_if_main_process(args.out):
        run_score(cfg, args.trees, args.out, args.policy)
    return 0
