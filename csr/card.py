"""Model and dataset cards: the README.md of every merged model folder and of a pushed pairs dataset.

A model card says what the Hub and its readers look for: the base model, the round, the recipe
(copied beside the weights as `csr_config.yaml` and linked), the number of pairs, the round's eval
metrics, the license taken from the base's own card, how the model was made, and the citation. The
loop writes it after the merge and again after the round's eval; `csr push` uploads it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import yaml

from csr.io import atomic_write_text

log = logging.getLogger(__name__)

CONFIG_NAME = "csr_config.yaml"
CITATION = """@article{zhou2024calibrated,
  title={Calibrated Self-Rewarding Vision Language Models},
  author={Zhou, Yiyang and Fan, Zhiyuan and Cheng, Dongjie and Yang, Sihan and Chen, Zhaorun and Cui, Chenhang and Wang, Xiyao and Li, Yun and Zhang, Linjun and Yao, Huaxiu},
  journal={arXiv preprint arXiv:2405.14622},
  year={2024}
}"""


def front_matter(text: str) -> dict:
    """The YAML block between the leading '---' lines of a card ({} when none or unreadable)."""
    if not text.startswith("---"):
        return {}
    parts = text.split("---", 2)
    if len(parts) < 3:
        return {}
    try:
        data = yaml.safe_load(parts[1])
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def base_license(name_or_path: str) -> str | None:
    """The `license` of a model's card: its folder's README.md, or the Hub cache's copy of a hub id."""
    from csr.train.merge import source_folder

    folder = source_folder(name_or_path, patterns=["README.md"])
    card = folder / "README.md" if folder is not None else None
    if card is None or not card.is_file():
        return None
    value = front_matter(card.read_text(encoding="utf-8", errors="replace")).get("license")
    return str(value) if value else None


def _metric_rows(metrics: dict | None) -> list[str]:
    from csr.tracking import flatten

    flat = flatten({k: v for k, v in (metrics or {}).items() if k != "model"}, "").items()
    return [f"| {k.lstrip('/')} | {v:.4g} |" for k, v in flat]


def model_card(*, base_model: str, round_: int, policy: str, dtype: str, pairs: dict | None, train: dict | None,
               eval_metrics: dict | None, license: str | None, recipe: dict, config_file: str | None = CONFIG_NAME,
               tags: tuple[str, ...] = ()) -> str:
    """A model card's text (pure: every value passed in)."""
    meta = {"base_model": base_model, "library_name": "transformers", "pipeline_tag": "image-text-to-text",
            "tags": ["csr", "calibrated-self-rewarding", "dpo", "trl", "lora", *tags]}
    if license:
        meta["license"] = license
    gen, score, tr = recipe.get("generate", {}), recipe.get("score", {}), train or {}
    lora = tr.get("lora") or {}
    n_pairs = (pairs or {}).get("pairs")
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
             f"# {base_model} after {round_} round{'s' if round_ != 1 else ''} of Calibrated Self-Rewarding", "",
             f"Round {round_} of CSR (Zhou et al. 2024, arXiv 2405.14622) on `{base_model}`, trained from "
             f"`{policy}` and saved in {dtype}. Made with `csr`; the recipe is "
             + (f"[`{config_file}`]({config_file})." if config_file else "not recorded."), "",
             "## How it was made", "",
             f"1. Sentence-level beam search on the round's policy: {gen.get('num_candidates', '?')} candidate "
             f"sentences per node, {gen.get('sentence_beam_width', '?')} nodes kept per level.",
             f"2. Each sentence scored by the calibrated reward λ·CLIP + (1−λ)·self-reward, λ = "
             f"{score.get('reward_lambda', '?')} (CLIP: `{score.get('clip_model', '?')}`).",
             f"3. Per prompt, the best and the worst complete response as a chosen/rejected pair: "
             f"{n_pairs if n_pairs is not None else '?'} pairs"
             + (f", mean margin {pairs['margin_mean']:.3f}." if pairs and pairs.get("margin_mean") is not None else "."),
             f"4. LoRA DPO with TRL (r {lora.get('r', '?')}, alpha {lora.get('alpha', '?')}, learning rate "
             f"{tr.get('learning_rate', '?')}, beta {tr.get('beta', '?')}, {tr.get('steps', '?')} steps), the LoRA "
             f"merged into the weights.", ""]
    rows = _metric_rows(eval_metrics)
    lines += ["## Evaluation", ""]
    if rows:
        lines += ["Metrics of this round's model (`csr eval`):", "", "| metric | value |", "|---|---|", *rows, ""]
    else:
        lines += ["No eval set in the recipe (or not evaluated yet).", ""]
    lines += ["## Use", "", "```python", "from transformers import AutoModelForImageTextToText, AutoProcessor", "",
              'model = AutoModelForImageTextToText.from_pretrained("<this folder or repo>", dtype="auto")',
              'processor = AutoProcessor.from_pretrained("<this folder or repo>")', "```", "",
              f"License: {license or 'see the base model'}, as the base model's.", "",
              "## Citation", "", "```bibtex", CITATION, "```", ""]
    return "\n".join(lines)


def dataset_card(*, repo_id: str, base_model: str, policy: str, round_: int, pairs: dict | None,
                 data_file: str) -> str:
    """A dataset card for a round's pairs (TRL's conversational preference format, images embedded)."""
    meta = {"tags": ["csr", "dpo", "preference", "vision-language"], "task_categories": ["image-text-to-text"],
            "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": data_file}]}]}
    n = (pairs or {}).get("pairs", "?")
    return "\n".join([
        "---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
        f"# CSR preference pairs, round {round_}", "",
        f"{n} chosen/rejected pairs that Calibrated Self-Rewarding (arXiv 2405.14622) built from `{policy}` "
        f"(base `{base_model}`), one per prompt: the best and the worst response of a sentence-level beam "
        "search under the calibrated reward.", "",
        "Columns: `prompt`, `chosen`, `rejected` (TRL's conversational format), `images` (embedded), "
        "`chosen_score`, `rejected_score`, `margin` (path scores), `id`.", "",
        "```python", "from datasets import load_dataset", "",
        f'pairs = load_dataset("{repo_id}", split="train")', "```", "",
        "## Citation", "", "```bibtex", CITATION, "```", ""])


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def write_round_card(run_dir: str | Path, round_: int, folder: str | Path) -> Path:
    """The card of round `round_`'s model in `folder` (its merge or export folder), from the run's files."""
    run_dir, folder = Path(run_dir), Path(folder)
    rd = run_dir / f"round_{round_}"
    config = run_dir / "config.yaml"
    recipe = yaml.safe_load(config.read_text()) if config.is_file() else {}
    if config.is_file():
        atomic_write_text(folder / CONFIG_NAME, config.read_text())
    base_model = (recipe.get("model") or {}).get("model_name_or_path", "?")
    done = _read_json(folder / "DONE.json") or {}
    merge = _read_json(rd / "merge" / "DONE.json") or {}
    dtype = done.get("dtype", "?")
    text = model_card(base_model=base_model, round_=round_, policy=merge.get("policy", "?"), dtype=dtype,
                      pairs=_read_json(rd / "pairs" / "DONE.json"), train=_read_json(rd / "train" / "DONE.json"),
                      eval_metrics=_read_json(run_dir / "eval" / f"round_{round_}.json"),
                      license=base_license(base_model), recipe=recipe,
                      config_file=CONFIG_NAME if config.is_file() else None)
    atomic_write_text(folder / "README.md", text)
    return folder / "README.md"
