"""The prompt classifier: accuracy on the labelled set, request shapes, bounds, configuration."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metering.categories.classifier import DEFAULT_CATEGORIES, PromptClassifier
from tests.support.paths import TEST_DATA

DATA = TEST_DATA / "prompts.jsonl"
MIN_ROWS = 350
MIN_PER_CATEGORY = 50
MIN_ACCURACY = 0.90
MIN_RECALL = 0.80


def load_rows() -> list[tuple[str, dict[str, Any]]]:
    rows = []
    for line in DATA.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            rows.append((row.pop("category"), row))
    return rows


ROWS = load_rows()


@pytest.fixture(scope="module")
def clf() -> PromptClassifier:
    return PromptClassifier(DEFAULT_CATEGORIES)


def user(text: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}]}


def confusion(pairs: Sequence[tuple[str, str]]) -> str:
    """The confusion matrix as text: rows = true category, columns = predicted."""
    cats = list(DEFAULT_CATEGORIES)
    counts = Counter(pairs)
    lines = ["true \\ predicted".ljust(16) + "".join(f"{c[:6]:>8}" for c in cats)]
    for t in cats:
        lines.append(t.ljust(16) + "".join(f"{counts[(t, p)]:>8}" for p in cats))
    return "\n".join(lines)


# --- the labelled set -----------------------------------------------------------------------


def test_dataset_sanity() -> None:
    assert len(ROWS) >= MIN_ROWS
    per_category = Counter(cat for cat, _ in ROWS)
    assert set(per_category) == set(DEFAULT_CATEGORIES)
    for cat in DEFAULT_CATEGORIES:
        assert per_category[cat] >= MIN_PER_CATEGORY, cat
    bodies = [json.dumps(body, sort_keys=True, ensure_ascii=False) for _, body in ROWS]
    duplicates = [b for b, n in Counter(bodies).items() if n > 1]
    assert not duplicates, duplicates[:3]
    for _, body in ROWS:
        assert set(body) in ({"messages"}, {"prompt"}), body
        if "messages" in body:
            assert body["messages"][-1]["role"] == "user", body
            assert all(m["role"] in {"system", "user", "assistant"} for m in body["messages"])


def test_dataset_covers_the_shapes_it_claims() -> None:
    bodies = [body for _, body in ROWS]
    chats = [b["messages"] for b in bodies if "messages" in b]
    assert any(m[0]["role"] == "system" for m in chats)
    assert any(sum(1 for x in m if x["role"] == "user") > 1 for m in chats)  # multi-turn
    assert any(isinstance(m[-1]["content"], list) for m in chats)  # list-of-parts content
    assert any("prompt" in b for b in bodies)


def test_accuracy_on_the_labelled_set(clf: PromptClassifier) -> None:
    pairs = [(cat, clf.classify_payload(body)) for cat, body in ROWS]
    matrix = confusion(pairs)
    accuracy = sum(1 for t, p in pairs if t == p) / len(pairs)
    assert accuracy >= MIN_ACCURACY, f"accuracy {accuracy:.1%}\n{matrix}"
    for cat in DEFAULT_CATEGORIES:
        labelled = [p for t, p in pairs if t == cat]
        recall = sum(1 for p in labelled if p == cat) / len(labelled)
        assert recall >= MIN_RECALL, f"{cat}: recall {recall:.1%}\n{matrix}"


# --- request shapes -------------------------------------------------------------------------


def test_string_content(clf: PromptClassifier) -> None:
    assert clf.classify_payload(user("Translate into French: good night")) == "translation"
    assert clf.classify_payload(user("SELECT id FROM users WHERE age > 30;")) == "sql"


def test_list_of_parts_content_skips_non_text_parts(clf: PromptClassifier) -> None:
    parts = [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "text", "text": "Solve for x:"},
        {"type": "text", "text": "2x + 3 = 11"},
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
    ]
    assert clf.classify_payload(user(parts)) == "math"
    assert clf.classify_payload(user([{"type": "image_url", "image_url": {}}])) == "other"


def test_system_prompt_and_last_user_turn(clf: PromptClassifier) -> None:
    # The system prompt says what to do with the user's text.
    body = {
        "messages": [
            {"role": "system", "content": "You translate everything the user writes into German."},
            {"role": "user", "content": "The weather is lovely today."},
        ]
    }
    assert clf.classify_payload(body) == "translation"
    # "developer" is the newer name of the system role.
    body["messages"][0]["role"] = "developer"
    assert clf.classify_payload(body) == "translation"


def test_the_last_user_turn_decides(clf: PromptClassifier) -> None:
    body = {
        "messages": [
            {"role": "user", "content": "Write a SQL query joining orders and customers."},
            {"role": "assistant", "content": "SELECT * FROM orders JOIN customers ON ..."},
            {"role": "user", "content": "Now write a short poem about autumn."},
            {"role": "assistant", "content": "Leaves fall..."},
        ]
    }
    assert clf.classify_payload(body) == "other"
    body["messages"].append({"role": "user", "content": "What is the derivative of x^3?"})
    assert clf.classify_payload(body) == "math"


GERMAN = "You translate everything the user writes into German."
WEATHER = "The weather is lovely today."


@pytest.mark.parametrize(
    "body",
    [
        {"instructions": GERMAN, "input": WEATHER},
        {"instructions": GERMAN, "input": [{"role": "user", "content": WEATHER}]},
        {
            "instructions": GERMAN,
            "input": [
                {"type": "message", "role": "user",
                 "content": [{"type": "input_text", "text": WEATHER}]},
            ],
        },
        {"input": [{"role": "developer", "content": GERMAN},
                   {"role": "user", "content": [{"type": "input_text", "text": WEATHER}]}]},
        {"system": GERMAN, "messages": [{"role": "user", "content": WEATHER}]},
        {"system": [{"type": "text", "text": GERMAN}],
         "messages": [{"role": "user", "content": [{"type": "text", "text": WEATHER}]}]},
    ],
    ids=["responses-string", "responses-easy-items", "responses-items", "responses-developer",
         "anthropic", "anthropic-blocks"],
)  # fmt: skip
def test_instructions_beside_the_input_say_what_to_do(
    clf: PromptClassifier, body: dict[str, Any]
) -> None:
    assert clf.classify_payload(body) == "translation"
    # Without the instructions beside it (where they are) the same text is no task at all.
    bare = {k: v for k, v in body.items() if k not in ("system", "instructions")}
    if bare != body:
        assert clf.classify_payload(bare) == "other"


@pytest.mark.parametrize(
    ("body", "category"),
    [
        ({"query": "How do I reverse a linked list in Python?", "documents": ["def f(): ..."]},
         "code"),
        ({"query": "SELECT name FROM users WHERE age > 30;", "documents": [{"text": "..."}]},
         "sql"),
        ({"text_1": "What is the derivative of x^3?", "text_2": ["3x^2", "x^4 / 4"]}, "math"),
        ({"queries": ["What is the derivative of x^3?"], "documents": ["3x^2"]}, "math"),
        ({"texts": ["SELECT id FROM users WHERE age > 30;"], "input_type": "search_query"},
         "sql"),
        ({"input": "Translate into French: good night"}, "translation"),  # pooling, classify
    ],
    ids=["rerank", "rerank-objects", "score", "score-queries", "embed-texts", "pooling"],
)  # fmt: skip
def test_rerank_score_and_pooling_are_classified_by_their_query(
    clf: PromptClassifier, body: dict[str, Any], category: str
) -> None:
    assert clf.classify_payload(body) == category


def test_completions_prompt(clf: PromptClassifier) -> None:
    assert clf.classify_payload({"prompt": "Q: What is 48 divided by 6?\nA:"}) == "math"
    listed = {"prompt": ["# Python\ndef is_prime(n):", "# Python\ndef fib(n):"]}
    assert clf.classify_payload(listed) == "code"


@pytest.mark.parametrize(
    "prompt",
    [[1, 2, 3, 4], [[15496, 11, 995], [318, 257]], [], "", "   \n ", ["a", 3]],
    ids=["token-ids", "batched-token-ids", "empty-list", "empty", "blank", "mixed"],
)
def test_token_ids_and_empty_prompts_are_other(clf: PromptClassifier, prompt: Any) -> None:
    assert clf.classify_payload({"prompt": prompt}) == "other"
    assert clf.classify_payload({"input": prompt}) == "other"


def test_embeddings_input(clf: PromptClassifier) -> None:
    assert clf.classify_payload({"input": "Übersetze bitte ins Englische: Guten Morgen"}) == (
        "translation"
    )
    assert clf.classify_payload({"input": ["tl;dr of this thread please"]}) == "summarization"


@pytest.mark.parametrize(
    "payload",
    [
        None,
        42,
        "Translate to French: hello",
        ["messages"],
        {},
        {"model": "m"},
        {"messages": None},
        {"messages": "Translate to French: hello"},
        {"messages": []},
        {"messages": [None, 3, "user", []]},
        {"messages": [{"role": "user"}]},
        {"messages": [{"role": "user", "content": None}]},
        {"messages": [{"role": "user", "content": 42}]},
        {"messages": [{"role": "user", "content": {"text": "Translate to French"}}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
        {"messages": [{"role": "user", "content": [{"type": "text"}, None, 7]}]},
        {"messages": [{"role": ["user"], "content": "Translate to French: hello"}]},
        {"messages": [{"role": {"a": 1}, "content": "x"}, {"role": "user", "content": "hi"}]},
        {"messages": [{"role": "system", "content": "Translate to French."}]},  # no user turn
        {"messages": [{"role": "assistant", "content": "Translate to French: hello"}]},
        {"prompt": None},
        {"prompt": 5},
        {"prompt": {"text": "Translate to French"}},
        {"input": {"a": [1, 2]}},
    ],
)
def test_malformed_payloads_are_other(clf: PromptClassifier, payload: Any) -> None:
    assert clf.classify_payload(payload) == "other"


def test_unhashable_role_does_not_hide_the_user_turn(clf: PromptClassifier) -> None:
    body = {
        "messages": [
            {"role": {"a": 1}, "content": "x"},
            {"role": "user", "content": "Translate to Spanish: good morning"},
        ]
    }
    assert clf.classify_payload(body) == "translation"


# --- huge prompts ---------------------------------------------------------------------------

PROSE = (
    "The committee met on a grey morning and went through the reports one by one, "
    "noting what had changed since the spring and what still had to be decided. "
)


def test_huge_prompt_instruction_before_the_paste(clf: PromptClassifier) -> None:
    text = "Summarize the following report:\n\n" + PROSE * 20_000  # ~3 MB
    assert clf.classify_payload(user(text)) == "summarization"


def test_huge_prompt_instruction_after_the_paste(clf: PromptClassifier) -> None:
    text = PROSE * 20_000 + "\n\nTranslate the text above into French."
    assert clf.classify_payload(user(text)) == "translation"


def test_huge_prompt_only_its_head_and_tail_are_read(clf: PromptClassifier) -> None:
    # A cue far from both ends is beyond the clipped window: the bound is on what is read.
    buried = PROSE * 5_000 + "Translate into German. Traduis en anglais. " + PROSE * 5_000
    assert clf.classify_text(buried) != "translation"
    assert clf.classify_text(PROSE * 3 + "Translate into German.") == "translation"


def test_many_parts_and_many_messages(clf: PromptClassifier) -> None:
    parts = [{"type": "text", "text": "Solve 3x + 7 = 22."}] * 100_000
    assert clf.classify_payload(user(parts)) == "math"
    history = [{"role": "assistant", "content": "ok"}] * 100_000
    body = {
        "messages": [
            {"role": "system", "content": "You are a SQL assistant for PostgreSQL."},
            *history,
            {"role": "user", "content": "Top 5 customers by revenue, please."},
        ]
    }
    assert clf.classify_payload(body) == "sql"


# --- configuration --------------------------------------------------------------------------


def test_unconfigured_category_falls_to_other() -> None:
    no_sql = PromptClassifier([c for c in DEFAULT_CATEGORIES if c != "sql"])
    sql_rows = [body for cat, body in ROWS if cat == "sql"]
    results = Counter(no_sql.classify_payload(body) for body in sql_rows)
    assert "sql" not in results
    full = PromptClassifier()
    for body in sql_rows:
        if full.classify_payload(body) == "sql":
            assert no_sql.classify_payload(body) == "other"
    assert all(no_sql.classify_payload(body) != "sql" for _, body in ROWS)


def test_categories_without_rules_are_never_produced() -> None:
    clf = PromptClassifier(["poetry", "code", "other"])
    produced = {clf.classify_payload(body) for _, body in ROWS}
    assert produced <= {"code", "other"}
    assert "code" in produced


def test_constructor_requires_other() -> None:
    with pytest.raises(ValueError, match="other"):
        PromptClassifier(["code", "sql", "math"])
    with pytest.raises(ValueError):
        PromptClassifier([])
    clf = PromptClassifier(c for c in ("code", "other"))  # any iterable
    assert clf.categories == frozenset({"code", "other"})


def test_default_categories() -> None:
    assert DEFAULT_CATEGORIES == (
        "code",
        "sql",
        "math",
        "translation",
        "summarization",
        "questions",
        "other",
    )
    assert PromptClassifier().categories == frozenset(DEFAULT_CATEGORIES)


def test_classify_text_edge_cases(clf: PromptClassifier) -> None:
    assert clf.classify_text("") == "other"
    assert clf.classify_text("ok cool") == "other"
    assert clf.classify_text("Why is the sky blue?") == "questions"
    assert clf.classify_text("把这句话翻译成英文\uff1a我们下周一开会。") == "translation"


# --- never raises ---------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=50),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)
ROLE = st.sampled_from(["user", "system", "developer", "assistant", "tool"]) | JSON
PART = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]) | JSON, "text": JSON})
CONTENT = st.text(max_size=200) | st.lists(PART | JSON, max_size=4) | JSON
MESSAGE = st.fixed_dictionaries({"role": ROLE, "content": CONTENT}) | JSON
PAYLOAD = (
    JSON
    | st.fixed_dictionaries({"messages": st.lists(MESSAGE, max_size=6) | JSON})
    | st.fixed_dictionaries({"prompt": st.text(max_size=200) | st.lists(JSON, max_size=4) | JSON})
    | st.fixed_dictionaries({"input": JSON})
)


@settings(max_examples=400, deadline=None)
@given(PAYLOAD)
def test_never_raises_on_json_ish_payloads(payload: Any) -> None:
    clf = PromptClassifier(["code", "math", "questions", "other"])
    assert clf.classify_payload(payload) in clf.categories


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=2_000))
def test_classify_text_never_raises(text: str) -> None:
    assert PromptClassifier().classify_text(text) in DEFAULT_CATEGORIES
