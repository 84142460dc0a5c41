"""`csr view`: static HTML of a run's trees and pairs, checked as data and in a real headless browser."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from csr.cli import main as cli
from csr.io import StageInputMissing, mark_done, write_jsonl
from csr.view import marked_paths, page_name, write_view


def node(i, parent, depth, text, reward, final=False, pruned=False, dropped=None):
    return {"id": i, "parent": parent, "depth": depth, "text": text, "final": final,
            "final_reason": "eos" if final else None, "pruned": pruned, "clip": reward + 1.0,
            "self_reward": reward - 1.0, "reward": None if dropped else reward,
            **({"dropped": dropped} if dropped else {})}


def make_tree(tree_id="p/1 cat", image="red.png"):
    # paths (mean of rewards): 1-3 = 35, 1-4 = 30, 7-8 = 35 (same text as 1-3), 2-5 = 7.5, 2-(end) = 10;
    # 6 is dropped
    nodes = [{"id": 0, "parent": None, "depth": 0, "text": "", "final": False, "pruned": False},
             node(1, 0, 1, " A red square.", 40.0), node(2, 0, 1, " A cat.", 10.0),
             node(3, 1, 2, " It is big.", 30.0, final=True), node(4, 1, 2, " <b>bold</b></div>", 20.0, final=True),
             node(5, 2, 2, " A dog.", 5.0, final=True), node(6, 2, 2, "", 0.0, final=True, dropped="short_sentence"),
             node(7, 0, 1, " A red square.", 40.0), node(8, 7, 2, " It is big.", 30.0, final=True),
             node(9, 7, 2, " Pruned here.", 1.0, pruned=True),
             {**node(10, 2, 2, "", 0.0, final=True), "reward": None}]  # an EOS alone: the response ends at 2
    return {"id": tree_id, "image": image, "prompt": "Describe <this> image.", "nodes": nodes}


def pair_record(tree_id, chosen, rejected, cs, rs):
    return {"id": tree_id, "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": chosen}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": rejected}]}],
            "images": ["red.png"], "chosen_score": cs, "rejected_score": rs, "margin": cs - rs}


def test_marked_paths_find_the_pair_in_the_tree():
    nodes = make_tree()["nodes"]
    pair = {"chosen": "A red square. It is big.", "rejected": "A cat. A dog.", "chosen_score": 35.0,
            "rejected_score": 7.5}
    # the chosen text is on two paths with the same score: the first is the chosen (pairs' tie rule)
    assert marked_paths(nodes, pair) == ([1, 3], [2, 5])
    # a rejected that is the 1-4 path (text with markup), told apart from others by its text
    assert marked_paths(nodes, {**pair, "rejected": "A red square. <b>bold</b></div>", "rejected_score": 30.0}) \
        == ([1, 3], [1, 4])
    # the same text as chosen and as rejected: first path chosen, last rejected
    same = {**pair, "rejected": "A red square. It is big.", "rejected_score": 35.0}
    assert marked_paths(nodes, same) == ([1, 3], [7, 8])
    # a path ended by an EOS alone: its response is the sentences before it
    assert marked_paths(nodes, {**pair, "rejected": "A cat.", "rejected_score": 10.0}) == ([1, 3], [2, 10])
    assert marked_paths(nodes, None) == ([], [])
    assert marked_paths(nodes, {**pair, "chosen": "not in the tree"})[0] == []


def test_page_names_are_safe_and_distinct():
    assert page_name("prompt-000001") == "prompt-000001.html"
    assert page_name(123) == "123.html"
    a, b = page_name("a/b"), page_name("a_b")
    assert a != b and "/" not in a and a.startswith("a_b-") and b == "a_b.html"
    assert not page_name("../x").startswith(".") and "/" not in page_name("../x")


def make_run(root: Path, rounds=2, n_trees=3) -> Path:
    """A run folder with finished score and pairs stages (no model needed)."""
    run = root / "run"
    (root / "red.png").write_bytes(b"not really a png")
    for r in range(1, rounds + 1):
        trees = [make_tree(f"p{i}", str(root / "red.png")) for i in range(n_trees)]
        write_jsonl(run / f"round_{r}" / "score" / "scored.jsonl", trees)
        mark_done(run / f"round_{r}" / "score", {"stage": "score"})
        # round r: prompt i's margin = 27.5 - i - r, all but the last prompt have a pair
        pairs = [pair_record(f"p{i}", "A red square. It is big.", "A cat. A dog.", 35.0 - i - r, 7.5)
                 for i in range(n_trees - 1)]
        write_jsonl(run / f"round_{r}" / "pairs" / "pairs.jsonl", pairs)
        mark_done(run / f"round_{r}" / "pairs", {"stage": "pairs"})
    return run


def test_view_files_rows_and_links(tmp_path):
    run = make_run(tmp_path)
    index = write_view(run)
    view = run / "view"
    assert index == view / "index.html"
    assert sorted(p.name for p in (view / "round_1").iterdir()) == ["p0.html", "p1.html", "p2.html"]
    rows = json.loads(re.search(r"=(\[.*\]);", (view / "data" / "round_2.js").read_text()).group(1))
    assert [(r["id"], r["margin"]) for r in rows] == [("p0", 25.5), ("p1", 24.5), ("p2", None)]
    assert rows[0]["nodes"] == 11 and rows[0]["page"] == "p0.html"

    page = (view / "round_2" / "p1.html").read_text()
    assert '<a href="../round_1/p1.html">round 1</a>' in page  # the same prompt in the other round
    assert 'src="../../../red.png"' in page  # the image, relative to the page (run/view/round_2/)
    assert "&lt;b&gt;bold&lt;/b&gt;&lt;/div&gt;" in page and "<b>bold</b></div>" not in page
    assert page.count('class="node') == 11
    assert re.findall(r'class="node [^"]*chosen[^"]*" id="n(\d+)"', page) == ["1", "3"]
    assert re.findall(r'class="node [^"]*rejected[^"]*" id="n(\d+)"', page) == ["2", "5"]
    assert "No pair from this tree" in (view / "round_1" / "p2.html").read_text()

    # one round only: its pages, and the index offers that round alone
    only = write_view(run, tmp_path / "v1", round_=1)
    assert not (tmp_path / "v1" / "round_2").exists() and "ROUNDS=[1]" in only.read_text().replace(" ", "")


def test_view_refuses_a_run_without_a_finished_score_stage(tmp_path, capsys):
    run = make_run(tmp_path, rounds=1)
    with pytest.raises(StageInputMissing, match="round 2 .*score"):
        write_view(run, round_=2)
    empty = tmp_path / "empty"
    (empty / "round_1" / "generate").mkdir(parents=True)
    assert cli(["view", "--run", str(empty)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'score' stage" in err


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("no chromium on this machine (apt-get install chromium); the browser test needs one")


def browse(tmp_path, url, *args):
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=5000", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.slow  # a headless browser: ~6-7 s
def test_view_in_a_headless_browser(tmp_path):
    run = make_run(tmp_path, rounds=2, n_trees=130)  # two index pages of 100
    write_view(run)
    page = run / "view" / "round_2" / "p7.html"
    dom = browse(tmp_path, page.as_uri(), "--dump-dom").stdout
    assert dom.count('class="node') == len(make_tree()["nodes"])  # every node rendered, markup escaped
    assert 'data-nodes="11"' in dom

    # the index is built by its script from data/round_N.js: sorted by margin, ascending, page 2
    index = (run / "view" / "index.html").as_uri()
    dom = browse(tmp_path, index + "#round=1&sort=margin&dir=asc&page=1", "--dump-dom").stdout
    ids = re.findall(r'<tr class="row"><td class="id"><a href="round_1/(p\d+)\.html"', dom)
    # round 1's margins are 26.5 - i: ascending is p128 first; p129 has no pair and sorts last
    assert len(ids) == 100 and ids[:3] == ["p128", "p127", "p126"]
    assert "130 prompts · page 1 of 2" in dom
    dom = browse(tmp_path, index + "#round=2&sort=margin&dir=asc&page=2", "--dump-dom").stdout
    ids = re.findall(r'<tr class="row"><td class="id"><a href="round_2/(p\d+)\.html"', dom)
    assert ids[-1] == "p129" and len(ids) == 30

    shot = tmp_path / "tree.png"
    browse(tmp_path, page.as_uri(), f"--screenshot={shot}", "--window-size=1200,900")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


def test_a_prompt_page_shows_its_yes_no_questions_and_the_chosen_answers(tmp_path):
    run = make_run(tmp_path, rounds=1)
    stage = run / "round_1" / "yesno"

    def question(tree_id, obj, source, clip, q_yes, kept, why=None):
        # λ = 0.9, reference 20: R(yes) = 0.9·(clip − 20) + 0.1·100·q_yes, R(no) mirrors it
        v = clip - 20.0
        return {"id": tree_id, "object": obj, "source": source, "question": f"Is there a {obj} in the image?",
                "clip": clip, "reference": 20.0, "p_yes": 0.7, "q_yes": q_yes, "reward_yes": 0.9 * v + 10 * q_yes,
                "reward_no": -0.9 * v + 10 * (1 - q_yes), "kept": kept, "why_not": why}

    write_jsonl(stage / "questions.jsonl", [
        question("p0", "square", "named", 30.0, 0.6, True),          # R 15 against −5: yes
        question("p0", "<dog>", "prior", 15.0, 0.6, True),            # R 1.5 against 8.5: no
        question("p0", "cat", "named", 20.0, 0.52, False, "below_margin")])  # R 5.2 against 4.8
    mark_done(stage, {"stage": "yesno"})
    write_view(run)
    page = (run / "view" / "round_1" / "p0.html").read_text()
    rows = re.findall(r"<tr><td>(Is there a [^<]*)</td><td>(\w+)</td>.*?<td>(.*?)</td></tr>", page)
    assert rows == [("Is there a square in the image?", "named", "<b>yes</b>"),
                    ("Is there a &lt;dog&gt; in the image?", "prior", "<b>no</b>"),
                    ("Is there a cat in the image?", "named", 'yes <span class="legend">(below_margin)</span>')]
    assert "Yes/no questions" not in (run / "view" / "round_1" / "p1.html").read_text()  # asked nothing there
