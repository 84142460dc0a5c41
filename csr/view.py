"""`csr view`: static HTML pages that show what CSR did to each prompt of a run.

    <run>/view/index.html          the prompts of a round: margin, chosen / rejected preview; sortable,
                                   searchable, 100 rows a page, a round selector
    <run>/view/data/round_N.js     the index rows of round N (loaded by index.html with a <script> tag)
    <run>/view/round_N/<id>.html   one prompt in round N: the image, the sentence tree level by level
                                   (text, self-reward, CLIP, calibrated reward, pruned / final / dropped),
                                   the chosen and the rejected path marked, and the prompt's pair in
                                   every round with links to its tree there

Everything opens from disk (file://) with no server: pages hold their data, the index loads its
rows through <script> tags (which browsers allow from disk, unlike fetch). One file per prompt and
a paged index keep a 13k-prompt run usable. Images are linked by their path relative to the page,
so the view works while the run folder and the images stay where they were (or move together).

The trees are read from round_N/score/scored.jsonl, one at a time; the pairs from
round_N/pairs/pairs.jsonl. Which path became the chosen and which the rejected is found again by
matching the pair's texts and scores to the tree's paths.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import logging
import os
import re
from pathlib import Path

from csr.data import message_text
from csr.io import StageInputMissing, atomic_write_text, is_done, iter_jsonl

log = logging.getLogger(__name__)

VIEW_DIR = "view"
PREVIEW_CHARS = 160


# ---------------------------------------------------------------------------------------------
# Reading the run
# ---------------------------------------------------------------------------------------------


def scored_rounds(run_dir: Path, only: int | None = None) -> list[int]:
    """Rounds whose score stage is finished (only `only` when given); refused when there is none."""
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder '{run_dir}' does not exist.")
    if only is not None:
        stage = run_dir / f"round_{only}" / "score"
        if not is_done(stage):
            raise StageInputMissing(f"round {only} of {run_dir} has no finished score stage ({stage}/DONE.json): "
                                    f"run the 'score' stage of round {only} first (`csr run` resumes it).")
        return [only]
    rounds = sorted(int(m.group(1)) for p in run_dir.glob("round_*")
                    if (m := re.fullmatch(r"round_(\d+)", p.name)) and is_done(p / "score"))
    if not rounds:
        raise StageInputMissing(f"{run_dir} has no round with a finished score stage (round_N/score/DONE.json): "
                                f"run the 'score' stage first (`csr run` resumes the run).")
    return rounds


def _path_score_kind(run_dir: Path) -> str:
    """The run's pairs.path_score, to tell apart paths with the same text (mean when unreadable)."""
    import yaml

    try:
        raw = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        return str((raw.get("pairs") or {}).get("path_score") or "mean")
    except (OSError, yaml.YAMLError):
        return "mean"


def read_pairs(run_dir: Path, rounds: list[int]) -> dict[int, dict[str, dict]]:
    """{round: {prompt id: pair}} from every round's finished pairs stage (empty for a round without)."""
    out: dict[int, dict[str, dict]] = {}
    for r in rounds:
        stage = run_dir / f"round_{r}" / "pairs"
        out[r] = {}
        if is_done(stage) and (stage / "pairs.jsonl").is_file():
            for p in iter_jsonl(stage / "pairs.jsonl"):
                out[r][str(p["id"])] = {
                    "chosen": message_text(p["chosen"]), "rejected": message_text(p["rejected"]),
                    "chosen_score": p.get("chosen_score"), "rejected_score": p.get("rejected_score"),
                    "margin": p.get("margin")}
    return out


