"""CHAIR: objects a caption mentions against the image's ground-truth objects.

For each caption, object mentions are found with a synonym table (each canonical object has a
list of surface forms; plurals of every form are added automatically, e.g. "dogs", "boxes",
"people"). Multi-word forms ("hot dog", "teddy bear") are matched first, longest first, so
"hot dog" is not also a "dog". A mention is *hallucinated* when its canonical object is not in the
image's ground truth.

- CHAIR_S = captions with at least one hallucinated mention / captions
- CHAIR_I = hallucinated mentions / all mentions (repeated mentions count each time, as in the
  original CHAIR code)
- recall = ground-truth objects mentioned at least once / ground-truth objects (micro over all
  captions), so that saying less cannot pass for hallucinating less.

Synonym files (`load_synonyms`): JSON ``{canonical: [forms]}`` (the world writes
``test/synonyms.json``), or the text format of the original CHAIR release (one object a line,
comma separated, the first entry is the canonical name: ``person, girl, boy, man, woman``).

COCO (`coco_ground_truth`, `coco_chair_records`, ``python -m csr.eval.chair``): the ground truth
of an image is the union of the categories in its ``instances_*.json`` annotations (a COCO
category name is mapped through the synonym table to its canonical object, and kept as its own
canonical object if the table does not know it) and, when a ``captions_*.json`` file is given, the
objects its reference captions mention, as the original CHAIR does. The user provides the
annotation files and the synonym list (e.g. the 80-class ``synonyms.txt`` of the CHAIR release).
This table is what the grounded world and `csr eval --chair` use. It is not the reference CHAIR
script: no singulariser (plural forms are generated instead, irregular endings of compounds
included: 'policemen', 'grandchildren'), no special rules for 'baby bird' or 'toilet seat'. For
numbers that compare with published ones, score COCO captions with `csr.eval.coco_chair`
(`csr eval --chair-captions ... --chair-mode reference`).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
from pathlib import Path

log = logging.getLogger(__name__)

_IRREGULAR = {"person": "people", "man": "men", "woman": "women", "child": "children",
              "mouse": "mice", "foot": "feet", "tooth": "teeth", "goose": "geese",
              "knife": "knives", "leaf": "leaves", "wolf": "wolves", "shelf": "shelves",
              "life": "lives", "wife": "wives", "calf": "calves", "half": "halves", "ox": "oxen"}
# irregular endings of compound words: policeman -> policemen, grandchild -> grandchildren
_IRREGULAR_ENDINGS = {"man": "men", "child": "children", "person": "people", "mouse": "mice", "foot": "feet",
                      "tooth": "teeth", "goose": "geese"}
_INVARIANT = {"sheep", "fish", "deer", "series", "species", "scissors", "glasses", "skis",
              "pants", "jeans", "shorts", "aircraft", "bison", "moose", "people"}
_WORD = re.compile(r"[a-z0-9]+")


def tokenize(text: str) -> list[str]:
    """Lower-case alphanumeric words; hyphens and punctuation separate words."""
    return _WORD.findall((text or "").lower())


def plural_forms(word: str) -> set[str]:
    """The word and its plural(s); only the last word of a phrase is inflected."""
    *head, last = word.lower().split()
    forms = {last}
    if last in _INVARIANT:
        pass
    elif last in _IRREGULAR:
        forms.add(_IRREGULAR[last])
    elif last.endswith(("s", "x", "z", "ch", "sh")):
        forms.add(last + "es")
    elif len(last) > 1 and last.endswith("y") and last[-2] not in "aeiou":
        forms.add(last[:-1] + "ies")
    else:
        # the regular plural is kept beside it ('humans' and the harmless 'humen')
        forms.update(last[:-len(end)] + pl for end, pl in _IRREGULAR_ENDINGS.items() if last.endswith(end))
        if last.endswith("fe"):
            forms.add(last[:-2] + "ves")
        elif last.endswith("f"):
            forms.add(last[:-1] + "ves")
        forms.add(last + "s")
    return {" ".join(head + [f]) for f in forms}


class SynonymTable:
    """Surface forms (and their plurals) -> canonical object names."""

    def __init__(self, mapping: dict[str, list[str]]):
        self.canonicals: list[str] = []
        self.surface: dict[tuple[str, ...], str] = {}
        for canonical, forms in mapping.items():
            canonical = " ".join(tokenize(canonical))
            self.canonicals.append(canonical)
            for form in [canonical, *forms]:
                if not tokenize(form):
                    continue
                for f in plural_forms(" ".join(tokenize(form))):
                    key = tuple(f.split())
                    if key in self.surface and self.surface[key] != canonical:
                        log.debug("synonym '%s' claimed by '%s' and '%s'; keeping the first",
                                  f, self.surface[key], canonical)
                        continue
                    self.surface[key] = canonical
        self.max_len = max((len(k) for k in self.surface), default=1)

    def canonical(self, name: str) -> str | None:
        """Canonical object of a name or surface form (None when unknown)."""
        return self.surface.get(tuple(tokenize(name)))

    def normalise_objects(self, names) -> set[str]:
        """Ground-truth names mapped to canonical objects (unknown names kept as they are)."""
        return {self.canonical(n) or " ".join(tokenize(n)) for n in names}

    def mentions(self, caption: str) -> list[tuple[str, str]]:
        """(surface words, canonical object) for every mention, in order, longest match first."""
        words = tokenize(caption)
        out, i = [], 0
        while i < len(words):
            for n in range(min(self.max_len, len(words) - i), 0, -1):
                key = tuple(words[i:i + n])
                if key in self.surface:
                    out.append((" ".join(key), self.surface[key]))
                    i += n
                    break
            else:
                i += 1
        return out


def load_synonyms(path: str | Path) -> SynonymTable:
    """A synonym table from JSON ({canonical: [forms]}) or CHAIR's comma-separated text file."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("{"):
        mapping = json.loads(text)
        if not isinstance(mapping, dict):
            raise ValueError(f"{path}: expected a JSON object {{canonical: [forms]}}")
        return SynonymTable({k: list(v) if isinstance(v, (list, tuple)) else [v] for k, v in mapping.items()})
    mapping = {}
    for line in text.splitlines():
        forms = [f.strip() for f in line.split(",") if f.strip()]
        if forms:
            mapping.setdefault(forms[0], []).extend(forms[1:])
    if not mapping:
        raise ValueError(f"{path}: no synonyms found")
    return SynonymTable(mapping)


