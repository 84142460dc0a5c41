"""CHAIR on COCO as the reference script computes it, and a corrected mode beside it.

The reference is ``utils/chair.py`` of the CHAIR release (Rohrbach et al. 2018, repository
LisaAnne/Hallucination); LURE, OPERA and the CSR authors' evaluation use it, so published CHAIR
numbers come from its rules. ``mode="reference"`` (the default for COCO) reproduces them:

- Synonyms: each line of the synonym list is stripped and split on ``", "`` (comma *and* space);
  the first entry is the class. A surface word owned by two lines goes to the later one.
- Ground truth of an image: the classes of its instance annotations (category name looked up in
  the synonym list) plus the classes found, with the caption rules below, in its reference
  captions; train2014 and val2014 files are combined.
- A caption: lower-cased, tokenised as nltk's ``word_tokenize`` does (`word_tokenize`),
  every token singularised with pattern's ``singularize`` (`singularize`), then two-word objects
  merged left to right (`REFERENCE_DOUBLE_WORDS`): 'baby'/'adult' + animal becomes the animal,
  'passenger jet/train' the vehicle, 'bow tie' a tie, 'toilet seat' a toilet, 'train track' no
  object; if 'toilet' and 'seat' both remain, every 'seat' is dropped (no chair). The remaining
  tokens that are synonym entries are the mentions, each counted (repeats included).
- CHAIR_S = captions with a mention outside the ground truth / captions; CHAIR_I = such mentions /
  all mentions. Recall (added by OPERA's copy of the script) = ground-truth classes mentioned /
  ground-truth classes, summed over captions.

Quirks of the reference that `reference` keeps and `corrected` fixes (one line each):

1. ``singularize('bus') == 'bu'`` (also 'minibus', 'airbus'): a singular bus is never found.
   Corrected: a token that is itself a synonym entry is kept as it is.
2. pattern's rules turn 'ties' into 'ty', 'canoes' into 'cano', 'magpies' into 'magpy' and
   'thieves' into 'thieve', so these plurals are never found. Corrected: when pattern's singular is
   not a synonym entry, the token less '-s', less '-es' and '-ves' -> '-f'/'-fe' are tried.
3. Entries after a doubled space ('motorcycle, scooter,  motor bike', 'cake,  cheesecake') keep a
   leading space and never match. Corrected: entries are split on ',' and stripped.
4. 'iPhone' is capitalised but captions are lower-cased, so it never matches. Corrected: entries
   are lower-cased.
5. Multi-word entries only match when they are in the script's fixed two-word list: 'dining table'
   is found only through 'table', and the three-word 'stove top oven' never. Corrected: every
   multi-word synonym entry is matched, longest first (up to three words).

The special rules (baby/adult animal, passenger vehicle, bow tie, toilet seat, the 'seat' rule,
train track, home plate) are deliberate and are kept in both modes. Irregular plurals of compound
words ('policemen', 'gentlemen', 'grandchildren') are found in both modes: pattern's rules match
the plural's ending.

Tokenisation (`word_tokenize`) follows nltk's ``word_tokenize`` (Punkt sentence breaks, then the
NLTKWordTokenizer rules of nltk 3.9) without needing nltk or its data: hyphens, slashes and inner
periods stay inside a word ('man-made', 'cat/dog', 'dog.the' are one token each); commas, colons,
quotes, brackets, '?', '!', ';', '*', dashes, '--', '...', clitics ("'s", "n't") and a sentence's
final period are split off. Punkt's trained English model decides which '.' ends a sentence; here
a short rule stands in for it: every '.' that is followed by a space or a closing mark ends one,
except after a few abbreviations ('mr.', 'p.m.', ...) and after a number or a single letter that
precedes a lower-case word. On 20,000 random strings built from the synonym words and
punctuation, the tokens differ from nltk 3.10 with the English Punkt model in 2 (both a number or
an abbreviation keeping its period), and the objects found never differ (30,000 strings).

`singularize` reproduces pattern 2.6's ``singularize`` (pattern/text/en/inflect.py): unchanged if
the word is the ending of an uninflected or uncountable noun, '-ie' nouns ('doggies' -> 'doggie'),
irregular endings ('men' -> 'man', 'people' -> 'person', 'children' -> 'child', 'oxen' -> 'ox',
'geese' -> 'goose', ...), then its ordered suffix rules. (pattern 3.6 returns '-ie' plurals
unchanged; the reference predates it.)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from csr.data import BadInput


MODES = ("reference", "corrected")
ANNOTATION_FILES = ("instances_train2014.json", "instances_val2014.json",
                    "captions_train2014.json", "captions_val2014.json")

# ------------------------------------------------------------------------------ tokenisation

# Abbreviations of Punkt's English model that captions may hold (after them no sentence ends in
# lower-cased text); the rest of its list is names and dates.
_ABBREVIATIONS = {"a.m", "p.m", "u.s", "vs", "mr", "mrs", "dr", "st", "jr", "sr", "co", "inc", "ltd", "prof", "ft",
                  "ave"}
_END_CANDIDATE = re.compile(r"[.?!](?=(?P<after>[)\";}\]*:@'({\[\u2018\u2019\u201c\u201d\xab\xbb?!])|\s+(?P<next>\S+))")
_REALIGN = re.compile(r"[\"')\]}\u2018\u2019\u201c\u201d\xab\xbb]+?(?:\s+|(?=--)|$)")
_LAST_PIECE = re.compile(r"-{2,}|\.{2,}|[)\";}\]*:@({\[]|(?=['\u2018\u2019\u201c\u201d\xab\xbb?!])")
_LEADING_PUNCT = re.compile(r"^(?:\.{2,}|[(\"`{\[:;&#*@)}\]\-,])+")
_NUMBER = re.compile(r"^-?[.,]?\d[\d,.-]*$")
_ALWAYS_APART = re.compile(r"(\.{2,}|--|`+|[;@#$%&?!*\[\](){}<>«“‘„»”’\u2012-\u2015])")
_COMMA = re.compile(r"([:,])([^\d])")          # consumes the next character, as nltk's rule does
_LEADING_APOSTROPHE = re.compile(r"(?i)(?<!\w)(')(?!(?:re|ve|ll|m|t|s|d|n)\b)(?=\w)")
_CLITIC = re.compile(r"([^' ])('[sSmMdD]|'|'ll|'LL|'re|'RE|'ve|'VE|n't|N'T) ")
_FINAL_PERIOD = re.compile(r"([^.])(\.)([\]\)}>\"'»”’ ]*)\s*$")
_SPLIT_WORDS = re.compile(r"(?i)\b(can)(not)\b|\b(gim)(me)\b|\b(gon)(na)\b|\b(got)(ta)\b|\b(lem)(me)\b|\b(wan)(na)(?=\s)")


def _ends_sentence(word: str, next_tok: str | None) -> bool:
    """Punkt's decision, simplified for lower-cased text: does `word` (ending in . ? !) end a sentence?"""
    if word.endswith(("?", "!")):
        return True
    if word.endswith(".."):
        return False                      # an ellipsis; '...' is a token of its own anyway
    typ = _LEADING_PUNCT.sub("", _LAST_PIECE.split(word[:-1])[-1])
    if not typ:
        return True
    if typ in _ABBREVIATIONS:
        return False
    if _NUMBER.match(typ) or (len(typ) == 1 and typ.isalpha()):
        # '2.' or 'a.' before a lower-case word or punctuation is an ordinal or an initial
        return not (next_tok and (next_tok[0].islower() or next_tok[0] in ";:," or next_tok in ";:,.!?"))
    return True


