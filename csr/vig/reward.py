"""VIG inside CSR: the model side of the VIG reward term, and a preference-pair filter.

None of the three papers combines them (docs/method.md §3); this is the project's proposal.

Reward term
-----------
The term itself is registered with the others in `csr.score.reward` (term `vig`, weight
`score.vig_weight`, value `vig_reward`): R = λ·R_I + (1 − λ)·R_T + w_vig·R_VIG. This module fills the
node field it reads. For a tree node (a sentence s), `add_node_vig` stores VIG(s), the mean over s's
tokens of
log p(t | image, prompt, earlier sentences, t_<) − log p(t | content-free input, same text),
with the sentence tokenised in context exactly as the generate stage's expander does (chat prompt,
then the earlier sentences and s as generated, one tokenisation of the whole text; the tokens of
s are those after the longest common prefix with the tokenisation of the text before s).

Pair filter
-----------
`vig_pair_filter` drops a pair whose chosen response has lower VIG than its rejected one
(chosen_vig < rejected_vig + min_gap). A response's VIG is the token-weighted mean of its
sentences' VIG (`path_vig`, from the node fields `vig_sum` / `vig_n_tokens`), or, model-side, the
sample VIG of the whole response (`add_response_vigs`).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Sequence

import torch

from csr.content_free import no_image_prompt, vig_content_free_image
from csr.vig.logprobs import VIGOptions, target_logprobs

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Pure: the pair filter
# ---------------------------------------------------------------------------------------------


def path_vig(nodes: Sequence[dict]) -> float | None:
    """A response's VIG from its sentences: Σ vig_sum / Σ vig_n_tokens (token-weighted); None without VIG."""
    total = sum(n.get("vig_sum", 0.0) for n in nodes if n.get("vig_n_tokens"))
    count = sum(n.get("vig_n_tokens", 0) for n in nodes if n.get("vig_n_tokens"))
    return total / count if count else None


def vig_pair_filter(pair: dict, min_gap: float = 0.0) -> str | None:
    """None to keep the pair, or the reason to drop it: its chosen response's VIG is below the rejected one's.

    Reads pair["chosen_vig"] and pair["rejected_vig"]; drops when chosen_vig < rejected_vig + min_gap.
    """
    c, r = pair.get("chosen_vig"), pair.get("rejected_vig")
    if c is None or r is None:
        raise ValueError(f"pair {pair.get('id')!r} has no chosen_vig/rejected_vig: the VIG pair filter needs "
                         f"node VIG from the score stage (score.vig_weight or pairs.vig_filter) or add_response_vigs.")
    return "chosen_lower_vig" if c < r + min_gap else None


# ---------------------------------------------------------------------------------------------
# Model glue: node VIG in context
# ---------------------------------------------------------------------------------------------


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@torch.no_grad()
def continuation_logprobs(model, processor, contexts: list[str], continuations: list[str], images: list | None
                          ) -> tuple[list[list[float]], list[list[int]]]:
    """log p of each continuation's tokens after its context, the whole text tokenised at once.

    full = context + continuation (exact texts, as the expander builds node prefixes). The continuation's
    tokens are those of `full` after the longest common prefix with `context`'s tokens. Right
    padding (natural positions). `images` None: text only.
    """
    from csr.tree_format import continue_text

    tok = processor.tokenizer
    fulls = [continue_text(c, s) for c, s in zip(contexts, continuations)]
    tails = []
    for c, f in zip(contexts, fulls):
        ci, fi = tok(c)["input_ids"], tok(f)["input_ids"]
        tails.append(len(fi) - _common_prefix(ci, fi))
    old = tok.padding_side
    tok.padding_side = "right"
    try:
        kw = {"images": images} if images is not None else {}
        enc = processor(text=fulls, padding=True, return_tensors="pt", **kw)
    finally:
        tok.padding_side = old
    lengths = enc["attention_mask"].sum(dim=1).tolist()
    mask = torch.zeros_like(enc["input_ids"], dtype=torch.bool)
    for b, (L, n) in enumerate(zip(lengths, tails)):
        if n:
            mask[b, L - n:L] = True
    lps = target_logprobs(model, dict(enc), mask)
    ids = [row[m].tolist() for row, m in zip(enc["input_ids"], mask)]
    return lps, ids


