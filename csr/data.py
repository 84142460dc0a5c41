"""Records and images: the one reader of data files and the one resolver of a record's image path.

`read_raw_records` reads any data file the toolkit takes (prompt, evaluation and VIG files): a JSON
list, JSONL, or a folder saved by ``datasets``. `resolve_image_path` turns a record's image field into
a file (against an image root, through an optional pattern); `image_root_of` is the root a data
file's relative image paths start from when none is given (the file's own folder), and
`record_image_paths` resolves every record of an evaluation file. `message_text` reads a TRL
conversational field (a pair's prompt / chosen / rejected) back to text; `strip_image_token` removes
the ``<image>`` placeholder (`IMAGE_TOKEN`).

Accepted prompt files (one record per (image, prompt)):
- the official CSR JSON list: ``[{"id", "image", "input"}]`` with ``<image>`` inside ``input``
  (as in CSR-Prompt-Dataset-12k.json, whose ``image`` is a bare COCO file id: set
  ``data.image_pattern: "COCO_train2014_{image}"``);
- JSONL with the same keys, or ``prompt`` instead of ``input``;
- a folder saved by ``datasets`` (``save_to_disk``) with the same columns.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

# The image placeholder of the prompt files (LLaVA's; the official CSR data writes it in every prompt).
IMAGE_TOKEN = "<image>"


@dataclass(frozen=True)
class PromptRecord:
    id: str
    image: str      # path of the image file (resolved against image_root)
    prompt: str     # the user question with any <image> placeholder removed


class BadInput(ValueError):
    """One record that cannot be used; `reason` is a short key counted in the stage summary."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def strip_image_token(text: str, processor=None) -> str:
    """`text` without image placeholders, stripped: the data's '<image>' and, with a processor, the
    model's own image token (`csr.models.image_token_text`)."""
    tokens = {IMAGE_TOKEN}
    if processor is not None:
        from csr.models import image_token_text

        tokens.add(image_token_text(processor))
    for token in tokens:
        text = text.replace(token, "")
    return text.strip()


def message_text(messages) -> str:
    """The plain text of a TRL conversational field (a pair's prompt, chosen or rejected; a chat
    record's prompt or completion): the messages' string contents and text parts joined, image parts
    skipped. A string is returned as it is (TRL's standard, non-conversational format)."""
    if isinstance(messages, str):
        return messages
    parts = []
    for m in messages:
        c = m.get("content")
        if isinstance(c, str):
            parts.append(c)
        elif isinstance(c, list):
            parts.extend(x.get("text", "") for x in c if isinstance(x, dict) and x.get("type") == "text")
    return "".join(parts)


def read_raw_records(path: str | Path) -> list:
    """The records of a data file as read, fields unchecked: a JSON list, JSONL (one record a line,
    blank lines skipped) or a folder saved by ``datasets``. Text that is not UTF-8 or not JSON is an
    error naming the file (and the line)."""
    path = Path(path)
    if path.is_dir():
        from datasets import load_from_disk

        return [dict(r) for r in load_from_disk(str(path))]
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (bad byte at offset {e.start}); re-save the file as UTF-8.") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}).") from None
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: malformed JSON line ({e.msg}); fix or delete that line.") from None
    return records


def check_image_pattern(pattern: str) -> None:
    """`data.image_pattern` may name only the record's image field ({image})."""
    import string

    fields = [f for _, f, _, _ in string.Formatter().parse(pattern) if f is not None]
    unknown = [f for f in fields if f != "image"]
    if unknown:
        raise ValueError(f"data.image_pattern={pattern!r} names {{{unknown[0]}}}; only {{image}} (the record's image "
                         f"field) can be used, e.g. 'COCO_train2014_{{image}}'.")


def image_root_of(data_path: str | Path, image_root: str | Path | None = None) -> Path:
    """The folder a data file's relative image paths start from: `image_root` when given, else the
    file's own folder (a ``datasets`` folder: itself)."""
    if image_root:
        return Path(image_root)
    data_path = Path(data_path)
    return data_path if data_path.is_dir() else data_path.parent


def resolve_image_path(image_field, image_root: str | Path | None, pattern: str = "{image}",
                       allow_absolute: bool = False, *, record: str | None = None, resolve: bool = True) -> Path:
    """The file a record's image field names: `pattern` filled with it, taken as is when absolute,
    else under `image_root` (default: the working folder).

    Names that leave the root are refused unless `allow_absolute` (prompt files: the run's data stay
    under data.image_root; evaluation files name their images freely). `resolve`: the absolute,
    normalised path (else the root joined with the name, as given). `record` names the record in
    the error of a missing or outside image field (default: the field itself).
    """
    where = f"record {record}: " if record is not None else ""
    if not isinstance(image_field, str) or not image_field:
        raise BadInput("no_image", f"{where}no 'image' field (got {image_field!r}); give each record the file name "
                                   f"of its image, relative to the image root or absolute.")
    name = pattern.format(image=image_field)
    candidate = Path(name)
    joined = candidate if candidate.is_absolute() else Path(image_root or ".") / candidate
    path = joined.resolve()
    if not allow_absolute:
        root = Path(image_root or ".").resolve()
        if root not in path.parents and path != root:
            raise BadInput("image_outside_root",
                           f"{where}image '{image_field}' resolves outside the image root '{root}'; move the image "
                           f"under the root, or set data.allow_absolute_image_paths=true if that is intended.")
    return path if resolve else joined


