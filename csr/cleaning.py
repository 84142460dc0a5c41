"""Which tree nodes may enter a preference pair: the short-sentence rule and the cleaning filters.

Both drop a node *with its whole subtree*, before any reward is ranked (the official score step
cleans the tree, then skips children shorter than 4 characters, then ranks the survivors), so a
dropped sentence can never be silently cut out of a path that then ends at a node that was never
final. `dropped_nodes` is the one entry point; the score stage ranks siblings among the survivors
and the pairs stage builds paths from them.

Cleaning modes (`pairs.cleaning`):
- official: the released code's filters, exactly. The checked text is the new sentence stripped,
  then with every character outside its allowed set removed (so its emoji check never fires: emoji
  are removed first). A node is dropped for 6 or more identical words in a row (case-sensitive),
  11 or more occurrences of one character with only whitespace between them (which covers 11
  spaces), 10 apostrophes in a row, two '&nbsp;' in a row, more than 5 newlines, or Korean (Hangul
  compatibility jamo and syllables), Japanese kana or Cyrillic.
- strict (csr's default): runs of more than `max_repeats` identical words (any case) or
  non-space characters, more than `max_newlines` newlines in the sentence or in the whole
  response, and, with `drop_unexpected_scripts`, Hangul (jamo too), kana, Cyrillic and emoji.
  Stricter than the official filters at the default 4, and tunable.
- none: no filter (the short-sentence rule still applies unless `min_sentence_chars` is 0).
"""

from __future__ import annotations

import re

from csr.tree_format import is_end_marker

CLEANING_MODES = ("official", "strict", "none")
STRICT_ONLY_KEYS = ("max_repeats", "max_newlines", "drop_unexpected_scripts")

# -- official ---------------------------------------------------------------------------------

# The characters the official `clean_text` keeps; everything else is removed before the checks.
# Its `\"-(` is a range ('"' through '('), so '#', '$', '%', '&' and "'" are kept too.
_OFFICIAL_REMOVED = re.compile(r"[^\w\s.,?!;:\'\"-()/\[\]{}+$€£*=/><==!%°^™©®♫♪π√]+")
_OFFICIAL_SCRIPT = re.compile(
    "[\u3130-\u318f\uac00-\ud7af"   # Hangul compatibility jamo, Hangul syllables
    "\u3040-\u309f\u30a0-\u30ff"    # Hiragana, Katakana
    "\u0400-\u04ff]"                # Cyrillic
)
_OFFICIAL_NBSP = re.compile(r"(&nbsp;){2,}")
_OFFICIAL_WORD_RUN = re.compile(r"(\b\w+\b)(?:\s+\1){5,}")       # 6+ identical words
_OFFICIAL_CHAR_RUN = re.compile(r"(.)(?:\s*\1){10}")              # 11 of one character, spaces between
_OFFICIAL_LITERALS = ("'" * 10,)  # its other literal patterns are special cases of the character run


def official_visible_text(text: str) -> str:
    """The new sentence as the official filters see it: stripped, then disallowed characters removed."""
    return _OFFICIAL_REMOVED.sub("", text.strip())


def official_drop_reason(text: str) -> str | None:
    seen = official_visible_text(text)
    if _OFFICIAL_SCRIPT.search(seen):
        return "unexpected_script"
    if _OFFICIAL_NBSP.search(seen):
        return "nbsp"
    if (_OFFICIAL_WORD_RUN.search(seen) or _OFFICIAL_CHAR_RUN.search(seen)
            or any(lit in seen for lit in _OFFICIAL_LITERALS)):
        return "repeats"
    if seen.count("\n") > 5:
        return "too_many_newlines"
    return None


# -- strict -----------------------------------------------------------------------------------

_STRICT_SCRIPT = re.compile(
    "[\u1100-\u11ff\u3130-\u318f\uac00-\ud7af"   # Hangul
    "\u3040-\u30ff\u31f0-\u31ff"                   # Hiragana, Katakana
    "\u0400-\u04ff"                                # Cyrillic
    "\U0001f300-\U0001faff\u2600-\u27bf]"          # emoji and symbols
)


def has_repeats(text: str, max_repeats: int) -> bool:
    """A run of more than `max_repeats` identical words (any case), or of identical non-space characters."""
    if re.search(r"(\S)\1{%d,}" % max_repeats, text):
        return True
    words = text.lower().split()
    run = 1
    for a, b in zip(words, words[1:]):
        run = run + 1 if a == b else 1
        if run > max_repeats:
            return True
    return False


def strict_drop_reason(text: str, cfg) -> str | None:
    if text.count("\n") > cfg.max_newlines:
        return "too_many_newlines"
    if has_repeats(text, cfg.max_repeats):
        return "repeats"
    if cfg.drop_unexpected_scripts and _STRICT_SCRIPT.search(text):
        return "unexpected_script"
    return None


# -- one entry point --------------------------------------------------------------------------


def node_drop_reason(text: str, cfg) -> str | None:
    """Why one sentence is dropped under `cfg` (a PairsConfig), or None."""
    if cfg.cleaning == "official":
        reason = official_drop_reason(text)
        checked = official_visible_text(text)
    elif cfg.cleaning == "strict":
        reason = strict_drop_reason(text, cfg)
        checked = text.strip()
    elif cfg.cleaning == "none":
        reason, checked = None, text.strip()
    else:
        raise ValueError(f"unknown pairs.cleaning '{cfg.cleaning}' ({', '.join(CLEANING_MODES)})")
    if reason is None and len(checked) < cfg.min_sentence_chars:
        reason = "short_sentence"
    return reason


def dropped_nodes(nodes: list[dict], cfg) -> dict[int, str]:
    """{node id: reason} for every node dropped, itself or through an ancestor ('ancestor_dropped').

    End markers (`is_end_marker`) are never dropped for being short. Parents come before their
    children in a tree's node list, so one pass suffices.
    """
    dropped: dict[int, str] = {}
    for n in nodes[1:]:
        if is_end_marker(n):
            if n["parent"] in dropped:
                dropped[n["id"]] = "ancestor_dropped"
            continue
        if n["parent"] in dropped:
            dropped[n["id"]] = "ancestor_dropped"
        else:
            reason = node_drop_reason(n["text"], cfg)
            if reason:
                dropped[n["id"]] = reason
    return dropped


def response_too_many_newlines(response: str, cfg) -> bool:
    """strict only: the whole response's newline count (the official code checks sentences alone)."""
    return cfg.cleaning == "strict" and response.count("\n") > cfg.max_newlines
