"""csr: Calibrated Self-Rewarding, debiasing and visual information gain for vision-language models.

The Python API, as the `csr` command uses it::

    from csr import load_config, run

    cfg = load_config("recipes/tiny/csr.yaml", ["run.rounds=1"])   # a recipe plus overrides, validated
    summary = run(cfg)                                              # the rounds, resumable; summary.json's dict
"""

__version__ = "0.1.0"
__all__ = ["load_config", "run", "__version__"]


def __getattr__(name):  # imported on first use: `import csr` stays light (no torch)
    if name == "load_config":
        from csr.config import load_config

        return load_config
    if name == "run":
        from csr.loop import run

        return run
    raise AttributeError(f"module 'csr' has no attribute {name!r}")
