"""The classifier's cue tables, read from `cues.toml` beside this module (data, not code).

The file's shapes, and what each becomes here:
- `languages`: the languages that translation phrases and patterns name;
- `[[cues.CATEGORY]]` / `[[chat_cues.CATEGORY]]`: a `weight` and its `words` (words,
  phrases of up to four words, or prefix stems ending in "*"). In a word, `{lang}` stands
  for each language and `{a}` ... `{b}` for each ordered pair of different languages;
- `wh_first`, `yesno_first`: interrogative first words;
- `[[cjk]]`: a category, a weight and `substrings` for scripts without spaces;
- `[[patterns]]`: a category, weight, cap, `gate` (substrings one of which must be in the
  text; "digits" for any digit; absent: always run), `lower` and a `regex`, in which
  `{languages}` stands for the alternation of the languages.
"""

from __future__ import annotations

import functools
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

CUES_FILE = "cues.toml"
DIGITS = tuple("0123456789")
ALWAYS = ("",)  # the empty substring is in every text

Tiers = Mapping[str, tuple[tuple[float, tuple[str, ...]], ...]]


@dataclass(frozen=True, slots=True)
class Cues:
    languages: tuple[str, ...]
    cues: Tiers
    chat_cues: Tiers
    wh_first: frozenset[str]
    yesno_first: frozenset[str]
    cjk: tuple[tuple[str, float, str], ...]  # (category, weight, "a|b|...")
    # (category, weight, cap, gate substrings, lower, regex)
    patterns: tuple[tuple[str, float, int, tuple[str, ...], bool, str], ...]


@functools.cache
def load_cues() -> Cues:
    """The tables of the installed `cues.toml` (read once: they never change)."""
    text = resources.files(__package__).joinpath(CUES_FILE).read_text(encoding="utf-8")
    return parse_cues(tomllib.loads(text))


def parse_cues(doc: Mapping[str, Any]) -> Cues:
    """The tables of a parsed cues file; ValueError where it is not one."""
    try:
        languages = tuple(str(x) for x in doc["languages"])
        alternation = "|".join(languages)
        return Cues(
            languages=languages,
            cues=_tiers(doc["cues"], languages),
            chat_cues=_tiers(doc["chat_cues"], languages),
            wh_first=frozenset(doc["wh_first"]),
            yesno_first=frozenset(doc["yesno_first"]),
            cjk=tuple(
                (str(c["category"]), float(c["weight"]), "|".join(c["substrings"]))
                for c in doc["cjk"]
            ),
            patterns=tuple(
                (
                    str(p["category"]),
                    float(p["weight"]),
                    int(p["cap"]),
                    _gate(p.get("gate")),
                    bool(p.get("lower", False)),
                    str(p["regex"]).replace("{languages}", alternation),
                )
                for p in doc["patterns"]
            ),
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{CUES_FILE}: not a cue table ({exc!r})") from None


def _tiers(table: Mapping[str, Any], languages: tuple[str, ...]) -> Tiers:
    return {
        category: tuple(
            (float(t["weight"]), tuple(_expand(str(w), languages) for w in t["words"]))
            for t in tiers
        )
        for category, tiers in table.items()
    }


def _expand(word: str, languages: tuple[str, ...]) -> str:
    """A word with `{a}`/`{b}` or `{lang}` as the "|"-joined words it stands for."""
    if "{a}" in word:
        return "|".join(
            word.replace("{a}", a).replace("{b}", b) for a in languages for b in languages if a != b
        )
    if "{lang}" in word:
        return "|".join(word.replace("{lang}", lang) for lang in languages)
    return word


def _gate(value: Any) -> tuple[str, ...]:
    if value is None:
        return ALWAYS
    if value == "digits":
        return DIGITS
    return tuple(str(g) for g in value)