def split_sentences(text: str) -> list[str]:
    """Punkt's sentence slices: break after . ? ! (see `_ends_sentence`), closing quotes and
    brackets that follow the break stay with the sentence they close."""
    out, start = [], 0
    cands = list(_END_CANDIDATE.finditer(text))
    for k, m in enumerate(cands):
        if m.start() < start:
            continue
        if not m.group("next") and k + 1 < len(cands) and \
                not any(c.isspace() for c in text[m.end():cands[k + 1].start()]):
            continue                      # 'dog.!': only the last end mark of a word counts
        word_start = max(text.rfind(c, start, m.start()) for c in " \t\n\r\f\v") + 1
        word = text[max(word_start, start):m.end()]
        if not _ends_sentence(word, m.group("next")):
            continue
        nxt = m.start("next") if m.group("next") else m.end()
        r = _REALIGN.match(text, nxt)
        end = nxt + len(r.group(0).rstrip()) if r else m.end()
        out.append(text[start:end])
        start = r.end() if r else nxt
    out.append(text[start:])
    return [s.strip() for s in out if s.strip()]


def _tokenize_sentence(s: str) -> list[str]:
    if s.startswith('"'):
        s = " `` " + s[1:]
    s = re.sub(r"([ (\[{<])(\"|'')", r"\1 `` ", s)
    s = _LEADING_APOSTROPHE.sub(r"\1 ", s)
    s = _ALWAYS_APART.sub(r" \1 ", s)
    s = _COMMA.sub(r" \1 \2", s)
    s = re.sub(r"([:,])$", r" \1 ", s)
    s = _FINAL_PERIOD.sub(r"\1 \2 \3 ", s)
    s = re.sub(r"([^'])' ", r"\1 ' ", s)
    s = " " + s.replace("''", " '' ").replace('"', " '' ") + " "
    s = re.sub(r"\s+", " ", s)
    s = _CLITIC.sub(r"\1 \2 ", s)
    s = _SPLIT_WORDS.sub(lambda m: " " + " ".join(g for g in m.groups() if g) + " ", s)
    return s.split()


