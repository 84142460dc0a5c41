"""Stage generate: one sentence-level search tree per (image, prompt), appended to trees.jsonl.

Trees are grown `prompt_batch_size` at a time in lockstep (see `expander.CachedLlavaExpander`).
Under `accelerate launch` / `torchrun` the prompts are sharded across processes: rank r takes every
WORLD_SIZE-th prompt from r, writes `shards/trees.rank<r>.jsonl`, and the shards are merged in
prompt order into trees.jsonl once all are finished. Resumable, per shard: trees are appended
(and fsynced) as they finish; a rerun repairs a torn last line and continues at the first prompt
without a tree. The stage is finished when DONE.json exists.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from pathlib import Path

from tqdm.auto import tqdm

from csr.cli import stage_parser
from csr.config import CSRConfig, load_config
from csr.data import BadInput, PromptRecord, load_image, load_prompts
from csr.generate.expander import CachedLlavaExpander, LlavaExpander
from csr.generate.tree import TreeSettings, grow_tree, grow_trees
from csr.faults import fault_point
from csr.runstate import StageGuard, lock_if_main_process
from csr.io import (JsonlAppender, StageInputMissing, StageSummary, is_done, iter_jsonl, mark_done, read_done,
                    repair_jsonl_tail, write_jsonl)
from csr.models import build_chat_prompt, load_policy, prepare_image, sentence_end_ids
from csr.score.reward import calibrated_rewards, reward_term, term_raw_fields

log = logging.getLogger(__name__)

TREES = "trees.jsonl"


def dist_info() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the launcher's environment; (0, 1, 0) when alone."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def make_sibling_scorer(cfg: CSRConfig, clip=None, image=None, vig=None, prompt: str = ""):
    """The search score of new siblings: self-score only (official) or the calibrated reward (paper),
    the same reward the score stage stores (`calibrated_rewards`, every active term included). The
    raw fields the terms read are filled first: `clip`, and node VIG when `vig` is given
    ((model, processor, VIGOptions), see `_search_vig`; `prompt`: the record's question)."""
    s = cfg.score
    if cfg.generate.selection == "self":
        self_term = reward_term("self")
        return lambda siblings: [self_term.value(n, s) for n in siblings]
    image_feat = clip.image_features([image])[0]

    def calibrated(siblings, nodes):
        texts = [n["text"].strip() for n in siblings]  # the sentence alone, not the whitespace before it
        clip_scores = (100.0 * clip.text_features(texts) @ image_feat).tolist()
        for n, c in zip(siblings, clip_scores):
            n["clip"] = c  # reused by the score stage
        if vig is not None:
            from csr.vig.reward import add_node_vig

            model, processor, options = vig
            add_node_vig([{"prompt": prompt, "nodes": nodes}], [image], model, processor, options,
                         only={n["id"] for n in siblings})
        return calibrated_rewards(siblings, s)
    return calibrated


def _grow_batch(cfg, expander, clip, processor, batch: list[tuple[PromptRecord, object]], settings):
    prompt_texts = [build_chat_prompt(processor, rec.prompt) for rec, _ in batch]
    # CLIP (and VIG, as the score stage computes it) see the image as it is; the policy's search sees
    # it as model.image_aspect prepares it
    vig = _search_vig(cfg, expander)
    scorers = [make_sibling_scorer(cfg, clip, image, vig, rec.prompt) for rec, image in batch]
    images = [prepare_image(image, processor, cfg.model.image_aspect) for _, image in batch]
    if isinstance(expander, CachedLlavaExpander):
        prompts = expander.encode_prompts(images, prompt_texts)
        return grow_trees(lambda requests: expander.expand_many(prompts, requests), scorers, settings, prompt_texts)
    return [grow_tree(lambda responses, i=i: expander.expand(images[i], prompt_texts[i], responses),
                      scorers[i], settings, prompt_texts[i]) for i in range(len(batch))]


def _search_vig(cfg: CSRConfig, expander):
    """(model, processor, VIGOptions) when the search's reward has a VIG term, else None."""
    if cfg.generate.selection != "calibrated" or "vig" not in term_raw_fields(cfg.score):
        return None
    from csr.vig.logprobs import VIGOptions

    return expander.model, expander.processor, VIGOptions.from_score_config(cfg.score)


def _grow_isolated(cfg, expander, clip, processor, batch, settings, summary: StageSummary):
    """(record, nodes) of every record of `batch` that can be grown: when the batch fails for a reason
    other than memory (a prompt the tokenizer or template refuses), each record is grown alone and a
    failing one is skipped with its reason counted, never the batch, never the stage."""
    from csr.models import is_oom

    if not batch:
        return []
    try:
        return list(zip(batch, _grow_batch(cfg, expander, clip, processor, batch, settings)))
    except Exception as err:  # noqa: BLE001 - a bad record must not stop the others
        if is_oom(err):
            raise
        if len(batch) == 1:
            rec = batch[0][0]
            summary.skip("record_error", f"prompt {rec.id} ({type(err).__name__}: {str(err)[:200]})")
            return []
    out = []
    for item in batch:
        out.extend(_grow_isolated(cfg, expander, clip, processor, [item], settings, summary))
    return out


def generate_shard(cfg: CSRConfig, policy_path: str, records: list[PromptRecord], trees_path: Path,
                   summary: StageSummary, device: str) -> None:
    """Grow and append the trees of `records` missing from `trees_path`."""
    repair_jsonl_tail(trees_path)
    finished = {t["id"] for t in iter_jsonl(trees_path)} if trees_path.exists() else set()
    todo = [r for r in records if r.id not in finished]
    log.info("[generate] %d prompts, %d already done, %d to go", len(records), len(finished), len(todo))
    summary.extra["trees"] = len(finished)
    if not todo:
        return
    g = cfg.generate
    model, processor = load_policy(policy_path, dtype=cfg.model.torch_dtype, device=device,
                                   trust_remote_code=cfg.model.trust_remote_code,
                                   allow_pickle_weights=cfg.model.allow_pickle_weights,
                                   chat_template=cfg.model.chat_template)
    clip = None
    if g.selection == "calibrated":
        from csr.score.clip import load_clip_from_config

        clip = load_clip_from_config(cfg.score, device)
    debias = None
    if g.candidate_mode == "debias":
        from csr.debias.sampling import DebiasedCandidates

        debias = DebiasedCandidates(model, processor, **g.debias_settings())
    cls = CachedLlavaExpander if g.implementation == "cached" else LlavaExpander
    expander = cls(model, processor, num_candidates=g.num_candidates, diversity_penalty=g.diversity_penalty,
                   max_new_tokens=g.max_new_tokens, stop_ids=sentence_end_ids(processor.tokenizer, g.sentence_end),
                   node_batch_size=g.node_batch_size, debias=debias, eos_stops=g.stop_at_eos,
                   continuation=g.continuation,
                   **({"prefix_attention": g.prefix_attention, "reuse_decode_kv": g.reuse_decode_kv}
                      if cls is CachedLlavaExpander else {}))
    settings = TreeSettings(g.sentence_beam_width, g.pruning, g.max_response_chars, g.max_sentences, g.length_limit)

    n_candidates, start = 0, time.perf_counter()
    bar = tqdm(total=len(todo), desc="generate", unit="prompt")
    with JsonlAppender(trees_path) as sink:
        for i in range(0, len(todo), g.prompt_batch_size):
            batch = []
            for rec in todo[i:i + g.prompt_batch_size]:
                try:
                    batch.append((rec, load_image(rec.image)))
                except BadInput as e:
                    summary.skip(e.reason, f"prompt {rec.id} ({e})")
            for (rec, _), nodes in _grow_isolated(cfg, expander, clip, processor, batch, settings, summary):
                sink.write({"id": rec.id, "image": rec.image, "prompt": rec.prompt, "nodes": nodes})
                fault_point("generate.tree_written")
                n_candidates += len(nodes) - 1
                summary.processed += 1
            bar.update(len(todo[i:i + g.prompt_batch_size]))
    bar.close()
    elapsed = time.perf_counter() - start
    summary.extra.update(trees=len(finished) + summary.processed, candidates_this_run=n_candidates,
                         seconds_this_run=round(elapsed, 2),
                         candidates_per_second=round(n_candidates / elapsed, 2) if elapsed > 0 else None)


def _merge_shards(out_dir: Path, records: list[PromptRecord], world: int) -> int:
    """Concatenate the finished shards into trees.jsonl in prompt order; returns the tree count."""
    trees = {}
    for r in range(world):
        for t in iter_jsonl(out_dir / "shards" / f"trees.rank{r}.jsonl"):
            trees[t["id"]] = t
    return write_jsonl(out_dir / TREES, [trees[rec.id] for rec in records if rec.id in trees])


def _wait_for(paths: list[Path], what: str, poll: float = 2.0) -> None:
    last_note = time.monotonic()
    while not all(p.exists() for p in paths):
        if time.monotonic() - last_note > 60:
            log.info("[generate] waiting for %s", what)
            last_note = time.monotonic()
        time.sleep(poll)


def run_generate(cfg: CSRConfig, policy_path: str, out_dir: str | Path) -> dict:
    out_dir = Path(out_dir)
    guard = StageGuard(out_dir, "generate", cfg, inputs=(policy_path,))
    done = guard.finished()  # refuses a folder made with other settings
    if done is not None:
        return done
    rank, world, local_rank = dist_info()
    if rank == 0:
        guard.start()
    device = cfg.model.device
    if device == "auto" and world > 1:
        import torch

        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    summary = StageSummary("generate")
    records = load_prompts(cfg.data.prompts, cfg.data.image_root, cfg.data.image_pattern,
                           cfg.data.max_prompts, cfg.data.allow_absolute_image_paths,
                           summary if rank == 0 else None, cfg.data.max_prompt_chars)
    if world == 1:
        generate_shard(cfg, policy_path, records, out_dir / TREES, summary, device)
        summary.log()
        if not summary.extra.get("trees"):  # nothing to score: not done, so a fixed prompt file is used next time
            raise StageInputMissing(f"[generate] no tree was grown from {cfg.data.prompts} (skipped: "
                                    f"{dict(summary.skipped)}); fix the prompt file or the images and rerun.")
        mark_done(out_dir, guard.record(summary.as_dict()))
        return read_done(out_dir)

    shard_dir = out_dir / "shards"
    shard_path = shard_dir / f"trees.rank{rank}.jsonl"
    if not is_done(shard_dir / f"rank{rank}"):
        generate_shard(cfg, policy_path, records[rank::world], shard_path, summary, device)
        mark_done(shard_dir / f"rank{rank}", summary.as_dict())
    if rank == 0:
        _wait_for([shard_dir / f"rank{r}" / "DONE.json" for r in range(world)], "the other ranks' shards")
        shard_summaries = [read_done(shard_dir / f"rank{r}") for r in range(world)]
        merged = _merge_shards(out_dir, records, world)
        skipped = Counter()
        for s in shard_summaries:  # rank 0's also holds the prompt-file skips
            skipped.update(s["skipped"])
        total = {"stage": "generate", "world_size": world, "trees": merged,
                 "processed": sum(s["processed"] for s in shard_summaries), "skipped": dict(skipped),
                 "skipped_total": sum(skipped.values()), "failed": 0, "shards": shard_summaries}
        mark_done(out_dir, guard.record(total))
    else:
        _wait_for([out_dir / "DONE.json"], "rank 0 to merge the shards")
    return read_done(out_dir)


def main(argv=None) -> int:
    p = stage_parser("Stage generate: sentence-level beam search trees.")
    p.add_argument("--policy", help="Model folder or hub id (default: model.model_name_or_path).")
    p.add_argument("--out", required=True, help="Output folder (trees.jsonl, DONE.json).")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    with lock_if_main_process(args.out):
        run_generate(cfg, args.policy or cfg.model.model_name_or_path, args.out)
    return 0
