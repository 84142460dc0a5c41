"""Debiasing LVLMs (docs/method.md §2, Zhang et al. 2024).

- `csr.debias.calibration`: post-hoc calibration of closed-set answers (yes/no, option letters,
  custom labels) against content-free inputs (no image, `<unk>`, blank image, noise image; made in
  `csr.content_free`): the pure maths on label-probability tables.
- `csr.debias.label_probs`: the model glue: first-token label probabilities under the real and the
  content-free inputs, and the calibrated predictions.
- `csr.debias.closed_set`: POPE and multiple-choice files, their metrics before and after
  calibration, and `calibrate_file` (``csr debias calibrate``, ``csr eval --calibrate``).
- `csr.debias.sampling`: debias sampling, contrastive decoding against a content-free branch with
  its own KV cache (`debiased_generate`, `DebiasedCandidates` for the CSR generator).
- `csr.debias.study`: the decoding study (temperature, top-p, top-k, greedy, beam) with each
  metric's spread and a plot.
- `csr.debias.recipes`: the named settings, `toolkit` (default) and `authors` (the authors' code).
- `csr.debias.cli`: `csr debias calibrate | sample | study` (`--recipe`).

Submodules import torch / transformers; import them directly.
"""
