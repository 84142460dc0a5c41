"""Stage score: self-reward and CLIP visual constraint for every node, calibrated among siblings.

Reads generate/trees.jsonl, writes score/scored.jsonl: the same trees with, on every node,
`clip` (100·cos), `self_reward`, `visual_reward` and `reward` (see `csr.score.reward`).
CLIP scores computed during the search (selection=calibrated) are reused, not recomputed.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

from tqdm.auto import tqdm

from csr.cli import stage_parser
from csr.config import CSRConfig, load_config
from csr.data import BadInput, load_image
from csr.faults import fault_point
from csr.io import (JsonlAppender, StageSummary, is_done, iter_jsonl, mark_done, read_done,
                    repair_jsonl_tail, require_done)
from csr.score.reward import score_siblings

log = logging.getLogger(__name__)

SCORED = "scored.jsonl"


def siblings_by_parent(nodes: list[dict]) -> dict[int, list[dict]]:
    groups: dict[int, list[dict]] = defaultdict(list)
    for n in nodes[1:]:
        groups[n["parent"]].append(n)
    return groups


def calibrate_tree(tree: dict, score_cfg) -> dict:
    """Fill self/visual/reward on every node of a tree whose nodes hold `clip` (in place)."""
    for siblings in siblings_by_parent(tree["nodes"]).values():
        score_siblings(siblings, lam=score_cfg.reward_lambda, mode=score_cfg.calibration,
                       self_kind=score_cfg.self_reward, clamp=score_cfg.clip_clamp)
    return tree


def add_clip_scores(trees: list[dict], images: list, clip) -> None:
    """`clip` (100·cos) on every node that lacks one, for many trees in one batched pass."""
    missing = [[n for n in t["nodes"][1:] if "clip" not in n] for t in trees]
    scores = clip.scores_many(images, [[n["text"] for n in nodes] for nodes in missing])
    for nodes, values in zip(missing, scores):
        for n, c in zip(nodes, values):
            n["clip"] = c


def _batches(iterable, size):
    batch = []
    for item in iterable:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def run_score(cfg: CSRConfig, generate_dir: str | Path, out_dir: str | Path) -> dict:
    out_dir = Path(out_dir)
    if is_done(out_dir):
        log.info("[score] %s is finished; skipping", out_dir)
        return read_done(out_dir)
    trees_path = require_done(generate_dir, "generate") / "trees.jsonl"
    scored_path = out_dir / SCORED
    repair_jsonl_tail(scored_path)
    finished = {t["id"] for t in iter_jsonl(scored_path)} if scored_path.exists() else set()

    from csr.score.clip import load_clip_from_config

    clip = load_clip_from_config(cfg.score, cfg.model.device)
    summary = StageSummary("score")
    todo = (t for t in iter_jsonl(trees_path) if t["id"] not in finished)
    with JsonlAppender(scored_path) as sink, tqdm(desc="score", unit="tree") as bar:
        for batch in _batches(todo, cfg.score.tree_batch_size):
            trees, images = [], []
            for tree in batch:
                try:
                    images.append(load_image(tree["image"]))
                    trees.append(tree)
                except BadInput as e:
                    summary.skip(e.reason, f"tree {tree['id']} ({e})")
            add_clip_scores(trees, images, clip)
            for tree in trees:
                sink.write(calibrate_tree(tree, cfg.score))
                fault_point("score.tree_written")
                summary.processed += 1
            bar.update(len(batch))
    summary.extra["trees"] = len(finished) + summary.processed
    summary.log()
    mark_done(out_dir, summary.as_dict())
    return summary.as_dict()


def main(argv=None) -> int:
    p = stage_parser("Stage score: calibrated rewards for every tree node.")
    p.add_argument("--trees", required=True, help="Folder of a finished generate stage.")
    p.add_argument("--out", required=True, help="Output folder (scored.jsonl, DONE.json).")
    args = p.parse_args(argv)
    run_score(load_config(args.config, args.overrides), args.trees, args.out)
    return 0
