"""VIG samples from data files: LLaVA conversations, prompt/answer records and TRL's conversational
prompt-completion records, read into {id, image, prompt, answer[, turns, text_only]}.

Conversations (docs/method.md §3: LLaVA-665K is multi-turn, and text-only samples stay in)
-----------------------------------------------------------------------------------------
A record may hold several human/assistant turns (LLaVA's ``conversations``). With ``turns=all``
(the paper's reading, default) every assistant turn is an answer: VIG_t is computed on the tokens
of all of them, in order, each in the context of the turns before it, and the sample VIG is their
mean; ``turns=first`` reads the first human/assistant pair only (the toolkit's earlier behaviour).
Single-turn records with an image are collated by TRL's own collator (`csr.vig.collate`); multi-turn and
text-only records by `ConversationCollator`, which cuts the chat-template rendering at every
assistant turn and labels exactly the assistant segments (for a single-turn record it gives TRL's
tokens and labels, checked by a test). A record without an image is kept as a *text-only* sample
(``text_only=keep``, the paper's: no VIG, kept and supervised in full by selective training) or
skipped (``text_only=skip``). A record without any assistant turn is skipped; a trailing human turn
with no answer is dropped. All of these are counted in the stage summary.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from csr.data import (BadInput, image_root_of, message_text, read_raw_records, resolve_image_path, skip_record,
                      strip_image_token)

TURN_MODES = ("all", "first")
TEXT_ONLY_MODES = ("keep", "skip")
PROMPT_KEYS = ("prompt", "input", "question")
ANSWER_KEYS = ("answer", "response", "output", "completion")
HUMAN_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")


def record_turns(rec: dict) -> list[dict]:
    """A record's turns [{prompt, answer}, ...]: its `turns`, else its one prompt and answer."""
    return rec.get("turns") or [{"prompt": rec["prompt"], "answer": rec["answer"]}]


def _conversation_turns(convs: list, notes: list) -> list[dict]:
    """[{prompt, answer}] from LLaVA's alternating human/gpt list; irregularities noted in `notes`."""
    turns, pending = [], None
    for c in convs:
        if not isinstance(c, dict):
            notes.append("malformed_turn_dropped")
            continue
        role = c.get("from", c.get("role"))
        value = c.get("value", c.get("content"))
        if isinstance(value, list):
            value = message_text([c])
        if role in HUMAN_ROLES:
            if pending is not None:           # two human turns in a row: one question
                notes.append("consecutive_human_turns_joined")
                pending = pending + "\n" + (value or "")
            else:
                pending = value or ""
        elif role in ASSISTANT_ROLES:
            if pending is None:
                notes.append("assistant_turn_without_question_dropped")
            elif not isinstance(value, str) or not value.strip():
                notes.append("empty_assistant_turn_dropped")
                pending = None
            else:
                turns.append({"prompt": pending, "answer": value})
                pending = None
        else:
            notes.append("turn_with_unknown_role_dropped")
    if pending is not None:
        notes.append("trailing_human_turn_dropped")
    return turns