def marked_paths(nodes: list[dict], pair: dict | None, path_score_kind: str = "mean") -> tuple[list[int], list[int]]:
    """Node ids of the chosen and of the rejected path of `pair` in this tree ([] when not found).

    The paths are the tree's root-to-final paths through nodes that were not dropped (a final EOS
    alone, with no text and no reward, ends its path without adding a sentence); the chosen is the
    first whose text and score equal the pair's chosen, the rejected the last (pairs' tie rule). The
    ids include such an end node.
    """
    from csr.tree_format import final_paths, join_sentences
    from csr.score.reward import path_score

    if pair is None:
        return [], []
    keep = {n["id"] for n in nodes[1:] if not n.get("dropped")}
    paths = []
    for ids in final_paths(nodes, keep):
        last = nodes[ids[-1]]
        # an EOS alone that ends a path holds no sentence and no reward: the response is the path before it
        sentences = ids[:-1] if (last.get("reward") is None and not last["text"].strip()) else ids
        if not sentences or any(nodes[i].get("reward") is None for i in sentences):
            continue
        text = join_sentences([nodes[i]["text"] for i in sentences])
        paths.append((ids, text, path_score([nodes[i]["reward"] for i in sentences], path_score_kind)))

    def best(text: str, score, candidates) -> list[int]:
        same = [(ids, s) for ids, t, s in candidates if t == text]
        if not same:
            return []
        if score is None:
            return same[0][0]
        closest = min(abs(s - score) for _, s in same)
        return next(ids for ids, s in same if abs(s - score) == closest)

    chosen = best(pair["chosen"], pair.get("chosen_score"), paths)
    rejected = best(pair["rejected"], pair.get("rejected_score"), list(reversed(paths)))
    return chosen, rejected


# ---------------------------------------------------------------------------------------------
# Pages (pure: data in, HTML out)
# ---------------------------------------------------------------------------------------------


def page_name(tree_id) -> str:
    """A file name for a prompt id: the id where it is safe, else a cleaned id plus a short hash."""
    text = str(tree_id)
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:80].lstrip(".") or "_"
    if safe != text:
        safe += "-" + hashlib.sha1(text.encode()).hexdigest()[:8]
    return safe + ".html"


