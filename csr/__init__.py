"""csr: Calibrated Self-Rewarding, debiasing and visual information gain for vision-language models."""

__version__ = "0.1.0"
