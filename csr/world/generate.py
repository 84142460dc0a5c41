"""A small synthetic vision-language world with ground truth, deterministic by seed.

Each image (``image_size`` px, default 32) is a 2x2 grid of cells; 1 to 4 cells hold one object
each. An object has a shape (the object class that CHAIR and POPE count: circle, square,
triangle, star, diamond, cross, ring, heart), a colour (5), a position (its cell: top left, top
right, bottom left, bottom right) and a size (radius in pixels, not described in text). Shapes in
one image are distinct. A share of objects (``small_fraction``, default 0.4) is drawn tiny: colour
and place stay clear but the shape is hard to make out, which is where a model falls back on its
language prior. Captions are one sentence per object in reading order, from two templates
("There is a red circle at the top left." / "A red circle is at the top left.").

Splits
------
- ``train``: images for the base models (CLIP contrastive training and LLaVA SFT). Biased on
  purpose: shapes come in fixed partner pairs (circle/square, triangle/star, ...); once a shape
  is drawn its partner is added with probability ``cooccur_bias`` (default 0.9), and shapes are
  drawn with Zipf-like popularity (``popularity``). A model trained on it learns a language
  prior ("a circle comes with a square") that makes it name absent partners.
- ``prompts`` (files under ``train/``): unlabelled images for CSR's self-rewarding rounds, drawn
  like the test split by default (``prompt_bias``/``prompt_popularity``), the way CSR draws COCO
  train images while evaluating on COCO val. Their ground truth is kept in
  ``train/prompt_scenes.jsonl`` for analysis only.
- ``test``: unbiased (partners independent, uniform shapes), for POPE and CHAIR.

Files (all JSONL unless noted; **an ``image`` field is relative to the folder holding the file**,
so the file's folder is its image root: ``data.image_root: <world>/train`` for the prompts and
``csr eval`` finds test images without ``--image-root``)::

    <world>/vocab.json                 shapes, colours, positions, partner pairs, synonyms, stats
    <world>/train/scenes.jsonl          {id, image, objects:[{shape,color,position,size,center}], caption}
    <world>/train/sft.jsonl             {id, image, kind: caption|pope, prompt, answer}
    <world>/train/prompts.jsonl         {id, image, input: "<image>\\nDescribe this image in detail."} (CSR)
    <world>/train/prompt_scenes.jsonl   ground truth of the prompt images (not used by CSR)
    <world>/train/images/*.png, <world>/train/prompt_images/*.png
    <world>/test/scenes.jsonl           as for train
    <world>/test/pope.jsonl             {question_id, image, text, label: yes|no, category}
    <world>/test/chair.jsonl            {id, image, objects:[shape names], prompt}
    <world>/test/synonyms.json          {shape: [surface forms]} (CHAIR's synonym table)
    <world>/test/images/*.png

POPE negatives per image and category: ``random`` (absent shapes at random), ``popular`` (the
absent shapes most frequent in the training split), ``adversarial`` (the absent shapes that
co-occur most with the present ones in the training split). Each image gets
``min(pope_per_image, #present)`` positive and as many negative questions per category.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross", "ring", "heart")
# Partner pairs: the co-occurrence the training split is biased towards.
PAIRS = (("circle", "square"), ("triangle", "star"), ("diamond", "cross"), ("ring", "heart"))
COLORS = {"red": (215, 40, 40), "green": (40, 165, 60), "blue": (40, 80, 225),
          "yellow": (235, 200, 30), "purple": (145, 55, 190)}
POSITIONS = ("top left", "top right", "bottom left", "bottom right")  # reading order, (row, col)
SYNONYMS = {
    "circle": ["circle", "disc", "disk"],
    "square": ["square", "box"],
    "triangle": ["triangle"],
    "star": ["star"],
    "diamond": ["diamond", "rhombus"],
    "cross": ["cross"],
    "ring": ["ring", "hoop"],
    "heart": ["heart"],
}
CAPTION_TEMPLATES = ("There is a {color} {shape} at the {position}.",
                     "A {color} {shape} is at the {position}.")
CAPTION_PROMPTS = ("Describe this image in detail.", "What is in this image?",
                   "Describe the image.", "List the objects in the picture.")
DEFAULT_CAPTION_PROMPT = CAPTION_PROMPTS[0]
POPE_TEMPLATE = "Is there a {shape} in the image?"
YES_ANSWER, NO_ANSWER = "Yes, there is.", "No, there is not."
POPE_CATEGORIES = ("random", "popular", "adversarial")

PARTNER = {a: b for a, b in PAIRS} | {b: a for a, b in PAIRS}
# the colour an annotator imagines an unseen shape in (a "yellow banana"): one per shape, so an
# invented sentence is as predictable to the model as the prior that writes it
TYPICAL_COLOR = {s: sorted(COLORS)[i % len(COLORS)] for i, s in enumerate(SHAPES)}


@dataclass
class WorldConfig:
    seed: int = 0
    image_size: int = 32
    n_train: int = 3000
    n_prompts: int = 256
    n_test: int = 200
    min_objects: int = 1
    max_objects: int = 4
    cooccur_bias: float = 0.9      # train: P(partner added | shape drawn)
    popularity: float = 0.6        # train: shape weight ∝ 1/(rank+1)^popularity
    prompt_bias: float = 0.0       # CSR prompt images (default: like the test split)
    prompt_popularity: float = 0.0
    # objects drawn tiny (radius 12-20% of a cell): shape hard to see. Off by default since world v3,
    # so that the base model's errors come from the prior (below), not from what it cannot see.
    small_fraction: float = 0.0
    pope_per_image: int = 3
    sft_questions_per_image: int = 2  # yes/no questions per training image (plus one caption)
    # train SFT captions only: P(an absent partner of a present shape is written into the caption,
    # at an empty cell) -- an annotator's prior, like the unseen objects in LLaVA's GPT-written
    # captions. 0 keeps every caption true. Ground truth (scenes.jsonl, CLIP, POPE) stays clean.
    caption_partner_noise: float = 0.6

    def validate(self) -> None:
        if not 1 <= self.min_objects <= self.max_objects <= len(POSITIONS):
            raise ValueError(f"need 1 <= min_objects <= max_objects <= {len(POSITIONS)}")
        if self.image_size < 16 or self.image_size % 2:
            raise ValueError("image_size must be an even number >= 16")
        for name in ("cooccur_bias", "prompt_bias", "small_fraction", "caption_partner_noise"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------


@dataclass
class Obj:
    shape: str
    color: str
    position: str
    size: float              # radius in pixels of the output image
    center: tuple = field(default=(0.0, 0.0))  # (x, y) in pixels of the output image

    def as_dict(self) -> dict:
        return {"shape": self.shape, "color": self.color, "position": self.position,
                "size": self.size, "center": list(self.center)}


def _split_rng(seed: int, split: str) -> random.Random:
    return random.Random(f"csr-world/{seed}/{split}")  # str seeds are hashed deterministically


def _weights(popularity: float) -> list[float]:
    return [1.0 / (rank + 1) ** popularity for rank in range(len(SHAPES))]


def sample_shapes(rng: random.Random, n: int, bias: float, popularity: float) -> list[str]:
    """n distinct shapes; after each draw its partner joins with probability `bias`."""
    weights = dict(zip(SHAPES, _weights(popularity)))
    chosen: list[str] = []
    while len(chosen) < n:
        pool = [s for s in SHAPES if s not in chosen]
        s = rng.choices(pool, weights=[weights[p] for p in pool])[0]
        chosen.append(s)
        partner = PARTNER[s]
        if len(chosen) < n and partner not in chosen and rng.random() < bias:
            chosen.append(partner)
    return chosen


def sample_scene(rng: random.Random, cfg: WorldConfig, bias: float, popularity: float) -> list[Obj]:
    n = rng.randint(cfg.min_objects, cfg.max_objects)
    shapes = sample_shapes(rng, n, bias, popularity)
    cells = rng.sample(range(len(POSITIONS)), n)
    cell = cfg.image_size / 2
    objs = []
    for shape, c in zip(shapes, cells):
        row, col = divmod(c, 2)
        small = rng.random() < cfg.small_fraction
        radius = (rng.uniform(0.12, 0.20) if small else rng.uniform(0.30, 0.42)) * cell
        jitter = cell * 0.08
        cx = col * cell + cell / 2 + rng.uniform(-jitter, jitter)
        cy = row * cell + cell / 2 + rng.uniform(-jitter, jitter)
        objs.append(Obj(shape, rng.choice(sorted(COLORS)), POSITIONS[c], round(radius, 2),
                        (round(cx, 2), round(cy, 2))))
    objs.sort(key=lambda o: POSITIONS.index(o.position))  # reading order
    return objs


# ---------------------------------------------------------------------------------------------
# Rendering (drawn at 4x and downsampled, so small shapes keep their outline)
# ---------------------------------------------------------------------------------------------


def _star(cx, cy, r, points=5, inner=0.45):
    import math

    out = []
    for i in range(points * 2):
        rad = r if i % 2 == 0 else r * inner
        a = -math.pi / 2 + i * math.pi / points
        out.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return out


def _heart(cx, cy, r, n=40):
    import math

    pts = []
    for i in range(n):
        t = 2 * math.pi * i / n
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((cx + x / 17 * r, cy - y / 17 * r + r * 0.1))
    return pts


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill, bg) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        h = r * 0.85
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    elif shape == "star":
        draw.polygon(_star(cx, cy, r * 1.1), fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)], fill=fill)
    elif shape == "cross":
        t = r * 0.33
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        h = r * 0.5
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=bg)
    elif shape == "heart":
        draw.polygon(_heart(cx, cy, r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render_scene(objs: list[Obj], image_size: int, background=(250, 250, 250)) -> Image.Image:
    big = image_size * 4
    img = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(img)
    for o in objs:
        draw_shape(draw, o.shape, o.center[0] * 4, o.center[1] * 4, o.size * 4, COLORS[o.color], background)
    return img.resize((image_size, image_size), Image.Resampling.BOX)


# ---------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------


def object_sentence(o: Obj | dict, template: int = 0) -> str:
    d = o if isinstance(o, dict) else o.as_dict()
    return CAPTION_TEMPLATES[template].format(color=d["color"], shape=d["shape"], position=d["position"])


def caption(objs: list, templates: list[int] | None = None) -> str:
    """One sentence per object, in reading order."""
    templates = templates or [0] * len(objs)
    return " ".join(object_sentence(o, t) for o, t in zip(objs, templates))


def pope_question(shape: str) -> str:
    return POPE_TEMPLATE.format(shape=shape)


def cooccurrence_stats(scenes: list[list[str]]) -> tuple[Counter, dict[str, Counter]]:
    """(shape frequency, shape -> Counter of shapes seen in the same image)."""
    freq: Counter = Counter()
    co: dict[str, Counter] = {s: Counter() for s in SHAPES}
    for shapes in scenes:
        freq.update(shapes)
        for a in shapes:
            co[a].update(b for b in shapes if b != a)
    return freq, co


def pope_negatives(present: list[str], k: int, category: str, rng: random.Random,
                   freq: Counter, co: dict[str, Counter]) -> list[str]:
    absent = [s for s in SHAPES if s not in present]
    if category == "random":
        return rng.sample(absent, k)
    if category == "popular":
        ranked = sorted(absent, key=lambda s: (-freq[s], SHAPES.index(s)))
    elif category == "adversarial":
        score = {s: sum(co[p][s] for p in present) for s in absent}
        ranked = sorted(absent, key=lambda s: (-score[s], -freq[s], SHAPES.index(s)))
    else:
        raise ValueError(f"unknown POPE category {category!r}")
    return ranked[:k]


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------


def sample_split(cfg: WorldConfig, split: str) -> list[list[Obj]]:
    n, bias, pop = {"train": (cfg.n_train, cfg.cooccur_bias, cfg.popularity),
                    "prompts": (cfg.n_prompts, cfg.prompt_bias, cfg.prompt_popularity),
                    "test": (cfg.n_test, 0.0, 0.0)}[split]
    rng = _split_rng(cfg.seed, split)
    return [sample_scene(rng, cfg, bias, pop) for _ in range(n)]


def _write_jsonl(path: Path, records) -> int:
    from csr.io import write_jsonl

    return write_jsonl(path, records)


def _scene_records(scenes, prefix: str, image_dir: str, rng: random.Random) -> list[dict]:
    out = []
    for i, objs in enumerate(scenes):
        templates = [rng.randrange(len(CAPTION_TEMPLATES)) for _ in objs]
        out.append({"id": f"{prefix}-{i:06d}", "image": f"{image_dir}/{prefix}-{i:06d}.png",
                    "objects": [o.as_dict() for o in objs], "caption": caption(objs, templates),
                    "caption_canonical": caption(objs)})
    return out


def _render_all(records: list[dict], scenes, root: Path, image_size: int) -> None:
    for rec, objs in zip(records, scenes):
        path = root / rec["image"]
        path.parent.mkdir(parents=True, exist_ok=True)
        render_scene(objs, image_size).save(path, format="PNG")


def vocabulary(cfg: WorldConfig | None = None, stats: dict | None = None) -> dict:
    return {"shapes": list(SHAPES), "colors": list(COLORS), "positions": list(POSITIONS),
            "pairs": [list(p) for p in PAIRS], "synonyms": SYNONYMS,
            "caption_templates": list(CAPTION_TEMPLATES), "caption_prompts": list(CAPTION_PROMPTS),
            "pope_template": POPE_TEMPLATE, "answers": {"yes": YES_ANSWER, "no": NO_ANSWER},
            **({"config": cfg.to_dict()} if cfg else {}), **({"train_stats": stats} if stats else {})}


def noisy_caption(rec: dict, noise: float, rng: random.Random) -> str:
    """The SFT caption of a training scene, with absent partners added with probability `noise`.

    Each present shape whose partner is absent gets a sentence for that partner, in its typical
    colour at the first empty cell, while empty cells remain. The invented sentence is thus fully
    predictable from the text: the model's own likelihood cannot tell it from a seen object, only
    the image can (what CSR's CLIP term is for). Returns the true caption when nothing is added.
    """
    if noise <= 0:  # draws nothing from `rng`, so a noise-free world stays byte-identical
        return rec["caption"]
    objs = list(rec["objects"])
    present = {o["shape"] for o in objs}
    occupied = {o["position"] for o in objs}
    for o in rec["objects"]:
        partner = PARTNER[o["shape"]]
        empty = [p for p in POSITIONS if p not in occupied]
        if partner in present or not empty or rng.random() >= noise:
            continue
        ghost = {"shape": partner, "color": TYPICAL_COLOR[partner], "position": empty[0]}
        objs.append(ghost)
        present.add(partner)
        occupied.add(ghost["position"])
    if len(objs) == len(rec["objects"]):
        return rec["caption"]
    objs.sort(key=lambda o: POSITIONS.index(o["position"]))
    return " ".join(object_sentence(o, rng.randrange(len(CAPTION_TEMPLATES))) for o in objs)


def write_train_split(cfg: WorldConfig, out: Path) -> dict:
    """train/: scenes, images, SFT records, CSR prompts (+ their images and ground truth)."""
    root = out / "train"
    rng = _split_rng(cfg.seed, "train-text")
    scenes = sample_split(cfg, "train")
    records = _scene_records(scenes, "train", "images", rng)
    _render_all(records, scenes, root, cfg.image_size)
    _write_jsonl(root / "scenes.jsonl", records)

    sft = []
    for rec in records:
        present = [o["shape"] for o in rec["objects"]]
        prompt = CAPTION_PROMPTS[0] if rng.random() < 0.5 else rng.choice(CAPTION_PROMPTS[1:])
        sft.append({"id": f"{rec['id']}-cap", "image": rec["image"], "kind": "caption",
                    "prompt": prompt, "answer": noisy_caption(rec, cfg.caption_partner_noise, rng)})
        absent = [s for s in SHAPES if s not in present]
        for q in range(cfg.sft_questions_per_image):
            yes = q % 2 == 0
            shape = rng.choice(present) if yes else rng.choice(absent)
            sft.append({"id": f"{rec['id']}-q{q}", "image": rec["image"], "kind": "pope",
                        "prompt": pope_question(shape), "answer": YES_ANSWER if yes else NO_ANSWER})
    _write_jsonl(root / "sft.jsonl", sft)

    p_scenes = sample_split(cfg, "prompts")
    p_records = _scene_records(p_scenes, "prompt", "prompt_images", rng)
    _render_all(p_records, p_scenes, root, cfg.image_size)
    _write_jsonl(root / "prompt_scenes.jsonl", p_records)
    prompts = []
    for rec in p_records:
        phrasing = CAPTION_PROMPTS[0] if rng.random() < 0.5 else rng.choice(CAPTION_PROMPTS[1:])
        prompts.append({"id": rec["id"], "image": rec["image"], "input": f"<image>\n{phrasing}"})
    _write_jsonl(root / "prompts.jsonl", prompts)
    return {"n_images": len(records), "n_sft": len(sft), "n_prompts": len(prompts)}


def write_test_split(cfg: WorldConfig, out: Path, train_shapes: list[list[str]]) -> dict:
    """test/: scenes, images, POPE questions (3 categories), CHAIR records, synonym table."""
    root = out / "test"
    rng = _split_rng(cfg.seed, "test-text")
    scenes = sample_split(cfg, "test")
    records = _scene_records(scenes, "test", "images", rng)
    _render_all(records, scenes, root, cfg.image_size)
    _write_jsonl(root / "scenes.jsonl", records)

    freq, co = cooccurrence_stats(train_shapes)
    pope, qid = [], 0
    for rec in records:
        present = [o["shape"] for o in rec["objects"]]
        k = min(cfg.pope_per_image, len(present), len(SHAPES) - len(present))
        for category in POPE_CATEGORIES:
            pos = rng.sample(present, k)
            neg = pope_negatives(present, k, category, rng, freq, co)
            for shape, label in [(s, "yes") for s in pos] + [(s, "no") for s in neg]:
                pope.append({"question_id": qid, "image": rec["image"], "text": pope_question(shape),
                             "label": label, "category": category, "object": shape})
                qid += 1
    _write_jsonl(root / "pope.jsonl", pope)
    chair = [{"id": rec["id"], "image": rec["image"], "objects": sorted({o["shape"] for o in rec["objects"]}),
              "prompt": DEFAULT_CAPTION_PROMPT} for rec in records]
    _write_jsonl(root / "chair.jsonl", chair)
    from csr.io import atomic_write_json

    atomic_write_json(root / "synonyms.json", SYNONYMS)
    return {"n_images": len(records), "n_pope": len(pope), "n_chair": len(chair)}


def generate_world(cfg: WorldConfig, out: str | Path) -> dict:
    """Write vocab.json, train/ and test/ under `out` (overwriting). Returns a summary.

    Does not mark anything done: `csr.world.build` does that per folder.
    """
    from csr.io import atomic_write_json

    cfg.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train_shapes = [[o.shape for o in objs] for objs in sample_split(cfg, "train")]
    freq, co = cooccurrence_stats(train_shapes)
    stats = {"shape_frequency": dict(freq),
             "partner_rate": {s: round(co[s][PARTNER[s]] / max(freq[s], 1), 3) for s in SHAPES}}
    atomic_write_json(out / "vocab.json", vocabulary(cfg, stats))
    summary = {"train": write_train_split(cfg, out), "test": write_test_split(cfg, out, train_shapes)}
    return summary