def caption_report(caption: str, gt_objects, table: SynonymTable) -> dict:
    """Mentions, hallucinated mentions and covered ground truth for one caption."""
    gt = table.normalise_objects(gt_objects)
    mentions = table.mentions(caption)
    hallucinated = [(w, c) for w, c in mentions if c not in gt]
    mentioned = {c for _, c in mentions}
    return {"mentions": [c for _, c in mentions], "hallucinated": [c for _, c in hallucinated],
            "hallucinated_words": [w for w, _ in hallucinated], "covered": sorted(mentioned & gt),
            "ground_truth": sorted(gt), "n_words": len(tokenize(caption))}


def chair_metrics(captions: list[str], gt_objects: list, table: SynonymTable,
                  return_per_caption: bool = False) -> dict:
    """CHAIR_S, CHAIR_I and recall over captions (one ground-truth object list per caption)."""
    if len(captions) != len(gt_objects):
        raise ValueError(f"{len(captions)} captions for {len(gt_objects)} ground-truth lists")
    reports = [caption_report(c, g, table) for c, g in zip(captions, gt_objects)]
    n = len(reports)
    n_mentions = sum(len(r["mentions"]) for r in reports)
    n_hall = sum(len(r["hallucinated"]) for r in reports)
    n_gt = sum(len(r["ground_truth"]) for r in reports)
    n_cov = sum(len(r["covered"]) for r in reports)
    out = {"chair_s": sum(bool(r["hallucinated"]) for r in reports) / n if n else 0.0,
           "chair_i": n_hall / n_mentions if n_mentions else 0.0,
           "recall": n_cov / n_gt if n_gt else 0.0,
           "n_captions": n, "n_mentions": n_mentions, "n_hallucinated": n_hall,
           "n_ground_truth": n_gt, "n_covered": n_cov,
           "mentions_per_caption": n_mentions / n if n else 0.0,
           "words_per_caption": sum(r["n_words"] for r in reports) / n if n else 0.0}
    if return_per_caption:
        out["per_caption"] = reports
    return out