def add_node_vig(trees: list[dict], images: list, model, processor, options: VIGOptions,
                 only: set[int] | None = None) -> int:
    """`vig`, `vig_sum`, `vig_n_tokens` on every node (root excluded) of the trees, in place; with
    `only`, on the nodes of those ids alone (the new siblings of a search level).

    trees[i] is a generate/score-stage tree ({prompt, nodes}), images[i] its PIL image. The
    sentence's context is the chat prompt and the sentences before it on its path. Batches of
    `options.batch_size` nodes across trees. Returns the number of nodes scored.
    """
    from csr.models import build_chat_prompt
    from csr.tree_format import path_sentences, prefix_text
    from csr.vig.maths import vig_from_logprobs

    options.validate()
    requests = []  # (node, context_real, context_cf, image, cf_image)
    for tree, image in zip(trees, images):
        p_real = build_chat_prompt(processor, tree["prompt"])
        p_cf = no_image_prompt(processor, tree["prompt"]) if options.content_free == "none" else p_real
        cf_img = vig_content_free_image(image, options)
        nodes = tree["nodes"]
        for n in nodes[1:]:
            if only is not None and n["id"] not in only:
                continue
            if not n["text"].strip():
                n["vig"], n["vig_sum"], n["vig_n_tokens"] = None, 0.0, 0
                continue
            before = path_sentences(nodes, n["parent"]) if n["parent"] else []
            requests.append((n, prefix_text(p_real, before), prefix_text(p_cf, before), image, cf_img))
    size = options.batch_size
    for start in range(0, len(requests), size):
        chunk = requests[start:start + size]
        texts = [r[0]["text"] for r in chunk]
        lp_i, ids_i = continuation_logprobs(model, processor, [r[1] for r in chunk], texts, [r[3] for r in chunk])
        cf_images = None if options.content_free == "none" else [r[4] for r in chunk]
        lp_c, ids_c = continuation_logprobs(model, processor, [r[2] for r in chunk], texts, cf_images)
        for (node, *_), a, ia, b, ib in zip(chunk, lp_i, ids_i, lp_c, ids_c):
            if ia != ib:
                raise RuntimeError(f"node {node['id']}: its tokens differ with and without the image "
                                   f"({ia[:6]} vs {ib[:6]})")
            if not ia:
                node["vig"], node["vig_sum"], node["vig_n_tokens"] = None, 0.0, 0
                continue
            per_token, v = vig_from_logprobs(a, b)
            node["vig"], node["vig_sum"], node["vig_n_tokens"] = v, math.fsum(per_token), len(per_token)
    return len(requests)


def add_response_vigs(pairs: list[dict], model, processor, options: VIGOptions) -> None:
    """`chosen_vig` / `rejected_vig` on pairs ({image: path, prompt, chosen, rejected} as `csr.pairs.pick_pair`
    returns them, texts as strings): the sample VIG of each whole response (`csr.vig.score`)."""
    from csr.data import load_image
    from csr.vig.logprobs import score_items

    items = []
    for p in pairs:
        img = load_image(p["image"])
        items.append({"image": img, "prompt": p["prompt"], "answer": p["chosen"]})
        items.append({"image": img, "prompt": p["prompt"], "answer": p["rejected"]})
    scored = score_items(model, processor, items, options)
    for i, p in enumerate(pairs):
        p["chosen_vig"], p["rejected_vig"] = scored[2 * i]["vig"], scored[2 * i + 1]["vig"]


# ---------------------------------------------------------------------------------------------
# Stages usable before the wiring: re-score a finished score stage, filter a finished pairs stage
# ---------------------------------------------------------------------------------------------


