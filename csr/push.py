"""`csr push`: a round's model (and, with --pairs, its pairs) to the Hugging Face Hub.

    csr push --run data/runs/x --repo-id ORG/NAME                 # the last finished round's model
    csr push --run data/runs/x --round 2 --repo-id ORG/NAME --pairs   # + round 2's pairs as a dataset
    csr push ... --dry-run                                        # print what would be uploaded

The model is the round's export in the recipe's dtype (`round_N/export`), or its merged folder when
no export was written, with its model card (README.md) and recipe (csr_config.yaml). The pairs go to
a dataset repo of the same name (`--dataset-repo-id` for another): `data/train-00000-of-00001.parquet`
(TRL's conversational format, images embedded) and a dataset card, staged in `round_N/pairs/hub/`.
The repo id and the token are checked before anything is uploaded.
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from csr.config import ConfigError
from csr.io import StageInputMissing, atomic_write_text, is_done, read_done

log = logging.getLogger(__name__)

DATA_FILE = "data/train-00000-of-00001.parquet"
SKIP = ("DONE.json",)


@dataclass
class Upload:
    repo_id: str
    repo_type: str          # model or dataset
    folder: Path
    files: list[str] = field(default_factory=list)  # paths relative to folder, the only ones uploaded

    def describe(self) -> str:
        return f"{self.repo_type} {self.repo_id} <- {self.folder}: " + ", ".join(self.files)


def check_repo_id(repo_id: str, flag: str = "--repo-id") -> str:
    """ORG/NAME as the Hub accepts it; refused with the rule otherwise."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not re.fullmatch(r"[^/\s]+/[^/\s]+", repo_id or ""):
        raise ConfigError(f"{flag} {repo_id!r} must be ORG/NAME (your user or organisation, a slash, the repo name).")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ConfigError(f"{flag} {repo_id!r} is not a valid Hub repo id: {e}") from None
    return repo_id


def check_token() -> str:
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise ConfigError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write "
                          "access), then rerun `csr push`.")
    return token


def last_round(run_dir: Path) -> int:
    rounds = sorted(int(m.group(1)) for p in run_dir.glob("round_*")
                    if (m := re.fullmatch(r"round_(\d+)", p.name)) and is_done(p / "merge"))
    if not rounds:
        raise StageInputMissing(f"{run_dir} has no round with a finished merge stage (round_N/merge/DONE.json): "
                                f"run the 'merge' stage first (`csr run` resumes the run).")
    return rounds[-1]


def model_folder(run_dir: Path, round_: int) -> Path:
    """A round's model as others load it: its export, else its merged folder."""
    rd = run_dir / f"round_{round_}"
    for folder in (rd / "export", rd / "merge"):
        if is_done(folder):
            return folder
    raise StageInputMissing(f"round {round_} of {run_dir} has no finished merge stage ({rd / 'merge'}/DONE.json): "
                            f"run the 'merge' stage first (`csr run` resumes the run).")


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and p.name not in SKIP and not any(part.startswith(".") for part in p.parts))


def stage_pairs(run_dir: Path, round_: int, repo_id: str) -> Path:
    """round_N/pairs/hub/: the pairs parquet where the Hub looks for a train split, and the dataset card."""
    from csr.card import dataset_card

    pairs_dir = run_dir / f"round_{round_}" / "pairs"
    if not is_done(pairs_dir) or not (pairs_dir / "pairs.parquet").is_file():
        raise StageInputMissing(f"round {round_} of {run_dir} has no finished pairs stage with pairs.parquet "
                                f"({pairs_dir}): run the 'pairs' stage first.")
    hub = pairs_dir / "hub"
    (hub / DATA_FILE).parent.mkdir(parents=True, exist_ok=True)
    tmp = hub / (DATA_FILE + ".tmp")
    shutil.copyfile(pairs_dir / "pairs.parquet", tmp)
    tmp.replace(hub / DATA_FILE)
    merge = read_done(run_dir / f"round_{round_}" / "merge") if is_done(run_dir / f"round_{round_}" / "merge") else {}
    import yaml

    recipe = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    base = (recipe.get("model") or {}).get("model_name_or_path", "?")
    atomic_write_text(hub / "README.md", dataset_card(repo_id=repo_id, base_model=base,
                                                      policy=merge.get("policy", base), round_=round_,
                                                      pairs=read_done(pairs_dir), data_file=DATA_FILE))
    return hub


def plan(run_dir: str | Path, repo_id: str, round_: int | None = None, pairs: bool = False,
         dataset_repo_id: str | None = None) -> list[Upload]:
    """What `csr push` uploads: checked repo ids, the model folder (with its card), the staged pairs."""
    from csr.card import write_round_card

    run_dir = Path(run_dir)
    check_repo_id(repo_id)
    if dataset_repo_id:
        check_repo_id(dataset_repo_id, "--dataset-repo-id")
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder '{run_dir}' does not exist.")
    round_ = last_round(run_dir) if round_ is None else round_
    folder = model_folder(run_dir, round_)
    if not (folder / "README.md").is_file():  # a folder from before cards, or a merge run alone
        write_round_card(run_dir, round_, folder)
    uploads = [Upload(repo_id, "model", folder, _files(folder))]
    if pairs:
        hub = stage_pairs(run_dir, round_, dataset_repo_id or repo_id)
        uploads.append(Upload(dataset_repo_id or repo_id, "dataset", hub, ["README.md", DATA_FILE]))
    return uploads


def push(uploads: list[Upload], *, private: bool = False, token: str | None = None, api=None) -> list[str]:
    """Create the repos (if missing) and upload; returns their URLs."""
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    urls = []
    for u in uploads:
        url = api.create_repo(u.repo_id, repo_type=u.repo_type, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(u.folder), repo_id=u.repo_id, repo_type=u.repo_type,
                          allow_patterns=u.files, commit_message=f"csr push: {u.folder.parent.name}/{u.folder.name}")
        log.info("pushed %s", u.describe())
        urls.append(str(url))
    return urls


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="csr push", description="Upload a round's model (and pairs) to the Hugging "
                                "Face Hub, with model and dataset cards.")
    p.add_argument("--run", required=True, help="Run folder (run.output_dir).")
    p.add_argument("--round", type=int, help="Round to push (default: the last with a finished merge).")
    p.add_argument("--repo-id", required=True, help="Model repo, ORG/NAME.")
    p.add_argument("--pairs", action="store_true", help="Also push the round's pairs as a parquet dataset.")
    p.add_argument("--dataset-repo-id", help="Dataset repo for --pairs (default: the same ORG/NAME as a dataset).")
    p.add_argument("--private", action="store_true", help="Create the repos private.")
    p.add_argument("--dry-run", action="store_true", help="Print what would be uploaded; upload nothing.")
    args = p.parse_args(argv)
    check_repo_id(args.repo_id)
    token = None if args.dry_run else check_token()  # before any staging or upload
    uploads = plan(args.run, args.repo_id, args.round, args.pairs, args.dataset_repo_id)
    for u in uploads:
        print(("would upload " if args.dry_run else "uploading ") + u.describe())
    if args.dry_run:
        return 0
    for url in push(uploads, private=args.private, token=token):
        print(url)
    return 0