# ---------------------------------------------------------------------------------------------
# COCO
# ---------------------------------------------------------------------------------------------


def coco_ground_truth(instances_path: str | Path, table: SynonymTable,
                      captions_path: str | Path | None = None) -> dict[int, dict]:
    """image_id -> {"file_name", "objects"} from COCO annotation files (see module docstring)."""
    inst = json.loads(Path(instances_path).read_text())
    cat_name = {c["id"]: c["name"] for c in inst["categories"]}
    images = {im["id"]: {"file_name": im["file_name"], "objects": set()} for im in inst["images"]}
    for ann in inst["annotations"]:
        if ann["image_id"] in images:
            name = cat_name[ann["category_id"]]
            images[ann["image_id"]]["objects"].add(table.canonical(name) or " ".join(tokenize(name)))
    if captions_path is not None:
        caps = json.loads(Path(captions_path).read_text())
        for ann in caps["annotations"]:
            if ann["image_id"] in images:
                images[ann["image_id"]]["objects"].update(c for _, c in table.mentions(ann["caption"]))
    return {k: {"file_name": v["file_name"], "objects": sorted(v["objects"])} for k, v in images.items()}


def coco_chair_records(instances_path, synonyms_path, captions_path=None, *, n: int | None = 500,
                       seed: int = 0, prompt: str = "Describe this image in detail.") -> list[dict]:
    """CHAIR records ({id, image, objects, prompt}) for `n` COCO images drawn with `seed`."""
    table = load_synonyms(synonyms_path)
    gt = coco_ground_truth(instances_path, table, captions_path)
    ids = sorted(gt)
    if n is not None and n < len(ids):
        ids = sorted(random.Random(seed).sample(ids, n))
    return [{"id": str(i), "image": gt[i]["file_name"], "objects": gt[i]["objects"], "prompt": prompt}
            for i in ids]


def main(argv: list[str] | None = None) -> int:
    """python -m csr.eval.chair --instances I.json [--captions C.json] --synonyms S --out chair.jsonl"""
    from csr.io import atomic_write_json, write_jsonl

    ap = argparse.ArgumentParser(prog="python -m csr.eval.chair",
                                 description="Write a CHAIR file for COCO images from annotation files.")
    ap.add_argument("--instances", required=True, help="COCO instances_*.json")
    ap.add_argument("--captions", help="COCO captions_*.json (adds objects named in reference captions)")
    ap.add_argument("--synonyms", required=True, help="synonym file: CHAIR's synonyms.txt or JSON")
    ap.add_argument("--out", required=True, help="output chair.jsonl; synonyms.json is written beside it")
    ap.add_argument("--n", type=int, default=500, help="images to sample (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    recs = coco_chair_records(args.instances, args.synonyms, args.captions, n=args.n or None, seed=args.seed)
    write_jsonl(args.out, recs)
    table = load_synonyms(args.synonyms)
    mapping: dict[str, list[str]] = {}
    for key, canonical in table.surface.items():
        mapping.setdefault(canonical, []).append(" ".join(key))
    atomic_write_json(Path(args.out).parent / "synonyms.json", {k: sorted(v) for k, v in mapping.items()})
    print(f"wrote {len(recs)} CHAIR records to {args.out} (images relative to your COCO image folder: "
          f"pass it to `csr eval --image-root`)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
