"""Diverse group beam search over tokens, one beam per group, vectorised over tree nodes.

For each of M tree nodes the search grows G candidate next sentences at once (the official CSR
generator's `num_beams=num_beam_groups=5, diversity_penalty=3.0`). At every step the groups pick
their token in order; group g's log-probs are lowered by `diversity_penalty` times the number of
earlier groups (of the same node) that picked that token at this step (Hamming diversity,
Vijayakumar et al. 2018, as in transformers' former `HammingDiversityLogitsProcessor`).

A group's sentence ends at a stop token ('.', and EOS when `eos_stops`) or after `max_new_tokens`.
With `eos_stops=False` (the official code: it passes only the period id as generate()'s
`eos_token_id`) an EOS does not stop the group; the candidate records that it holds one
(`has_eos`), which makes its tree node final.

Rows of finished nodes: given `keep_rows`, a node whose G groups have all finished leaves the
batch (its rows are no longer stepped; `keep_rows` is told which rows stay, so the caller can slice
its cache); without it every row is stepped to the end, finished ones fed `pad_id`. Either way the
candidates are the same: a finished group's token is never read again, and the diversity counts
are per node.

With one beam per group, the group keeps its arg-max token; transformers' beam-hypothesis bookkeeping, which could let
a group run past a '.' found among its second-best candidates, is not reproduced.

Two scores are kept per candidate:
- `logprobs`: the pure log-softmax of the model's logits for each chosen token (the paper's R_T
  is their sum: the log of the product of token probabilities);
- `beam_score`: the penalised score summed and divided by the length, which is what the official
  code's `sequences_scores` holds (length-normalised, diversity penalty included).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class Candidate:
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    penalised_sum: float = 0.0
    ended_by: str = "length"  # "stop" ('.'), "eos", or "length"
    has_eos: bool = False     # an EOS among the tokens (stopping there or not): the node is final

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def logprob_sum(self) -> float:
        return float(sum(self.logprobs))

    @property
    def logprob_mean(self) -> float:
        return self.logprob_sum / max(self.n_tokens, 1)

    @property
    def beam_score(self) -> float:
        return self.penalised_sum / max(self.n_tokens, 1)


StepFn = Callable[[torch.Tensor], torch.Tensor]
"""Takes the tokens just chosen, shape [A*G] (row a*G+g = the a-th node still in the batch, group g),
returns next logits [A*G, V]."""

KeepRowsFn = Callable[[torch.Tensor], None]
"""Told, before a step, the rows of the current batch that stay (sorted, whole nodes' G rows)."""


def diverse_group_search(first_logits: torch.Tensor, step: StepFn, *, num_groups: int,
                         diversity_penalty: float, max_new_tokens: int, stop_ids: list[int],
                         eos_ids: list[int], pad_id: int, eos_stops: bool = True,
                         suppress_ids: list[int] = (), keep_rows: KeepRowsFn | None = None) -> list[list[Candidate]]:
    """Run the search for M nodes whose next-token logits are `first_logits` [M, V].

    Returns, per node, its G candidates in group order. `step` is called with pad_id for rows
    that already finished; their logits are ignored. `suppress_ids` are never chosen (the image
    placeholder: a generated one would not match any image features when the text is fed back).
    With `keep_rows`, the nodes whose groups have all finished are dropped from later steps.
    """
    M, V = first_logits.shape
    G = num_groups
    device = first_logits.device
    stop = torch.zeros(V, dtype=torch.bool, device=device)
    stop_set = set(stop_ids) | set(eos_ids) if eos_stops else set(stop_ids) - set(eos_ids)
    stop[list(stop_set)] = True
    eos_set = set(eos_ids)

    blocked = torch.zeros(V, dtype=torch.bool, device=device)
    if suppress_ids:
        blocked[[i for i in suppress_ids if 0 <= i < V]] = True
    cands = [[Candidate() for _ in range(G)] for _ in range(M)]
    done = torch.zeros(M, G, dtype=torch.bool, device=device)
    nodes = torch.arange(M, device=device)  # the nodes in the batch, in row order
    logits = first_logits.unsqueeze(1).expand(M, G, V)
    for t in range(max_new_tokens):
        A = nodes.numel()
        logp = torch.log_softmax(logits.float(), dim=-1)  # [A, G, V]
        counts = torch.zeros(A, V, device=device)
        chosen = torch.full((A, G), pad_id, dtype=torch.long, device=device)
        live = ~done[nodes]  # the groups still growing at this step
        tok_logp, tok_score = logp.new_empty(A, G), logp.new_empty(A, G)
        for g in range(G):
            scores = (logp[:, g] - diversity_penalty * counts).masked_fill(blocked, float("-inf"))
            tok = scores.argmax(dim=-1)
            tok_score[:, g] = scores.gather(1, tok[:, None]).squeeze(1)
            tok_logp[:, g] = logp[:, g].gather(1, tok[:, None]).squeeze(1)
            chosen[:, g] = torch.where(live[:, g], tok, torch.full_like(tok, pad_id))
            counts.scatter_add_(1, tok[:, None], live[:, g].float()[:, None])
        finished = ~live | stop[chosen]
        done[nodes] = finished
        # the candidates' bookkeeping from one host copy per step (not one device read per row)
        node_of = nodes.tolist()
        for (a, g), t_id, lp, sc in zip(torch.nonzero(live).tolist(), chosen[live].tolist(),
                                        tok_logp[live].tolist(), tok_score[live].tolist()):
            c = cands[node_of[a]][g]
            c.token_ids.append(t_id)
            c.logprobs.append(lp)
            c.penalised_sum += sc
            if t_id in eos_set:
                c.has_eos = True
            if t_id in stop_set:
                c.ended_by = "eos" if t_id in eos_set else "stop"
        if bool(finished.all()) or t == max_new_tokens - 1:
            break
        if keep_rows is not None:
            still = ~finished.all(dim=1)
            if not bool(still.all()):  # a node whose groups all ended: no more steps for its rows
                stay = torch.nonzero(still).squeeze(1)
                keep_rows((stay[:, None] * G + torch.arange(G, device=device)).reshape(-1))
                nodes, chosen = nodes[stay], chosen[stay]
        logits = step(chosen.reshape(-1)).reshape(nodes.numel(), G, V)
    return cands