def record_image_paths(records: list[dict], data_path: str | Path, image_root: str | Path | None = None
                       ) -> list[Path]:
    """Each record's image file in an evaluation file (POPE, CHAIR, multiple choice): its ``image``,
    absolute or relative to `image_root`, else to the file's folder (`image_root_of`). A record
    without one is an error naming the file and the record."""
    root = image_root_of(data_path, image_root)
    return [resolve_image_path(r.get("image") if isinstance(r, dict) else None, root, allow_absolute=True,
                               resolve=False, record=f"{data_path}:{n}") for n, r in enumerate(records, 1)]


def skip_record(summary, reason: str, what: str) -> None:
    """A record skipped by a reader: counted (and logged) in `summary` (a `csr.io.StageSummary`), or
    logged when the caller keeps none."""
    if summary is not None:
        summary.skip(reason, what)
    else:
        log.warning("skipped %s: %s", what, reason)


def load_prompts(path: str | Path, image_root: str = "", pattern: str = "{image}",
                 max_prompts: int | None = None, allow_absolute: bool = False,
                 summary=None, max_prompt_chars: int = 4000) -> list[PromptRecord]:
    """Read a prompt file into records; bad records are skipped with a logged reason."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"prompt file '{path}' does not exist (data.prompts).")
    check_image_pattern(pattern)
    raws = read_raw_records(path)
    if not isinstance(raws, list):
        raise ValueError(f"{path}: a prompt file is a list of records (or one record a line), not a "
                         f"{type(raws).__name__}.")
    records, seen = [], set()
    for i, raw in enumerate(raws):
        if not isinstance(raw, dict):  # a bare string or number where a record should be
            skip_record(summary, "not_a_record",
                        f"record {i} ({type(raw).__name__}, not an object with id, image and input)")
            continue
        rid = str(raw.get("id", i))
        try:
            if rid in seen:
                raise BadInput("duplicate_id", f"id '{rid}' appears more than once; later copy skipped.")
            text = raw.get("input", raw.get("prompt"))
            if not isinstance(text, str):
                raise BadInput("no_prompt", f"record '{rid}' has no 'input' or 'prompt' string.")
            question = strip_image_token(text)
            if not question:
                raise BadInput("empty_prompt", f"record '{rid}' has an empty prompt.")
            if len(question) > max_prompt_chars:
                raise BadInput("prompt_too_long", f"record '{rid}' has a {len(question)}-character prompt "
                                                  f"(data.max_prompt_chars={max_prompt_chars}).")
            if text.count(IMAGE_TOKEN) > 1:
                raise BadInput("several_image_tokens", f"record '{rid}' holds {text.count(IMAGE_TOKEN)} "
                                                       f"'<image>' placeholders; one image per prompt.")
            if not isinstance(raw.get("image"), str) or not raw["image"]:
                raise BadInput("no_image", f"record '{rid}' has no 'image' field.")
            image = resolve_image_path(raw["image"], image_root, pattern, allow_absolute, record=f"'{rid}'")
        except BadInput as e:
            skip_record(summary, e.reason, f"prompt {rid} ({e})")
            continue
        seen.add(rid)
        records.append(PromptRecord(rid, str(image), question))
        if max_prompts is not None and len(records) >= max_prompts:
            break
    return records


def load_image(path: str | Path) -> Image.Image:
    """Open an image as RGB; missing or unreadable files raise BadInput naming the file."""
    path = Path(path)
    if not path.is_file():
        raise BadInput("missing_image", f"image '{path}' does not exist.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # refuse, don't just warn
            im = Image.open(path)
        with im:
            im.load()  # first frame of an animation
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit greyscale: scale to 8 bits
                im = im.point(lambda v: v / 256).convert("L")
            return im.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadInput("image_too_large", f"image '{path}' is too large to decode safely ({e}).") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise BadInput("corrupt_image", f"image '{path}' cannot be read ({type(e).__name__}: {e}).") from None


def load_tree_images(trees: list[dict], summary) -> tuple[list[dict], list]:
    """(the trees whose image opens, their images); a tree whose image is missing or unreadable is
    skipped with its reason counted in `summary` (a `csr.io.StageSummary`), the rest go on."""
    kept, images = [], []
    for tree in trees:
        try:
            images.append(load_image(tree["image"]))
            kept.append(tree)
        except BadInput as e:
            summary.skip(e.reason, f"tree {tree['id']} ({e})")
    return kept, images


def as_rgb_image(image) -> Image.Image:
    """A PIL image as RGB, or the image file a path names (`load_image`)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    return load_image(image)