def word_tokenize(text: str) -> list[str]:
    """Tokens as nltk's ``word_tokenize`` gives them for captions (see the module docstring)."""
    return [t for s in split_sentences(text or "") for t in _tokenize_sentence(s)]


# ---------------------------------------------------------------------------- singularising

_PREPOSITIONS = set("about above across after among around at athwart before behind below beneath "
                    "beside besides between betwixt beyond but by during except for from in into "
                    "near of off on onto out over since till to under until unto upon with".split())
_UNINFLECTED = ("bison bream breeches britches carp chassis christmas clippers cod contretemps corps debris "
                "diabetes djinn eland elk flounder gallows georgia graffiti headquarters herpes high-jinks "
                "homework innings jackanapes mackerel measles mews mumps news pincers pliers proceedings "
                "rabies salmon scissors series shears species swine swiss trout tuna whiting wildebeest "
                # uncountable
                "advice bread butter cheese electricity equipment fruit furniture garbage gravel happiness "
                "information ketchup knowledge love luggage mathematics mayonnaise meat mustard news progress "
                "research rice sand software understanding water").split()
_IE_NOUNS = ("algerie auntie beanie birdie bogie bombie bookie collie cookie cutie doggie eyrie freebie goonie "
             "groupie hankie hippie hoagie hottie indie junkie laddie laramie lingerie meanie nightie oldie "
             "pixie quickie reverie rookie softie sortie stoolie sweetie techie toughie valkyrie veggie weenie "
             "yuppie zombie").split()
_IRREGULAR = {"men": "man", "people": "person", "children": "child", "sexes": "sex", "axes": "axe",
              "moves": "move", "teeth": "tooth", "geese": "goose", "feet": "foot", "zoa": "zoon",
              "atlantes": "atlas", "atlases": "atlas", "beeves": "beef", "brethren": "brother",
              "corpora": "corpus", "corpuses": "corpus", "kine": "cow", "ephemerides": "ephemeris",
              "ganglia": "ganglion", "genii": "genie", "genera": "genus", "graffiti": "graffito",
              "helves": "helve", "leaves": "leaf", "loaves": "loaf", "monies": "money",
              "mongooses": "mongoose", "mythoi": "mythos", "octopodes": "octopus", "opera": "opus",
              "opuses": "opus", "oxen": "ox", "penes": "penis", "penises": "penis",
              "soliloquies": "soliloquy", "testes": "testis", "trilbys": "trilby", "turves": "turf",
              "numena": "numen", "occipita": "occiput", "our": "my"}
