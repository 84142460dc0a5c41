"""Visual Information Gain (VIG; Lee & Hwang, arXiv 2602.17186; docs/method.md §3).

How much does the image help the model predict each answer token?

    VIG_t = log p(a_t | a_<t, Q, I) − log p(a_t | a_<t, Q, I_cf)
    VIG   = mean_t VIG_t = log( PPL(A | Q, I_cf) / PPL(A | Q, I) )

with I_cf a content-free image: a Gaussian-blurred copy of I (the paper's), no image, or a blank image.

- `csr.vig.maths`: the pure core: VIG from log-probs, the selection threshold τ, which samples and
  tokens selective training keeps.
- `csr.vig.records`: VIG samples from data files (LLaVA conversations, prompt/answer records, TRL's
  conversational format; every assistant turn of a multi-turn conversation; text-only samples kept
  without a VIG).
- `csr.vig.collate`: examples and collators, aligned token for token with what TRL's SFTTrainer
  supervises.
- `csr.vig.logprobs`: the model glue: batched teacher-forced log-probs under the real and the
  content-free input (`csr.content_free`), and their VIG.
- `csr.vig.score`: the stage, `csr vig score`.
- `csr.vig.train`: VIG-selective SFT through TRL's SFTTrainer (LoRA or full); `csr vig train`.
- `csr.vig.view`: a histogram of sample VIG and a per-token heat map (HTML or terminal); `csr vig view`.
- `csr.vig.reward`: VIG as a CSR reward term and a preference-pair filter.
"""

from csr.content_free import VIG_INPUTS as CONTENT_FREE  # noqa: F401
from csr.vig.logprobs import VIGOptions  # noqa: F401
from csr.vig.maths import (  # noqa: F401
    TAU_MODES,
    apply_token_masks,
    plan_records_selection,
    plan_selection,
    sample_vig,
    select_samples,
    selection_threshold,
    token_keep_mask,
    vig_from_logprobs,
)

__all__ = ["CONTENT_FREE", "TAU_MODES", "VIGOptions", "apply_token_masks", "plan_records_selection", "plan_selection",
           "sample_vig",
           "select_samples", "selection_threshold", "token_keep_mask", "vig_from_logprobs"]
