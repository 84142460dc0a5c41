"""`csr push`: what would be uploaded (files, cards), checked without network; bad input refused first."""

import pytest
import yaml
from PIL import Image

from csr.card import front_matter
from csr.cli import main as cli
from csr.config import ConfigError
from csr.export import export_pairs_parquet
from csr.io import mark_done, write_jsonl
from csr.push import DATA_FILE, plan, push


def make_run(tmp_path, export=True):
    run = tmp_path / "run"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"model_name_or_path": "base/model"}}))
    Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "red.png")
    for r in (1, 2):
        rd = run / f"round_{r}"
        pair = {"id": "a", "prompt": [{"role": "user", "content": [{"type": "text", "text": "Describe."}]}],
                "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "A red square."}]}],
                "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}],
                "images": [str(tmp_path / "red.png")], "chosen_score": 3.0, "rejected_score": 1.0, "margin": 2.0}
        write_jsonl(rd / "pairs" / "pairs.jsonl", [pair])
        export_pairs_parquet([pair], rd / "pairs" / "pairs.parquet")
        mark_done(rd / "pairs", {"pairs": 1, "margin_mean": 2.0})
        folders = ("merge", "export") if export else ("merge",)
        for name in folders:
            (rd / name).mkdir()
            for f in ("config.json", "model.safetensors", "tokenizer.json"):
                (rd / name / f).write_text(f"{name} {f}")
            (rd / name / ".hidden").write_text("x")
            mark_done(rd / name, {"dtype": "bfloat16" if name == "export" else "float32", "policy": "base/model"})
    return run


class FakeApi:
    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw["repo_type"]))
        return f"https://hub/{kw['repo_type']}/{repo_id}"

    def upload_folder(self, **kw):
        self.calls.append(("upload_folder", kw["repo_id"], kw["repo_type"], kw["folder_path"], sorted(kw["allow_patterns"])))


def test_plan_uploads_the_export_with_its_card_and_the_pairs_as_a_dataset(tmp_path):
    run = make_run(tmp_path)
    model, dataset = plan(run, "me/csr-r2", pairs=True)
    assert model.folder == run / "round_2" / "export" and model.repo_type == "model"  # the last round, recipe dtype
    assert model.files == ["README.md", "config.json", "csr_config.yaml", "model.safetensors", "tokenizer.json"]
    card = (model.folder / "README.md").read_text()
    assert front_matter(card)["base_model"] == "base/model" and "saved in bfloat16" in card

    assert (dataset.repo_id, dataset.repo_type, dataset.files) == ("me/csr-r2", "dataset", ["README.md", DATA_FILE])
    import datasets

    rows = datasets.load_dataset("parquet", data_files=str(dataset.folder / DATA_FILE), split="train")
    assert rows[0]["chosen"][0]["content"][0]["text"] == "A red square." and rows[0]["images"][0].size == (8, 8)
    dcard = (dataset.folder / "README.md").read_text()
    assert front_matter(dcard)["configs"][0]["data_files"][0]["path"] == DATA_FILE
    assert 'load_dataset("me/csr-r2"' in dcard

    api = FakeApi()
    urls = push([model, dataset], api=api)
    assert urls == ["https://hub/model/me/csr-r2", "https://hub/dataset/me/csr-r2"]
    assert api.calls[1] == ("upload_folder", "me/csr-r2", "model", str(model.folder), model.files)
    assert api.calls[3][:3] == ("upload_folder", "me/csr-r2", "dataset")

    # a round without an export pushes its merged (float32) folder; no --pairs, no dataset
    (only,) = plan(make_run(tmp_path / "b", export=False), "me/x", round_=1)
    assert only.folder.name == "merge" and "DONE.json" not in only.files


@pytest.mark.parametrize("repo_id", ["no-slash", "a/b/c", "me/bad name", "me/-x-"])
def test_a_malformed_repo_id_is_refused_before_anything(tmp_path, repo_id, monkeypatch, capsys):
    run = make_run(tmp_path)
    capsys.readouterr()  # the parquet export's progress bars
    with pytest.raises(ConfigError, match="--repo-id"):
        plan(run, repo_id, pairs=True)
    assert not (run / "round_2" / "pairs" / "hub").exists()
    monkeypatch.setattr("huggingface_hub.HfApi", None)  # any upload attempt would fail loudly
    assert cli(["push", "--run", str(run), "--repo-id", repo_id]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_push_without_a_token_stops_before_any_upload(tmp_path, monkeypatch, capsys):
    run = make_run(tmp_path)
    capsys.readouterr()
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no stored token either
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    monkeypatch.setattr("huggingface_hub.HfApi", None)
    assert cli(["push", "--run", str(run), "--repo-id", "me/x", "--pairs"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "HF_TOKEN" in err
    assert not (run / "round_2" / "pairs" / "hub").exists()
    # --dry-run needs no token and uploads nothing
    assert cli(["push", "--run", str(run), "--repo-id", "me/x", "--pairs", "--dry-run"]) == 0
    assert "would upload model me/x" in capsys.readouterr().out