# pattern's suffix rules, in its order; the first that matches wins. Empty groups are dropped.
_SUFFIX_RULES = [(re.compile(p), r) for p, r in [
    (r"(?i)(.)ae$", r"\1a"), (r"(?i)(.)itis$", r"\1itis"), (r"(?i)(.)eaux$", r"\1eau"),
    (r"(?i)(quiz)zes$", r"\1"), (r"(?i)(matr)ices$", r"\1ix"), (r"(?i)(ap|vert|ind)ices$", r"\1ex"),
    (r"(?i)^(ox)en", r"\1"), (r"(?i)(alias|status)es$", r"\1"),
    (r"(?i)([octop|vir])i$", r"\1us"),           # sic: a character class in pattern
    (r"(?i)(cris|ax|test)es$", r"\1is"), (r"(?i)(shoe)s$", r"\1"), (r"(?i)(o)es$", r"\1"),
    (r"(?i)(bus)es$", r"\1"), (r"(?i)([m|l])ice$", r"\1ouse"), (r"(?i)(x|ch|ss|sh)es$", r"\1"),
    (r"(?i)(m)ovies$", r"\1ovie"), (r"(?i)(.)ombies$", r"\1ombie"), (r"(?i)(s)eries$", r"\1eries"),
    (r"(?i)([^aeiouy]|qu)ies$", r"\1y"),
    (r"([aeo]l)ves$", r"\1f"), (r"([^d]ea)ves$", r"\1f"), (r"arves$", "arf"), (r"erves$", "erve"),
    (r"([nlw]i)ves$", r"\1fe"), (r"(?i)([lr])ves$", r"\1f"), (r"([aeo])ves$", r"\1ve"),
    (r"(?i)(sive)s$", r"\1"), (r"(?i)(tive)s$", r"\1"), (r"(?i)(hive)s$", r"\1"), (r"(?i)([^f])ves$", r"\1fe"),
    (r"(?i)(^analy)ses$", r"\1sis"),
    (r"(?i)((a)naly|(b)a|(d)iagno|(p)arenthe|(p)rogno|(s)ynop|(t)he)ses$", r"\1\2sis"),
    (r"(?i)(.)opses$", r"\1opsis"), (r"(?i)(.)yses$", r"\1ysis"), (r"(?i)(h|d|r|o|n|b|cl|p)oses$", r"\1ose"),
    (r"(?i)(fruct|gluc|galact|lact|ket|malt|rib|sacchar|cellul)ose$", r"\1ose"), (r"(?i)(.)oses$", r"\1osis"),
    (r"(?i)([ti])a$", r"\1um"), (r"(?i)(n)ews$", r"\1ews"), (r"(?i)s$", ""),
]]


def singularize(word: str) -> str:
    """pattern 2.6's ``singularize`` (nouns): 'dogs' -> 'dog', 'people' -> 'person', 'bus' -> 'bu'."""
    if "-" in word:
        parts = word.split("-")
        if parts[1] in _PREPOSITIONS:                       # mothers-in-law
            return singularize(parts[0]) + "-" + "-".join(parts[1:])
    if word.endswith("'"):
        return singularize(word[:-1]) + "'s"
    low = word.lower()
    if any(x.endswith(low) for x in _UNINFLECTED):         # sic: the word is an *ending* of one
        return word
    for x in _IE_NOUNS:
        if low.endswith(x + "s"):
            return x
    for plural, single in _IRREGULAR.items():
        if low.endswith(plural):
            return re.sub("(?i)" + plural + "$", single, word)
    for pattern, repl in _SUFFIX_RULES:
        m = pattern.search(word)
        if m:
            for k, g in enumerate(m.groups(), 1):
                if g is None:
                    repl = repl.replace("\\" + str(k), "")
            return pattern.sub(repl, word)
    return word