def run_rescore(scored_dir: str | Path, out_dir: str | Path, policy: str, options: VIGOptions, score_cfg, *,
                device: str = "auto", dtype: str = "auto") -> dict:
    """Read a finished score stage (nodes with `clip`), add node VIG with `policy`, recalibrate every
    sibling group under `score_cfg` (a ScoreConfig: λ, calibration, self_reward, clip_clamp, vig_weight,
    vig_scale), write `<out_dir>/scored.jsonl` + DONE.json (what `csr pairs --scored` reads)."""
    from csr.data import load_tree_images
    from csr.io import StageSummary, is_done, iter_jsonl, mark_done, read_done, require_done, write_jsonl
    from csr.models import load_policy
    from csr.score.reward import calibrated_rewards
    from csr.tree_format import siblings_by_parent

    out_dir = Path(out_dir)
    if is_done(out_dir):
        return read_done(out_dir)
    trees = list(iter_jsonl(require_done(scored_dir, "score") / "scored.jsonl"))
    model, processor = load_policy(policy, dtype=dtype, device=device)
    summary = StageSummary("vig rescore")
    kept, images = load_tree_images(trees, summary)
    n_nodes = add_node_vig(kept, images, model, processor, options)
    for t in kept:
        for sib in siblings_by_parent(t["nodes"]).values():
            calibrated_rewards(sib, score_cfg)
        summary.processed += 1
    write_jsonl(out_dir / "scored.jsonl", kept)
    vigs = [n["vig"] for t in kept for n in t["nodes"][1:] if n.get("vig") is not None]
    summary.extra.update(trees=len(kept), nodes_scored=n_nodes, policy=str(policy), options=options.as_dict(),
                         reward_lambda=score_cfg.reward_lambda, vig_weight=score_cfg.vig_weight,
                         vig_scale=score_cfg.vig_scale, calibration=score_cfg.calibration,
                         node_vig_mean=sum(vigs) / len(vigs) if vigs else None)
    summary.log()
    mark_done(out_dir, summary.as_dict())
    return summary.as_dict()


def run_filter_pairs(pairs_dir: str | Path, out_dir: str | Path, policy: str, options: VIGOptions, *,
                     min_gap: float = 0.0, device: str = "auto", dtype: str = "auto") -> dict:
    """Copy a finished pairs stage, dropping pairs whose chosen response has lower (sample) VIG than the
    rejected one; adds chosen_vig / rejected_vig to every kept record."""
    from csr.io import StageSummary, is_done, iter_jsonl, mark_done, read_done, require_done, write_jsonl
    from csr.data import message_text
    from csr.models import load_policy

    out_dir = Path(out_dir)
    if is_done(out_dir):
        return read_done(out_dir)
    records = list(iter_jsonl(require_done(pairs_dir, "pairs") / "pairs.jsonl"))
    flat = [{"id": r["id"], "image": r["images"][0] if isinstance(r["images"], list) else r["images"],
             **{k: message_text(r[k]) for k in ("prompt", "chosen", "rejected")}} for r in records]
    model, processor = load_policy(policy, dtype=dtype, device=device)
    add_response_vigs(flat, model, processor, options)
    summary = StageSummary("vig filter-pairs")
    out = []
    for rec, f in zip(records, flat):
        reason = vig_pair_filter(f, min_gap)
        if reason:
            summary.skip(reason, f"pair {rec['id']}")
            continue
        out.append({**rec, "chosen_vig": f["chosen_vig"], "rejected_vig": f["rejected_vig"]})
        summary.processed += 1
    if not out:
        raise RuntimeError(f"the VIG filter dropped every pair of {pairs_dir}")
    write_jsonl(out_dir / "pairs.jsonl", out)
    summary.extra.update(pairs=len(out), pairs_in=len(records), min_gap=min_gap, options=options.as_dict())
    summary.log()
    mark_done(out_dir, summary.as_dict())
    return summary.as_dict()
