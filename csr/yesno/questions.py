"""Yes/no self-rewarding, the pure part: questions from the model's own sentences, answer rewards, pairs.

CSR's preference pairs are captions only, so a round never scores a closed-set answer and the yes/no
channel drifts through the shared weights. This stage adds yes/no pairs made by the model itself:

1. Objects: those its candidate sentences name (present or not: the model cannot know which), most
   often named first, and those it names *without the image* right after one of its own sentences
   (its language prior's partners, the field's "adversarial" POPE negatives). No ground truth.
2. Answers: "Yes, there is a X." / "No, there is no X.". Their reward mixes, with CSR's λ,
   - R_I, the visual constraint, R_I(yes) = V − reference, R_I(no) = −R_I(yes), where (`yesno.visual`)
     * `sentences` (default): V = the highest CLIP among the model's own sentences naming X (its
       candidate sentences; for a prior partner, its no-image continuation's), and the reference is the
       two-class split of every V of the round (`two_class_threshold`): CLIP scores the sentences it was
       trained on (colour, position) far apart, present from absent;
     * `statement`: V = CLIP on "There is a X.", the reference a quantile of CLIP over every vocabulary
       object's statement on the same image (near chance on the world: too little for CLIP to go on);
   - R_T, the self-reward: 100 · the answer's first-token probability calibrated against content-free
     inputs (post-hoc debias, q ∝ p / p_cf; docs/method.md §2), so the language prior's lean toward
     "yes" is divided out before the answer is rewarded.
   R = λ · R_I + (1 − λ) · R_T; chosen = the higher, kept when the two differ by the margin.
3. The round's DPO data: the caption pairs plus a seeded sample of yes/no pairs (`yesno.ratio` per
   caption pair), in the same TRL format (a pair is a pair).
"""

from __future__ import annotations

import random
from collections import Counter
from typing import NamedTuple, Sequence

import numpy as np


class Question(NamedTuple):
    object: str        # canonical object name
    source: str        # "named" (its candidate sentences name it) or "prior" (its no-image continuation)
    question: str
    yes: str
    no: str
    statement: str     # what CLIP scores with yesno.visual=statement
    evidence: tuple = ()  # the model's own sentences naming the object: what CLIP scores with visual=sentences

    @property
    def clip_texts(self) -> tuple[str, ...]:
        """What CLIP scores with visual=sentences: the evidence, or the statement where there is none."""
        return self.evidence or (self.statement,)


def named_objects(sentences: Sequence[str], table) -> list[str]:
    """Canonical objects the sentences name, most often named first (ties: first named first).

    `table`: a `csr.eval.chair.SynonymTable` (surface forms and plurals → canonical names)."""
    counts: Counter = Counter()
    first: dict[str, int] = {}
    for sentence in sentences:
        for _, canonical in table.mentions(sentence):
            counts[canonical] += 1
            first.setdefault(canonical, len(first))
    return sorted(counts, key=lambda c: (-counts[c], first[c]))


def prior_partners(continuations: Sequence[str], named: Sequence[str], table) -> list[str]:
    """Objects the no-image continuations name that the candidate sentences do not, most often first."""
    return [c for c in named_objects(continuations, table) if c not in set(named)]


def naming_sentences(texts: Sequence[str], table) -> dict[str, tuple[str, ...]]:
    """Each object the texts name -> the sentences naming it (split from the texts, stripped, in order, once)."""
    from csr.eval.coco_chair import split_sentences

    out: dict[str, list[str]] = {}
    for text in texts:
        for sentence in split_sentences(text):
            for canonical in dict.fromkeys(c for _, c in table.mentions(sentence)):
                if sentence not in out.setdefault(canonical, []):
                    out[canonical].append(sentence)
    return {k: tuple(v) for k, v in out.items()}


def form_questions(named: Sequence[str], prior: Sequence[str], cfg,
                   evidence: dict[str, tuple[str, ...]] | None = None) -> list[Question]:
    """Up to `cfg.max_named` questions about named objects and `cfg.max_prior` about prior partners.
    `evidence`: object -> the model's own sentences naming it (`naming_sentences`)."""
    chosen = [(o, "named") for o in named[:cfg.max_named]]
    chosen += [(o, "prior") for o in [p for p in prior if p not in set(named)][:cfg.max_prior]]
    evidence = evidence or {}
    return [Question(o, source, cfg.question_template.format(object=o), cfg.yes_template.format(object=o),
                     cfg.no_template.format(object=o), cfg.statement_template.format(object=o),
                     evidence.get(o, ()))
            for o, source in chosen]


