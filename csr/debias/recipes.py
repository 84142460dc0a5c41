"""Named settings of the debiasing methods (docs/method.md §2): the toolkit's defaults and the authors'.

A recipe fixes every setting the paper and the authors' code (yfzhang114/LLaVA-Align) can disagree
on; an explicit command-line flag still overrides any one of them.

Calibration (`csr debias calibrate --recipe NAME`):

- ``toolkit`` (default): p_cf is the equal-weight mean of the renormalised label scores of four
  content-free inputs (no image, ``<unk>``, a blank and a noise image); a label's score sums the
  first-token probabilities of its case and spacing variants; no POPE suffix.
- ``authors``: the authors' code as it runs: p_cf from the no-image and ``<unk>`` inputs only, their
  label probabilities summed and renormalised per question, plus 1e-4; a label's probability is
  that of the highest-ranked token among the first step's top 10 whose lower-cased, stripped text
  is the label (variants are not summed); POPE questions get " Please answer this question with
  one word." appended.

Both calibrate with ``W = diag(p_cf)^-1`` per question.

Debias sampling (`csr debias sample --recipe NAME`, and ``generate.debias_recipe`` for CSR candidates):

- ``toolkit`` (default): greedy arg-max, content-free branch = no image, α = 1, β = 0.1.
- ``authors``: sampling (temperature 1, no top-k / top-p), content-free logits = the mean of the
  no-image and ``<unk>`` branches, α = 1, β = 0.1; their POPE scripts pass β = 0.2 and append the
  POPE suffix above.

Pure data, no torch: the CLI, the recipe config and the tests import it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

POPE_SUFFIX_AUTHORS = "Please answer this question with one word."


@dataclass(frozen=True)
class CalibrationRecipe:
    cf: tuple[str, ...]       # content-free inputs
    combine: str              # mean (of renormalised tables) | sum (of raw tables, then renormalised)
    epsilon: float            # added to p_cf after it is formed
    label_top_k: int          # 0: label = summed variants' first tokens; k: the exact label token among the top k
    merge_variants: bool      # with label_top_k = 0: sum case / spacing variants
    pope_suffix: str          # appended to POPE questions ("" for none)
    mode: str = "diag"
    per_sample: bool = True
    reproduces: str = ""

    def as_dict(self) -> dict:
        d = asdict(self)
        d["cf"] = list(self.cf)
        return d


@dataclass(frozen=True)
class SamplingRecipe:
    do_sample: bool
    cf: str                   # none | unk | mean
    alpha: float
    beta: float
    pope_beta: float          # β for POPE answers
    pope_suffix: str
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    reproduces: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


CALIBRATION_RECIPES = {
    "toolkit": CalibrationRecipe(
        cf=("none", "unk", "blank", "noise"), combine="mean", epsilon=0.0, label_top_k=0, merge_variants=True,
        pope_suffix="",
        reproduces="the toolkit's default: four content-free inputs averaged, label variants summed"),
    "authors": CalibrationRecipe(
        cf=("none", "unk"), combine="sum", epsilon=1e-4, label_top_k=10, merge_variants=False,
        pope_suffix=POPE_SUFFIX_AUTHORS,
        reproduces="the authors' code (LLaVA-Align eval_pope_calibrate.py, 'none_unk', individual): no-image and "
                   "<unk> summed and renormalised per question, +1e-4; the exact label token among the top 10; "
                   "POPE suffix"),
}

SAMPLING_RECIPES = {
    "toolkit": SamplingRecipe(
        do_sample=False, cf="none", alpha=1.0, beta=0.1, pope_beta=0.1, pope_suffix="",
        reproduces="the toolkit's default: greedy, no-image branch, α = 1, β = 0.1"),
    "authors": SamplingRecipe(
        do_sample=True, cf="mean", alpha=1.0, beta=0.1, pope_beta=0.2, pope_suffix=POPE_SUFFIX_AUTHORS,
        reproduces="the authors' code: sampling, the mean of the no-image and <unk> branches' logits, α = 1, "
                   "β = 0.1 (their POPE scripts: β = 0.2 and the POPE suffix)"),
}

RECIPE_NAMES = tuple(CALIBRATION_RECIPES)


def _get(table: dict, name: str, what: str):
    if name not in table:
        raise ValueError(f"unknown {what} recipe {name!r}: choose from {', '.join(table)}")
    return table[name]


def calibration_recipe(name: str) -> CalibrationRecipe:
    """The named calibration recipe; an unknown name is refused with the list."""
    return _get(CALIBRATION_RECIPES, name, "calibration")


def sampling_recipe(name: str) -> SamplingRecipe:
    """The named debias-sampling recipe; an unknown name is refused with the list."""
    return _get(SAMPLING_RECIPES, name, "debias sampling")