def _num(v, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _e(text) -> str:
    return html.escape(str(text), quote=True)


CSS = """
body{font-family:system-ui,sans-serif;margin:1.2em 2em;color:#222;font-size:14px}
a{color:#1f5fa8}h1{font-size:1.35em;margin:.2em 0}h2{font-size:1.1em;margin:1.2em 0 .4em}
table{border-collapse:collapse}td,th{border-bottom:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f3;cursor:pointer;white-space:nowrap}.id{white-space:nowrap}.num{text-align:right;font-variant-numeric:tabular-nums}
.top{display:flex;gap:1.5em;align-items:flex-start}.top img{width:260px;height:auto;border:1px solid #ccc;image-rendering:pixelated}
.resp{white-space:pre-wrap;max-width:60em;padding:4px 8px;margin:4px 0;border-left:4px solid}
.resp.chosen{border-color:#2a9d4b;background:#eefaf1}.resp.rejected{border-color:#d0453b;background:#fdf0ef}
.level{margin:.6em 0 1em}.groups{display:flex;flex-wrap:wrap;gap:10px}
.group{border:1px dashed #bbb;border-radius:6px;padding:5px;background:#fafafa}
.gh{color:#666;font-size:12px;margin-bottom:3px}
.node{border:1px solid #ccc;border-radius:5px;padding:4px 6px;margin:3px 0;width:17em;background:#fff}
.node .t{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:12.5px}
.node .m{color:#555;font-size:12px;margin-top:2px}.node.pruned{opacity:.55}.node.dropped{opacity:.4;text-decoration:line-through}
.node.chosen{border:2px solid #2a9d4b;background:#eefaf1}.node.rejected{border:2px solid #d0453b;background:#fdf0ef}
.node.chosen.rejected{background:linear-gradient(90deg,#eefaf1,#fdf0ef)}.node.root{width:auto}
.node.hl{outline:3px solid #f0b400}
.b{display:inline-block;font-size:11px;border-radius:3px;padding:0 4px;margin-right:3px;background:#e5e5e5}
.b.final{background:#dbe8fb}.b.chosen{background:#2a9d4b;color:#fff}.b.rejected{background:#d0453b;color:#fff}
.b.pruned{background:#eee;color:#777}.b.dropped{background:#777;color:#fff}
.legend{color:#555;font-size:12.5px}.pager{margin:.6em 0}.pager button{margin-right:4px}
"""

_PAGE_JS = """
document.querySelectorAll('.node').forEach(function(el){el.addEventListener('click',function(){
  document.querySelectorAll('.node.hl').forEach(function(x){x.classList.remove('hl')});
  var id=el.dataset.id;while(id!==undefined&&id!==''){var n=document.getElementById('n'+id);if(!n)break;
  n.classList.add('hl');id=n.dataset.parent;}});});
"""


def _node_html(node: dict, chosen: set[int], rejected: set[int]) -> str:
    nid = node["id"]
    classes, badges = ["node"], []
    if node.get("parent") is None:
        classes.append("root")
        return (f'<div class="node root" id="n{nid}" data-id="{nid}" data-parent="">'
                f'<div class="t">(root: the prompt)</div></div>')
    for name, on in (("chosen", nid in chosen), ("rejected", nid in rejected)):
        if on:
            classes.append(name)
            badges.append(f'<span class="b {name}">{name}</span>')
    if node.get("final"):
        classes.append("final")
        badges.append(f'<span class="b final">final: {_e(node.get("final_reason") or "")}</span>')
    if node.get("pruned"):
        classes.append("pruned")
        badges.append('<span class="b pruned">pruned</span>')
    if node.get("dropped"):
        classes.append("dropped")
        badges.append(f'<span class="b dropped">dropped: {_e(node["dropped"])}</span>')
    text, metrics = _e(node.get("text", "")), (f'R {_num(node.get("reward"))} · self {_num(node.get("self_reward"))} · '
                                               f'CLIP {_num(node.get("clip"))}')
    if node.get("final") and node.get("reward") is None and not node.get("dropped") and not node["text"].strip():
        text, metrics = "", "EOS alone: the response ends before it (no sentence, no reward)"
    return (f'<div class="{" ".join(classes)}" id="n{nid}" data-id="{nid}" data-parent="{node["parent"]}">'
            f'<div><span class="b">#{nid}</span>{"".join(badges)}</div>'
            f'<div class="t">{text}</div><div class="m">{metrics}</div></div>')


def tree_html(nodes: list[dict], chosen: list[int], rejected: list[int]) -> str:
    """The tree level by level; within a level, siblings grouped under their parent."""
    chosen_set, rejected_set = set(chosen), set(rejected)
    levels: dict[int, dict[int, list[dict]]] = {}
    for n in nodes[1:]:
        levels.setdefault(n["depth"], {}).setdefault(n["parent"], []).append(n)
    out = [f'<section class="level"><h2>Level 0</h2>{_node_html(nodes[0], chosen_set, rejected_set)}</section>']
    for depth in sorted(levels):
        groups = []
        for parent, children in levels[depth].items():
            body = "".join(_node_html(c, chosen_set, rejected_set) for c in children)
            groups.append(f'<div class="group"><div class="gh">from #{parent}</div>{body}</div>')
        count = sum(len(c) for c in levels[depth].values())
        out.append(f'<section class="level"><h2>Level {depth} <span class="legend">({count} sentences)</span>'
                   f'</h2><div class="groups">{"".join(groups)}</div></section>')
    return "\n".join(out)


def read_questions(run_dir: Path, round_: int) -> dict[str, list[dict]]:
    """The yes/no stage's questions of a round by tree id (`round_N/yesno/questions.jsonl`); {} without it."""
    f = run_dir / f"round_{round_}" / "yesno" / "questions.jsonl"
    out: dict[str, list[dict]] = {}
    if is_done(f.parent) and f.is_file():
        for q in iter_jsonl(f):
            out.setdefault(str(q["id"]), []).append(q)
    return out


def questions_html(questions: list[dict]) -> str:
    """The yes/no questions asked about this prompt's image (csr.yesno): the reward's parts and its choice."""
    if not questions:
        return ""
    rows = ['<table><tr><th>question</th><th>from</th><th>CLIP − reference</th><th>p(yes) raw → calibrated</th>'
            '<th>R(yes)</th><th>R(no)</th><th>chosen</th></tr>']
    for q in questions:
        answer = "yes" if q["reward_yes"] >= q["reward_no"] else "no"
        kept = f"<b>{answer}</b>" if q.get("kept") else f'{answer} <span class="legend">({_e(q.get("why_not"))})</span>'
        rows.append(f'<tr><td>{_e(q["question"])}</td><td>{_e(q["source"])}</td>'
                    f'<td class="num" title="{_e(q.get("evidence", ""))}">{_num(q["clip"] - q["reference"])}</td>'
                    f'<td class="num">{_num(q["p_yes"])} → {_num(q["q_yes"])}</td>'
                    f'<td class="num">{_num(q["reward_yes"])}</td><td class="num">{_num(q["reward_no"])}</td>'
                    f'<td>{kept}</td></tr>')
    rows.append("</table>")
    return ('<h2>Yes/no questions (yesno stage)</h2><div class="legend">About the objects its sentences name ("named") '
            'and those it names without the image ("prior"); R = λ·(CLIP − reference) + (1−λ)·100·calibrated '
            'p, the higher answer chosen when the gap reaches the margin.</div>' + "".join(rows))


def prompt_page(tree: dict, round_: int, pairs_by_round: dict[int, dict | None], tree_rounds: list[int],
                image_src: str, path_score_kind: str = "mean", questions: list[dict] | None = None) -> str:
    """One prompt in one round: the pair, the prompt's pairs across rounds, the yes/no questions, the tree."""
    nodes = tree["nodes"]
    pair = pairs_by_round.get(round_)
    chosen, rejected = marked_paths(nodes, pair, path_score_kind)
    name = page_name(tree["id"])
    if pair is not None:
        head = (f'<div class="legend">chosen {_num(pair.get("chosen_score"))} − rejected '
                f'{_num(pair.get("rejected_score"))} = margin <b>{_num(pair.get("margin"))}</b></div>'
                f'<div class="resp chosen">{_e(pair["chosen"])}</div><div class="resp rejected">{_e(pair["rejected"])}</div>')
        if not chosen or not rejected:
            head += '<div class="legend">(a path of this pair was not found in the tree)</div>'
    else:
        head = '<div class="legend">No pair from this tree in this round (skipped by the pairs stage, or not run).</div>'
    across = ['<table><tr><th>round</th><th>margin</th><th>chosen</th><th>rejected</th></tr>']
    for r in sorted(pairs_by_round):
        p = pairs_by_round[r]
        label = f"<b>round {r}</b>" if r == round_ else (
            f'<a href="../round_{r}/{name}">round {r}</a>' if r in tree_rounds else f"round {r}")
        if p is None:
            across.append(f'<tr><td class="id">{label}</td><td>–</td><td colspan=2>no pair</td></tr>')
        else:
            across.append(f'<tr><td class="id">{label}</td><td class="num">{_num(p.get("margin"))}</td>'
                          f'<td>{_e(p["chosen"][:PREVIEW_CHARS])}</td><td>{_e(p["rejected"][:PREVIEW_CHARS])}</td></tr>')
    across.append("</table>")
    n_final = sum(1 for n in nodes[1:] if n.get("final"))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{_e(tree['id'])} · round {round_}</title><style>{CSS}</style></head>
<body><a href="../index.html#round={round_}">← all prompts</a>
<div class="top"><img src="{_e(image_src)}" alt="{_e(tree.get('image', ''))}">
<div><h1>{_e(tree['id'])} · round {round_}</h1>
<div><b>Prompt:</b> {_e(tree.get('prompt', ''))}</div>
<div class="legend">{len(nodes)} nodes (root included), {n_final} final; image {_e(tree.get('image', ''))}</div>
{head}</div></div>
<h2>This prompt across rounds</h2>{''.join(across)}
{questions_html(questions or [])}
<h2>The sentence tree</h2>
<div class="legend">Each box is a sentence: R is the calibrated reward, self the self-reward, CLIP 100·cos
(before clamping). Green: the chosen path; red: the rejected one; faded: pruned; struck through: dropped by
cleaning. Click a sentence to light up its path.</div>
<div id="tree" data-nodes="{len(nodes)}">{tree_html(nodes, chosen, rejected)}</div>
<script>{_PAGE_JS}</script></body></html>
"""


_INDEX_JS = r"""
var V=window.CSR_VIEW={rounds:{}},ROUNDS=__ROUNDS__,PAGE=__PAGE__;
var state={round:ROUNDS[ROUNDS.length-1],sort:'margin',dir:'desc',page:1,q:''};
var COLS=[['id','prompt id'],['prompt','prompt'],['margin','margin'],['chosen_score','chosen'],
  ['rejected_score','rejected'],['nodes','nodes'],['chosen','chosen response'],['rejected','rejected response']];
function readHash(){location.hash.replace(/^#/,'').split('&').forEach(function(kv){var p=kv.split('=');
  if(p[0]in state&&p.length>1){var v=decodeURIComponent(p[1]);state[p[0]]=(p[0]=='round'||p[0]=='page')?+v:v;}});}