# ------------------------------------------------------------------------------ the caption rules

_ANIMALS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub")
REFERENCE_DOUBLE_WORDS: dict[str, str] = {w: w for w in (
    "motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal", "stop light",
    "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball", "baseball bat", "baseball glove",
    "tennis racket", "wine glass", "hot dog", "cell phone", "mobile phone", "teddy bear", "hair drier",
    "potted plant", "bow tie", "laptop computer", "stove top oven", "home plate", "train track")}
REFERENCE_DOUBLE_WORDS.update({f"{q} {a}": a for a in _ANIMALS for q in ("baby", "adult")})
REFERENCE_DOUBLE_WORDS.update({"passenger jet": "jet", "passenger train": "train", "bow tie": "tie",
                               "toilet seat": "toilet", "wine glas": "wine glass"})


def read_synonym_lines(path: str | Path, mode: str = "reference") -> list[list[str]]:
    """The synonym list: one class a line, the class first. reference: strip, split on ', '."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"synonym list '{path}' does not exist: pass --synonyms FILE (the reference "
                                f"CHAIR release's data/synonyms.txt: one class a line, the class first, "
                                f"comma separated).")
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if mode == "reference":
            entries = line.strip().split(", ")
        else:
            entries = [e.strip().lower() for e in line.split(",") if e.strip()]
        if entries and entries[0]:
            lines.append(entries)
    if not lines:
        raise BadInput("no_synonyms", f"{path}: no synonym lines found (one class a line, comma separated).")
    return lines


class CocoChair:
    """The caption rules of the reference CHAIR script (`mode`: reference or corrected)."""

    def __init__(self, synonyms_path: str | Path, mode: str = "reference"):
        if mode not in MODES:
            raise ValueError(f"CHAIR mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.synonyms_path = Path(synonyms_path)
        self.inverse: dict[str, str] = {}          # surface word -> class (the later line wins)
        for entries in read_synonym_lines(synonyms_path, mode):
            for e in entries:
                self.inverse[e] = entries[0]
        self.classes = sorted(set(self.inverse.values()))
        self.double = dict(REFERENCE_DOUBLE_WORDS)
        self.span = 2
        if mode == "corrected":
            for e in self.inverse:
                if " " in e:
                    self.double.setdefault(e, e)
            self.span = max(len(k.split()) for k in self.double)
            self._vocab = {e for e in self.inverse if " " not in e}

    def _singular(self, tok: str) -> str:
        if self.mode == "reference":
            return singularize(tok)
        if tok in self._vocab:
            return tok
        s = singularize(tok)
        if s in self._vocab:
            return s
        for cand in (tok[:-1] if tok.endswith("s") else None, tok[:-2] if tok.endswith("es") else None,
                     tok[:-3] + "f" if tok.endswith("ves") else None, tok[:-3] + "fe" if tok.endswith("ves") else None):
            if cand and cand in self._vocab:
                return cand
        return s

    def words(self, caption: str) -> list[str]:
        """The caption's tokens after singularising and merging multi-word objects and rules."""
        raw = word_tokenize((caption or "").lower())
        sing = [self._singular(t) for t in raw]
        out, i = [], 0
        while i < len(sing):
            for n in range(self.span, 1, -1):
                key = " ".join(sing[i:i + n])
                if self.mode == "corrected" and key not in self.double:
                    key = " ".join(raw[i:i + n])
                if len(sing) - i >= n and key in self.double:
                    out.append(self.double[key])
                    i += n
                    break
            else:
                out.append(sing[i])
                i += 1
        if "toilet" in out and "seat" in out:      # 'the seat of the toilet' is no chair
            out = [w for w in out if w != "seat"]
        return out

    def mentions(self, caption: str) -> list[tuple[str, str]]:
        """(word, class) for every object mention, in order, repeats included."""
        return [(w, self.inverse[w]) for w in self.words(caption) if w in self.inverse]

    def category_class(self, name: str, source: str) -> str:
        """The class of a COCO category name (reference: must be a synonym entry)."""
        if name in self.inverse:
            return self.inverse[name]
        if self.mode == "corrected":
            return self.inverse.get(name.strip().lower(), name.strip().lower())
        raise BadInput("unknown_category", f"{source}: category '{name}' is not in the synonym list "
                                           f"{self.synonyms_path}; the reference script needs every COCO "
                                           f"category there (use the reference synonyms.txt, or --chair-mode "
                                           f"corrected to keep unknown categories as their own class).")