def two_class_threshold(values: Sequence[float]) -> float:
    """Where `values` split best into a low and a high class: the cut between two neighbouring sorted values
    that maximises the between-class variance w_lo·w_hi·(mean_lo − mean_hi)² (Otsu's rule), at their
    midpoint. No labels: a round's own scores set it. Values all equal: that value."""
    x = np.sort(np.asarray(values, dtype=float))
    if not len(x):
        raise ValueError("two_class_threshold of no values")
    n = len(x)
    k = np.arange(1, n)                               # k values in the low class
    low_sum = np.cumsum(x)[:-1]
    between = (k / n) * ((n - k) / n) * (low_sum / k - (x.sum() - low_sum) / (n - k)) ** 2
    between[x[1:] == x[:-1]] = -1.0                   # a cut must fall between two different values
    if between.max() < 0:
        return float(x[0])
    cut = int(np.argmax(between))
    return float((x[cut] + x[cut + 1]) / 2)


def quantile(values: Sequence[float], q: float) -> float:
    """numpy's linear-interpolation quantile, as a float."""
    if not len(values):
        raise ValueError("quantile of no values")
    return float(np.quantile(values, q))


def answer_rewards(visual: float, reference: float, q_yes: float, lam: float,
                   vig: tuple[float, float] = (0.0, 0.0), vig_weight: float = 0.0) -> dict:
    """The two answers' reward parts: R_I from CLIP relative to the reference, R_T = 100 · calibrated prob,
    and, with `vig_weight`, each answer's visual information gain `vig` = (yes, no) (log p with the image −
    log p without it) added at that weight."""
    visual_yes = visual - reference
    self_yes, self_no = 100.0 * q_yes, 100.0 * (1.0 - q_yes)
    return {"visual_yes": visual_yes, "visual_no": -visual_yes, "self_yes": self_yes, "self_no": self_no,
            "reward_yes": lam * visual_yes + (1.0 - lam) * self_yes + vig_weight * vig[0],
            "reward_no": lam * -visual_yes + (1.0 - lam) * self_no + vig_weight * vig[1]}


def answer_vig(p_image: Sequence[float], p_no_image: Sequence[float]) -> tuple[float, float]:
    """Each answer's visual information gain, log p(answer | image, question) − log p(answer | question):
    how much the image raises it (docs/method.md §3, on the answer's first tokens)."""
    tiny = 1e-12  # a mass of exactly 0 stays finite
    return tuple(float(np.log(max(a, tiny)) - np.log(max(b, tiny))) for a, b in zip(p_image, p_no_image))


def pick_answer(question: Question, rewards: dict, margin: float) -> tuple[dict | None, str | None]:
    """(chosen/rejected texts with scores, None) or (None, why it is skipped)."""
    yes_first = rewards["reward_yes"] >= rewards["reward_no"]
    hi, lo = (("yes", "no") if yes_first else ("no", "yes"))
    gap = rewards[f"reward_{hi}"] - rewards[f"reward_{lo}"]
    if gap < margin:
        return None, "below_margin"
    return {"chosen": getattr(question, hi), "rejected": getattr(question, lo), "chosen_answer": hi,
            "chosen_score": rewards[f"reward_{hi}"], "rejected_score": rewards[f"reward_{lo}"], "margin": gap}, None


def mix_pairs(caption_pairs: list, yesno_pairs: list, ratio: float, seed: int,
              chosen_yes: Sequence[bool] | None = None) -> tuple[list, list]:
    """The caption pairs followed by a seeded sample of at most round(ratio · len(caption_pairs)) yes/no
    pairs (all when fewer). Returns (mixed, the sampled yes/no pairs).

    `chosen_yes` (one flag per yes/no pair: its chosen answer is "yes"): sample as many "yes" as "no"
    pairs, half the budget each, every pair of a side that has fewer; the sample keeps the pairs' order."""
    want = min(len(yesno_pairs), round(ratio * len(caption_pairs)))
    rng = random.Random(seed)
    if chosen_yes is None:
        picked = sorted(rng.sample(range(len(yesno_pairs)), want))
    else:
        if len(chosen_yes) != len(yesno_pairs):
            raise ValueError(f"chosen_yes has {len(chosen_yes)} flags for {len(yesno_pairs)} pairs")
        sides = [[i for i, y in enumerate(chosen_yes) if y == side] for side in (True, False)]
        per_side = min(want // 2, *(len(side) for side in sides))
        picked = sorted(i for side in sides for i in rng.sample(side, per_side))
    sample = [yesno_pairs[i] for i in picked]
    return list(caption_pairs) + sample, sample