function writeHash(){history.replaceState(null,'','#'+Object.keys(state).map(function(k){
  return k+'='+encodeURIComponent(state[k])}).join('&'));}
function load(r,done){if(V.rounds[r])return done();var s=document.createElement('script');
  s.src='data/round_'+r+'.js';s.onload=done;document.head.appendChild(s);}
function esc(t){return String(t==null?'':t).replace(/[&<>"]/g,function(c){return{'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]});}
function fmt(v){return v==null?'–':(typeof v=='number'&&v%1!==0?v.toFixed(2):v);}
function render(){load(state.round,function(){
  var rows=V.rounds[state.round],q=state.q.toLowerCase(),k=state.sort,d=state.dir=='asc'?1:-1;
  if(q)rows=rows.filter(function(r){return(r.id+' '+r.prompt+' '+r.chosen+' '+r.rejected).toLowerCase().indexOf(q)>=0});
  rows=rows.slice().sort(function(a,b){var x=a[k],y=b[k];if(x==null&&y==null)return 0;if(x==null)return 1;if(y==null)return -1;
    return(x<y?-1:x>y?1:0)*d;});
  var pages=Math.max(1,Math.ceil(rows.length/PAGE));state.page=Math.min(Math.max(1,state.page),pages);
  var shown=rows.slice((state.page-1)*PAGE,state.page*PAGE);
  var h='<table id="rows"><tr>'+COLS.map(function(c){return'<th data-k="'+c[0]+'">'+c[1]+
    (c[0]==k?(d>0?' ▲':' ▼'):'')+'</th>'}).join('')+'</tr>';
  shown.forEach(function(r){h+='<tr class="row"><td class="id"><a href="round_'+state.round+'/'+r.page+'">'+esc(r.id)+'</a></td><td>'+
    esc(r.prompt)+'</td><td class="num">'+fmt(r.margin)+'</td><td class="num">'+fmt(r.chosen_score)+
    '</td><td class="num">'+fmt(r.rejected_score)+'</td><td class="num">'+r.nodes+'</td><td>'+esc(r.chosen)+
    '</td><td>'+esc(r.rejected)+'</td></tr>';});
  document.getElementById('table').innerHTML=h+'</table>';
  document.getElementById('count').textContent=rows.length+' prompts · page '+state.page+' of '+pages;
  document.querySelectorAll('th').forEach(function(th){th.onclick=function(){
    if(state.sort==th.dataset.k)state.dir=state.dir=='asc'?'desc':'asc';else{state.sort=th.dataset.k;state.dir='asc';}
    state.page=1;render();};});
  document.querySelectorAll('#rounds button').forEach(function(b){b.disabled=(+b.dataset.r==state.round)});
  writeHash();});}
function go(p){state.page=p;render();}
readHash();
document.getElementById('rounds').innerHTML=ROUNDS.map(function(r){return'<button data-r="'+r+'">round '+r+'</button>'}).join('');
document.querySelectorAll('#rounds button').forEach(function(b){b.onclick=function(){state.round=+b.dataset.r;state.page=1;render();}});
var qi=document.getElementById('q');qi.value=state.q;qi.oninput=function(){state.q=qi.value;state.page=1;render();};
document.getElementById('prev').onclick=function(){go(state.page-1)};
document.getElementById('next').onclick=function(){go(state.page+1)};
render();
"""


def index_page(run_name: str, rounds: list[int], page_size: int = 100) -> str:
    js = _INDEX_JS.replace("__ROUNDS__", json.dumps(rounds)).replace("__PAGE__", str(int(page_size)))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>CSR view: {_e(run_name)}</title><style>{CSS}</style></head>
<body><h1>CSR run {_e(run_name)}</h1>
<div class="legend">Every prompt of a round with its chosen/rejected pair. Click a column to sort, a prompt id to see
its sentence tree. The page's address keeps the round, the sort, the page and the search.</div>
<div class="pager"><span id="rounds"></span> <input id="q" placeholder="search id / text" size="30">
<button id="prev">◀ prev</button><button id="next">next ▶</button> <span id="count"></span></div>
<div id="table"></div>
<script>{js}</script></body></html>
"""


def index_row(tree: dict, pair: dict | None) -> dict:
    def preview(text):
        return text if len(text) <= PREVIEW_CHARS else text[:PREVIEW_CHARS] + "…"

    return {"id": str(tree["id"]), "page": page_name(tree["id"]), "prompt": preview(str(tree.get("prompt", ""))),
            "nodes": len(tree["nodes"]),
            "margin": pair and pair.get("margin"), "chosen_score": pair and pair.get("chosen_score"),
            "rejected_score": pair and pair.get("rejected_score"),
            "chosen": preview(pair["chosen"]) if pair else "", "rejected": preview(pair["rejected"]) if pair else ""}


def round_data_js(round_: int, rows: list[dict]) -> str:
    data = json.dumps(rows, ensure_ascii=False).replace("</", "<\\/")
    return f"window.CSR_VIEW.rounds[{int(round_)}]={data};\n"


# ---------------------------------------------------------------------------------------------
# Writing the view
# ---------------------------------------------------------------------------------------------


def image_src(image: str, page_dir: Path) -> str:
    """The image's address as seen from a page: a relative path (a file URL across drives)."""
    path = Path(image).expanduser().resolve()
    try:
        rel = os.path.relpath(path, page_dir.resolve())
    except ValueError:
        return path.as_uri()
    return "/".join(rel.split(os.sep))


def write_view(run_dir: str | Path, out_dir: str | Path | None = None, round_: int | None = None,
               page_size: int = 100) -> Path:
    """Write the view of a run's scored rounds (or of one); returns index.html's path."""
    run_dir = Path(run_dir)
    rounds = scored_rounds(run_dir, round_)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / VIEW_DIR
    kind = _path_score_kind(run_dir)
    pairs = read_pairs(run_dir, rounds)
    scored = {r: run_dir / f"round_{r}" / "score" / "scored.jsonl" for r in rounds}
    ids = {r: {str(t["id"]) for t in iter_jsonl(scored[r])} for r in rounds}
    for r in rounds:
        page_dir = out_dir / f"round_{r}"
        questions = read_questions(run_dir, r)
        rows = []
        for tree in iter_jsonl(scored[r]):
            tid = str(tree["id"])
            by_round = {q: pairs[q].get(tid) for q in rounds}
            page = prompt_page(tree, r, by_round, [q for q in rounds if tid in ids[q]],
                               image_src(tree.get("image", ""), page_dir), kind, questions.get(tid))
            atomic_write_text(page_dir / page_name(tid), page)
            rows.append(index_row(tree, pairs[r].get(tid)))
        atomic_write_text(out_dir / "data" / f"round_{r}.js", round_data_js(r, rows))
        log.info("view: round %d, %d prompts -> %s", r, len(rows), page_dir)
    index = out_dir / "index.html"
    atomic_write_text(index, index_page(run_dir.resolve().name, rounds, page_size))
    return index


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="csr view", description="Write static HTML pages of a run's sentence trees "
                                "and pairs (open index.html from disk; no server).")
    p.add_argument("--run", required=True, help="Run folder (run.output_dir).")
    p.add_argument("--round", type=int, help="Only this round (default: every round with a finished score stage).")
    p.add_argument("--out", help="Output folder (default: <run>/view).")
    p.add_argument("--page-size", type=int, default=100, help="Prompts per page of the index.")
    args = p.parse_args(argv)
    index = write_view(args.run, args.out, args.round, args.page_size)
    print(f"open {index}")
    return 0