# ------------------------------------------------------------------------------ COCO ground truth


def _load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise BadInput("bad_json", f"{path}: not valid JSON ({e.msg} at line {e.lineno}); re-download the "
                                   f"COCO 2014 annotations.") from None


def check_annotation_dir(ann_dir: str | Path) -> Path:
    """The folder must hold the four COCO 2014 files the reference reads."""
    ann_dir = Path(ann_dir)
    missing = [f for f in ANNOTATION_FILES if not (ann_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(f"COCO annotation folder '{ann_dir}' lacks {', '.join(missing)}: CHAIR needs "
                                f"instances_{{train,val}}2014.json and captions_{{train,val}}2014.json (COCO's "
                                f"annotations_trainval2014.zip, folder annotations/); pass that folder.")
    return ann_dir


def coco_ground_truth(ann_dir: str | Path, image_ids, chair: CocoChair, *, source: str = "captions") -> dict[int, set]:
    """image id -> ground-truth classes (instances + reference captions, train and val 2014).

    Every id must be an image of the annotation files; `source` names the file the ids came from.
    """
    ann_dir = check_annotation_dir(ann_dir)
    wanted = set(image_ids)
    gt: dict[int, set] = {i: set() for i in wanted}
    known: set[int] = set()
    for split in ("train", "val"):
        path = ann_dir / f"instances_{split}2014.json"
        inst = _load_json(path)
        known.update(im["id"] for im in inst.get("images", []))
        names = {c["id"]: c["name"] for c in inst.get("categories", [])}
        for ann in inst.get("annotations", []):
            if ann["image_id"] in wanted:
                if ann["category_id"] not in names:
                    raise BadInput("unknown_category", f"{path}: annotation {ann.get('id')} has category_id "
                                                       f"{ann['category_id']}, which its categories list lacks.")
                gt[ann["image_id"]].add(chair.category_class(names[ann["category_id"]], str(path)))
        del inst
    for split in ("train", "val"):
        caps = _load_json(ann_dir / f"captions_{split}2014.json")
        known.update(im["id"] for im in caps.get("images", []))
        for ann in caps.get("annotations", []):
            if ann["image_id"] in wanted:
                gt[ann["image_id"]].update(c for _, c in chair.mentions(ann["caption"]))
    absent = sorted(wanted - known)
    if absent:
        more = f" and {len(absent) - 1} more" if len(absent) > 1 else ""
        raise BadInput("unknown_image", f"{source}: image_id {absent[0]}{more} is not an image of the COCO 2014 "
                                        f"annotations in {ann_dir}; use COCO 2014 image ids (the number in "
                                        f"COCO_val2014_<id>.jpg) or the annotation folder they come from.")
    return gt


# ------------------------------------------------------------------------------ captions and scores

_FINISHED = re.compile(r"[.!?][\"')\]*»”’]*\s*$")


def _image_id(value, path, n):
    if isinstance(value, bool):
        value = None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(?:COCO_(?:val|train)2014_)?0*(\d+)(?:\.jpg)?\s*", value)
        if m:
            return int(m.group(1))
    raise BadInput("bad_image_id", f"{path}: record {n} has image_id {value!r}; give the COCO image id as an "
                                   f"integer (e.g. 391895 for COCO_val2014_000000391895.jpg).")


def read_captions(path: str | Path) -> list[dict]:
    """``{"image_id", "caption"}`` records from a JSON list or JSONL file (other keys are kept).

    An optional ``finish_reason`` ("length" = cut at the token limit, as vLLM and OpenAI-style
    outputs write it) or ``hit_token_limit`` (bool) lets the scores count truncated captions.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"caption file '{path}' does not exist.")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise BadInput("bad_json", f"{path}: not valid JSON ({e.msg} at line {e.lineno}).") from None
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise BadInput("bad_json", f"{path}:{n}: malformed JSON line ({e.msg}); the file must be a "
                                               f"JSON list or JSONL of {{\"image_id\", \"caption\"}}.") from None
    out = []
    for n, r in enumerate(rows, 1):
        if not isinstance(r, dict) or "image_id" not in r or not isinstance(r.get("caption"), str):
            raise BadInput("bad_record", f"{path}: record {n} is not {{\"image_id\": <int>, \"caption\": <str>}} "
                                         f"(got {str(r)[:80]}); rename your fields to image_id and caption.")
        out.append({**r, "image_id": _image_id(r["image_id"], path, n)})
    if not out:
        raise BadInput("no_captions", f"{path}: no captions found.")
    return out


def _hit_limit(rec: dict):
    if "hit_token_limit" in rec:
        return bool(rec["hit_token_limit"])
    if "finish_reason" in rec:
        return rec["finish_reason"] == "length"
    return None


def score_captions(records: list[dict], gt: dict[int, set], chair: CocoChair) -> dict:
    """CHAIR_S, CHAIR_I, recall, length and truncation over caption records, and per caption."""
    from csr.eval.chair import tokenize

    per, n_hall_caps, n_mentions, n_hall, n_gt, n_cov, n_words = [], 0, 0, 0, 0, 0, 0
    hits = [_hit_limit(r) for r in records]
    for r in records:
        truth = gt[r["image_id"]]
        mentions = chair.mentions(r["caption"])
        hallucinated = [[w, c] for w, c in mentions if c not in truth]
        covered = sorted({c for _, c in mentions if c in truth})
        n_hall_caps += bool(hallucinated)
        n_mentions += len(mentions)
        n_hall += len(hallucinated)
        n_gt += len(truth)
        n_cov += len(covered)
        words = len(tokenize(r["caption"]))
        n_words += words
        per.append({"image_id": r["image_id"], "caption": r["caption"], "mentioned": [[w, c] for w, c in mentions],
                    "hallucinated": hallucinated, "ground_truth": sorted(truth), "covered": covered, "n_words": words})
    n = len(records)
    return {"mode": chair.mode,
            "chair_s": n_hall_caps / n if n else 0.0, "chair_i": n_hall / n_mentions if n_mentions else 0.0,
            "recall": n_cov / n_gt if n_gt else 0.0, "n_captions": n, "n_mentions": n_mentions,
            "n_hallucinated": n_hall, "n_ground_truth": n_gt, "n_covered": n_cov,
            "mentions_per_caption": n_mentions / n if n else 0.0, "words_per_caption": n_words / n if n else 0.0,
            "n_hit_token_limit": None if any(h is None for h in hits) else sum(hits),
            "n_unfinished": sum(not _FINISHED.search(r["caption"]) for r in records),
            "per_caption": per}


def score_caption_file(captions_path, annotations_dir, synonyms_path=None, mode: str = "reference") -> dict:
    """CHAIR of a caption file from any tool against COCO 2014 annotations (no model)."""
    check_annotation_dir(annotations_dir)
    synonyms_path = Path(synonyms_path) if synonyms_path else Path(annotations_dir) / "synonyms.txt"
    chair = CocoChair(synonyms_path, mode)
    records = read_captions(captions_path)
    gt = coco_ground_truth(annotations_dir, [r["image_id"] for r in records], chair, source=str(captions_path))
    out = score_captions(records, gt, chair)
    out["inputs"] = {"captions": str(captions_path), "annotations": str(annotations_dir),
                     "synonyms": str(synonyms_path)}
    return out