def parse_record(raw: dict, index: int, turns: str = "all", text_only: str = "keep") -> dict:
    """{id, image, prompt, answer[, turns, text_only, notes]} from one input record; raises BadInput with a reason.

    Accepted: {image, prompt|input|question, answer|response|output|completion} (the world's
    train/sft.jsonl), LLaVA's {image, conversations: [{from: human}, {from: gpt}, ...]} and TRL's
    conversational prompt/completion with `images`. `turns`: all (every human/assistant pair of a
    conversation; the paper's) or first. `text_only`: keep (a record with no image is a text-only
    sample, image None; the paper's) or skip (BadInput no_image). `prompt` / `answer` are the first
    turn's; `turns` is present when there is more than one; `notes` lists dropped or joined turns.
    """
    if turns not in TURN_MODES:
        raise ValueError(f"turns={turns!r} is not one of {TURN_MODES}")
    if text_only not in TEXT_ONLY_MODES:
        raise ValueError(f"text_only={text_only!r} is not one of {TEXT_ONLY_MODES}")
    rid = str(raw.get("id", index))
    notes: list[str] = []
    if isinstance(raw.get("conversations"), list):
        pairs = _conversation_turns(raw["conversations"], notes)
    else:
        prompt = answer = None
        for k in PROMPT_KEYS:
            if k in raw:
                prompt = raw[k]
                break
        for k in ANSWER_KEYS:
            if k in raw:
                answer = raw[k]
                break
        if isinstance(prompt, list):
            prompt = message_text(prompt)
        if isinstance(answer, list):
            answer = message_text(answer)
        if not isinstance(prompt, str) or not strip_image_token(prompt):
            raise BadInput("no_prompt", f"record '{rid}' has no prompt ({'/'.join(PROMPT_KEYS)} or conversations).")
        if not isinstance(answer, str) or not answer.strip():
            raise BadInput("no_answer", f"record '{rid}' has no answer ({'/'.join(ANSWER_KEYS)} or conversations).")
        pairs = [{"prompt": prompt, "answer": answer}]
    pairs = [{"prompt": strip_image_token(t["prompt"] or ""), "answer": t["answer"].strip()}
             for t in pairs]
    if pairs and not pairs[0]["prompt"]:
        raise BadInput("no_prompt", f"record '{rid}' has no question before its first answer.")
    if not pairs:
        raise BadInput("no_answer", f"record '{rid}' has no assistant turn.")
    if turns == "first" and len(pairs) > 1:
        notes.append(f"later_turns_not_read:{len(pairs) - 1}")
        pairs = pairs[:1]
    image = raw.get("image")
    if image is None and isinstance(raw.get("images"), list) and raw["images"]:
        image = raw["images"][0]
    if not isinstance(image, str) or not image:
        if text_only == "skip":
            raise BadInput("no_image", f"record '{rid}' has no image path.")
        image = None
    rec = {"id": rid, "image": image, "prompt": pairs[0]["prompt"], "answer": pairs[0]["answer"]}
    if len(pairs) > 1:
        rec["turns"] = pairs
    if image is None:
        rec["text_only"] = True
    if notes:
        rec["notes"] = notes
    return rec


def read_records(path: str | Path, image_root: str | Path | None = None, limit: int | None = None,
                 summary=None, turns: str = "all", text_only: str = "keep") -> list[dict]:
    """VIG samples of a data file (`csr.data.read_raw_records`: JSON list, JSONL or ``datasets`` folder);
    images resolved against `image_root`, else the file's folder (`csr.data.resolve_image_path`).

    With a `summary` (`csr.io.StageSummary`), skipped records are counted by reason and
    `summary.extra["records"]` counts text-only samples, multi-turn samples, turns read, and turns
    dropped or joined (by reason).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file '{path}' does not exist.")
    root = image_root_of(path, image_root)
    out, seen = [], set()
    counts: Counter = Counter()
    for i, raw in enumerate(read_raw_records(path)):
        try:
            rec = parse_record(raw, i, turns=turns, text_only=text_only)
            if rec["id"] in seen:
                raise BadInput("duplicate_id", f"id '{rec['id']}' appears more than once; later copy skipped.")
        except BadInput as e:
            skip_record(summary, e.reason, f"record {i} ({e})")
            continue
        if rec["image"] is not None:
            rec["image"] = str(resolve_image_path(rec["image"], root, allow_absolute=True, resolve=False,
                                                  record=f"'{rec['id']}'"))
        for k in ("kind", "category"):
            if k in raw and isinstance(raw[k], (str, int, float)):
                rec[k] = raw[k]
        for note in rec.pop("notes", []):
            counts[note] += 1
        counts["text_only_kept"] += int(rec.get("text_only", False))
        counts["multi_turn"] += int("turns" in rec)
        counts["turns_read"] += len(record_turns(rec))
        seen.add(rec["id"])
        out.append(rec)
        if limit is not None and len(out) >= limit:
            break
    if summary is not None:
        summary.extra["records"] = {"turns": turns, "text_only": text_only, **dict(counts)}
    return out
