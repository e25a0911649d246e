"""Prompt categories: a fast keyword and pattern classifier for OpenAI request bodies. Pure.

`PromptClassifier(categories).classify_payload(body)` names the task a request asks for
(`code`, `sql`, `math`, `translation`, `summarization`, `questions` or `other`), so that
energy can be reported per kind of work. It uses no model and no I/O, only `re` and dicts.
The labelling rules it aims at are in tests/data/README.md; the cue tables are data, in
metering/categories/cues.toml (read by cues.py).

How it scores. Each category sums the weights of the cues found:

- words and phrases of up to four words, in several languages ("translate", "traduis",
  "übersetze", "in French", "auf Deutsch", "summarize", "tl;dr", "zusammenfassen",
  "group by", "derivative", "stack trace"), matched as dict lookups on lower-cased tokens,
  plus prefix stems ("summar*"). CJK cues are matched as substrings instead;
- structural patterns: fenced code, `def f(`, `{`/`;`, camelCase, `...Error`, `O(n)`,
  `SELECT`, `orders(id, customer_id, ...)`, `3x + 7`, `x^2`, LaTeX, the numbers of a word
  problem, `English: ... French:`, question marks.

Each cue counts once and each pattern up to a cap. What the text is *about* then saturates:
above `SATURATION_KNEE` only `SATURATION_SLOPE` of the score counts. This way a pasted
changelog that names ten tools cannot outvote the one word that says "summarize". The cues
that say what to *do* are added after saturation:

- the instruction line before or after a paste (its word cues count `INSTRUCTION_WEIGHT`
  times more);
- greetings and thanks, only in a text of at most `CHAT_MAX_CHARS`;
- an interrogative first word ("why", "pourquoi", "wie", ...) for `questions`;
- `LONG_TEXT_BONUS` for `summarization` when the text is long.

The best score wins if it reaches `MIN_SCORE`, otherwise the result is `other`.

Ties. Equal scores go to the category that comes first in `PRIORITY`, so the more specific
task wins: translation, summarization, sql, code, math, questions, other. A winner that is
not in the configured set becomes `other`. It does not fall back to the runner-up: a SQL
prompt is not a code prompt just because "sql" is not configured.

What is read, and so the cost bound (the shapes of metering/accounting/prompt_text.py):
- chat, Anthropic messages, Responses items: the system/developer messages among the first
  `MAX_MESSAGES_SCANNED` messages (and Anthropic's `system`, Responses' `instructions`),
  and the last user message among the last `MAX_MESSAGES_SCANNED`;
- completions: `prompt`; embeddings, pooling, classification, Responses: `input` (with
  the `instructions`); Cohere-style embed: `texts`;
- rerank: the `query`; score: `text_1` or `queries` (what the documents are scored for:
  the task, where the documents are material);
- at most `MAX_PARTS` text parts or strings of each.

Each part is cut to its first `PART_HEAD_CHARS` and last `PART_TAIL_CHARS` characters. The
joined user text is cut to its first `USER_HEAD_CHARS` and last `USER_TAIL_CHARS`, and the
system text to its first `SYSTEM_MAX_CHARS`. The tail is kept because the instruction often
comes after a long paste ("... Summarize the above."). When the user text is longer than
`FOCUS_MIN_CHARS`, only its first `FOCUS_HEAD_CHARS` and last `FOCUS_TAIL_CHARS` get the
patterns and full word weight. The middle is most likely pasted material: only its words
are scanned, at `BODY_WEIGHT`. A 1 MB prompt therefore costs about as much as a 10 KB one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from metering.categories.cues import Cues, Tiers, load_cues

DEFAULT_CATEGORIES: tuple[str, ...] = (
    "code",
    "sql",
    "math",
    "translation",
    "summarization",
    "questions",
    "other",
)
FALLBACK: Final = "other"
# Equal scores go to the earlier category: specific tasks before generic ones.
PRIORITY: Final = ("translation", "summarization", "sql", "code", "math", "questions", "other")

PART_HEAD_CHARS: Final = 4096
PART_TAIL_CHARS: Final = 1024
USER_HEAD_CHARS: Final = 6144
USER_TAIL_CHARS: Final = 2048
SYSTEM_MAX_CHARS: Final = 2048
MAX_PARTS: Final = 8  # text parts per message, strings per prompt list, system parts
MAX_MESSAGES_SCANNED: Final = 64
FOCUS_MIN_CHARS: Final = 700
FOCUS_HEAD_CHARS: Final = 300
FOCUS_TAIL_CHARS: Final = 300
BODY_WEIGHT: Final = 0.25
CHAT_MAX_CHARS: Final = 80  # greetings and thanks count only in texts this short
CHAT_MAX_SCORE: Final = 3.0
INSTRUCTION_MIN_CHARS: Final = 200  # a longer multi-line text: its first/last lines again
INSTRUCTION_MAX_CHARS: Final = 200
INSTRUCTION_WEIGHT: Final = 2.5
LONG_TEXT_CHARS: Final = 600
LONG_TEXT_BONUS: Final = 1.5  # summarization: a long text with a short instruction
MIN_SCORE: Final = 1.2
# Diminishing returns: above SATURATION_KNEE only SATURATION_SLOPE of a score counts, so a
# pile of topic words (a pasted changelog names many tools) cannot outvote the one word
# that names the task ("summarize").
SATURATION_KNEE: Final = 4.0
SATURATION_SLOPE: Final = 0.3

_SYSTEM_ROLES: Final = frozenset({"system", "developer"})
_TEXT_PARTS: Final = frozenset({"text", "input_text"})
# Bodies without messages, prompt or input: the field that says what the work is about
# (rerank's query, score's first text or queries, Cohere-style embed's texts).
_TASK_FIELDS: Final = ("query", "text_1", "queries", "texts")

WH_FIRST_WEIGHT: Final = 1.3  # an interrogative first word ("why", "pourquoi", ...)
YESNO_FIRST_WEIGHT: Final = 0.8  # a yes/no question's first word ("is", "kann", ...)

_TOKEN: Final = re.compile(r"[^\W\d_\u3000-\u30ff\u3400-\u9fff\uac00-\ud7af\uff00-\uffef]+|\d+")
_FIRST_WORD: Final = re.compile(r"[^\W\d_]+")


class PromptClassifier:
    """Names the task of a request: one of the configured categories, or "other".

    `categories` must include "other". Categories without cues here are never produced;
    a result outside the configured set becomes "other". Never raises on a payload.
    """

    def __init__(
        self, categories: Iterable[str] = DEFAULT_CATEGORIES, cues: Cues | None = None
    ) -> None:
        configured = frozenset(categories)
        if FALLBACK not in configured:
            raise ValueError("the category set must include 'other' (the fallback)")
        self.categories: frozenset[str] = configured
        # Index in PRIORITY -> the name to report (a non-configured winner becomes other).
        self._report: tuple[str, ...] = tuple(c if c in configured else FALLBACK for c in PRIORITY)
        index = {c: i for i, c in enumerate(PRIORITY)}
        self._questions = index["questions"]
        self._summarization = index["summarization"]
        cues = cues or load_cues()
        self._wh_first, self._yesno_first = cues.wh_first, cues.yesno_first
        self._cues = _CueTable.build(cues.cues, index)
        self._chat_cues = _CueTable.build(cues.chat_cues, index)
        self._patterns: tuple[_Pattern, ...] = tuple(
            _Pattern(re.compile(p), index[cat], w, cap, _any_of(gate), lower)
            for cat, w, cap, gate, lower, p in cues.patterns
        )
        self._cjk: tuple[tuple[re.Pattern[str], int, float], ...] = tuple(
            (re.compile(p), index[cat], w) for cat, w, p in cues.cjk
        )

    # --- public ---------------------------------------------------------------------------

    def classify_text(self, text: str) -> str:
        """The category of one user text."""
        if not isinstance(text, str):
            return FALLBACK
        return self._classify((), [text])

    def classify_payload(self, payload: Any) -> str:
        """The category of a request body of any metered API (chat, completions,
        embeddings, Responses, Anthropic messages, rerank, score, pooling, ...)."""
        try:
            if not isinstance(payload, dict):
                return FALLBACK
            system = _top_system_texts(payload)
            if "messages" in payload:
                return self._classify_chat(payload["messages"], system)
            if "prompt" in payload:
                return self._classify_prompt(payload["prompt"])
            if "input" in payload:
                return self._classify_input(payload["input"], system)
            for key in _TASK_FIELDS:
                if key in payload:
                    return self._classify_prompt(payload[key])
        except Exception:  # a classifier must never fail a request
            return FALLBACK
        return FALLBACK

    # --- payload shapes -------------------------------------------------------------------

    def _classify_chat(self, messages: Any, top_system: Sequence[str] = ()) -> str:
        if not isinstance(messages, list):
            return FALLBACK
        user: list[str] = []
        for msg in reversed(messages[-MAX_MESSAGES_SCANNED:]):
            if isinstance(msg, dict) and msg.get("role") == "user":
                user = _content_texts(msg.get("content"))
                break
        if not user:
            return FALLBACK
        system = list(top_system)
        for msg in messages[:MAX_MESSAGES_SCANNED]:
            if len(system) >= MAX_PARTS:
                break
            if isinstance(msg, dict) and _is_system(msg.get("role")):
                system.extend(_content_texts(msg.get("content")))
        return self._classify(system[:MAX_PARTS], user)

    def _classify_input(self, value: Any, system: Sequence[str]) -> str:
        """`input`: a string or strings (embeddings, pooling, Responses), or Responses'
        items, read as chat messages."""
        if isinstance(value, list) and value and isinstance(value[-1], dict):
            return self._classify_chat(value, system)
        return self._classify_prompt(value, system)

    def _classify_prompt(self, prompt: Any, system: Sequence[str] = ()) -> str:
        if isinstance(prompt, str):
            return self._classify(system, [prompt])
        if isinstance(prompt, list) and prompt:
            head = prompt[:MAX_PARTS]
            if all(isinstance(p, str) for p in head):
                return self._classify(system, head)
        return FALLBACK  # token ids, empty or mixed lists

    # --- scoring --------------------------------------------------------------------------

    def _classify(self, system: Sequence[str], user: Sequence[str]) -> str:
        scores = self._scores(system, user)
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))
        if scores[best] < MIN_SCORE:
            return FALLBACK
        return self._report[best]

    def _scores(self, system: Sequence[str], user: Sequence[str]) -> list[float]:
        """One score per category of PRIORITY.

        What the text is about saturates (`_saturate`); the cues that say what to do with
        it are added on top: the instruction line of a paste, chit-chat in a short text,
        an interrogative first word, and a long text's lean towards summarization.
        """
        scores = [0.0] * len(PRIORITY)
        user_text = _clip("\n".join(_clip(p, PART_HEAD_CHARS, PART_TAIL_CHARS) for p in user))
        stripped = user_text.strip()
        if not stripped:
            return scores
        seen: set[str] = set()
        if len(user_text) > FOCUS_MIN_CHARS:
            focus = user_text[:FOCUS_HEAD_CHARS] + "\n" + user_text[-FOCUS_TAIL_CHARS:]
            body = user_text[FOCUS_HEAD_CHARS:-FOCUS_TAIL_CHARS]
        else:
            focus, body = user_text, ""
        if system:
            sys_text = "\n".join(p[:SYSTEM_MAX_CHARS] for p in system)[:SYSTEM_MAX_CHARS]
            focus = sys_text + "\n" + focus
        self._score_patterns(focus, scores)
        self._score_words(focus, 1.0, scores, seen)
        if body:  # pasted material: its words count a little, its patterns not at all
            self._score_words(body, BODY_WEIGHT, scores, seen)
        scores = [_saturate(x) for x in scores]
        if len(stripped) <= CHAT_MAX_CHARS:
            chat = [0.0] * len(scores)
            self._score_words(stripped, 1.0, chat, set(), self._chat_cues)
            for i, x in enumerate(chat):
                scores[i] += min(x, CHAT_MAX_SCORE)
        elif len(stripped) >= INSTRUCTION_MIN_CHARS and "\n" in stripped:
            # A paste with an instruction line before or after it: the instruction says
            # what to do with the paste, so its cues count again.
            first, _, rest = stripped.partition("\n")
            last = rest.rpartition("\n")[2]
            lines = first[:INSTRUCTION_MAX_CHARS] + "\n" + last[-INSTRUCTION_MAX_CHARS:]
            self._score_words(lines, INSTRUCTION_WEIGHT, scores, set())
        first_word = _FIRST_WORD.search(stripped)
        if first_word is not None:
            word = first_word.group().lower()
            if word in self._wh_first:
                scores[self._questions] += WH_FIRST_WEIGHT
            elif word in self._yesno_first:
                scores[self._questions] += YESNO_FIRST_WEIGHT
        if len(stripped) >= LONG_TEXT_CHARS:
            scores[self._summarization] += LONG_TEXT_BONUS
        return scores

    def _score_patterns(self, text: str, scores: list[float]) -> None:
        """Adds the weights of the structural patterns and CJK cues found in `text`."""
        lower = text.lower()
        for p in self._patterns:
            subject = lower if p.lower else text
            if p.gate.search(subject) is None:
                continue
            n = 0
            for _ in p.regex.finditer(subject):
                n += 1
                if n >= p.cap:
                    break
            scores[p.category] += p.weight * n
        if not text.isascii():
            for regex, cat, w in self._cjk:
                if regex.search(text) is not None:
                    scores[cat] += w

    def _score_words(
        self,
        text: str,
        weight: float,
        scores: list[float],
        seen: set[str],
        table: _CueTable | None = None,
    ) -> None:
        """Adds `weight` times the weights of the cues found in `text`, each cue once."""
        t = self._cues if table is None else table
        cues, stems, lengths = t.cues, t.stems, t.stem_lengths
        bi_heads, tri_heads, quad_heads = t.phrase_heads
        min_stem = lengths[0] if lengths else 1 << 30
        p1 = p2 = p3 = ""
        for tok in _TOKEN.findall(text.lower()):
            if tok in cues:
                _add(tok, cues[tok], weight, scores, seen)
            if p1 in bi_heads:
                key = p1 + " " + tok
                if key in cues:
                    _add(key, cues[key], weight, scores, seen)
            if p2 in tri_heads:
                key = p2 + " " + p1 + " " + tok
                if key in cues:
                    _add(key, cues[key], weight, scores, seen)
            if p3 in quad_heads:
                key = p3 + " " + p2 + " " + p1 + " " + tok
                if key in cues:
                    _add(key, cues[key], weight, scores, seen)
            if len(tok) >= min_stem:
                for n in lengths:
                    if n > len(tok):
                        break
                    stem = tok[:n]
                    if stem in stems:
                        _add(stem + "*", stems[stem], weight, scores, seen)
            p3, p2, p1 = p2, p1, tok


def _saturate(score: float) -> float:
    if score <= SATURATION_KNEE:
        return score
    return SATURATION_KNEE + (score - SATURATION_KNEE) * SATURATION_SLOPE


def _add(
    key: str,
    hits: tuple[tuple[int, float], ...],
    weight: float,
    scores: list[float],
    seen: set[str],
) -> None:
    if key not in seen:
        seen.add(key)
        for cat, w in hits:
            scores[cat] += weight * w


def _any_of(substrings: tuple[str, ...]) -> re.Pattern[str]:
    """One C-level scan for "any of these substrings" (a generator of `in` tests costs
    more than the pattern it guards on a short prompt)."""
    if not substrings:
        raise ValueError("a pattern needs at least one gate substring")
    return re.compile("|".join(re.escape(g) for g in substrings))


@dataclass(frozen=True, slots=True)
class _Pattern:
    regex: re.Pattern[str]
    category: int  # index in PRIORITY
    weight: float
    cap: int  # counted at most this many times
    gate: re.Pattern[str]  # run only if one of its substrings is in the text
    lower: bool  # run on the lower-cased text


@dataclass(frozen=True, slots=True)
class _CueTable:
    """Cue tables compiled for lookups: whole words and phrases, and prefix stems."""

    cues: dict[str, tuple[tuple[int, float], ...]]
    stems: dict[str, tuple[tuple[int, float], ...]]
    stem_lengths: tuple[int, ...]  # ascending
    # First words of the 2-, 3- and 4-word phrases: a phrase is looked up only when the
    # token that would start it is one of these.
    phrase_heads: tuple[frozenset[str], frozenset[str], frozenset[str]]

    @classmethod
    def build(cls, tiers: Tiers, index: Mapping[str, int]) -> _CueTable:
        cues: dict[str, list[tuple[int, float]]] = {}
        stems: dict[str, list[tuple[int, float]]] = {}
        for cat, cat_tiers in tiers.items():
            for weight, words in cat_tiers:
                for raw in (w for word in words for w in word.split("|")):
                    if raw.endswith("*"):
                        stems.setdefault(raw[:-1], []).append((index[cat], weight))
                    elif cue := " ".join(_TOKEN.findall(raw.lower())):
                        cues.setdefault(cue, []).append((index[cat], weight))
        heads = [frozenset(k.split(" ")[0] for k in cues if k.count(" ") == n) for n in (1, 2, 3)]
        return cls(
            cues={k: tuple(v) for k, v in cues.items()},
            stems={k: tuple(v) for k, v in stems.items()},
            stem_lengths=tuple(sorted({len(s) for s in stems})),
            phrase_heads=(heads[0], heads[1], heads[2]),
        )


def _content_texts(content: Any) -> list[str]:
    """The text parts of a message's content: a string, or a list of text parts (chat's
    and Anthropic's `{"type": "text"}`, Responses' `{"type": "input_text"}`)."""
    if isinstance(content, str):
        return [content]
    out: list[str] = []
    if isinstance(content, list):
        for part in content[: 4 * MAX_PARTS]:  # images and audio parts are skipped
            if isinstance(part, dict) and part.get("type") in _TEXT_PARTS:
                text = part.get("text")
                if isinstance(text, str):
                    out.append(text)
            elif isinstance(part, str):
                out.append(part)
            if len(out) >= MAX_PARTS:
                break
    return out


def _top_system_texts(payload: dict[str, Any]) -> list[str]:
    """Instructions beside the messages: Anthropic's `system` (a string or text blocks),
    Responses' `instructions` (a string)."""
    out: list[str] = []
    for key in ("system", "instructions"):
        out.extend(_content_texts(payload.get(key)))
    return out[:MAX_PARTS]


def _is_system(role: Any) -> bool:
    return isinstance(role, str) and role in _SYSTEM_ROLES


def _clip(text: str, head: int = USER_HEAD_CHARS, tail: int = USER_TAIL_CHARS) -> str:
    """The first `head` and last `tail` characters of `text`."""
    if len(text) <= head + tail:
        return text
    return text[:head] + "\n" + text[-tail:]
