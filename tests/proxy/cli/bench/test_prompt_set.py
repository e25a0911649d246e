"""Prompt sets: the built-in `builtin:v1`, user JSONL files and their errors, subsets."""

from __future__ import annotations

import json
import statistics
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from proxy.cli.bench.prompt_set import (
    CATEGORY_CONTROLS,
    DEFAULT_CONTROLS,
    BenchPrompt,
    PromptSet,
    controls_for,
    load_prompt_set,
    parse_prompt_set,
)

CATEGORIES = ("code", "sql", "math", "translation", "summarization", "questions")
EXPECTED_MAX_TOKENS = {
    "code": 256,
    "sql": 128,
    "math": 192,
    "translation": 128,
    "summarization": 128,
    "questions": 160,
}
LANGUAGES = (
    "French",
    "Spanish",
    "German",
    "Italian",
    "Portuguese",
    "Dutch",
    "Swedish",
    "Polish",
    "Russian",
    "Turkish",
    "Greek",
    "Arabic",
    "Hindi",
    "Japanese",
    "Korean",
    "Chinese",
)


@pytest.fixture(scope="module")
def builtin() -> PromptSet:
    return load_prompt_set("builtin:v1")


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text(
        "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n",
        encoding="utf-8",
    )
    return path


def row(prompt_id: str = "p-1", category: str = "code", **extra: Any) -> dict[str, Any]:
    return {
        "id": prompt_id,
        "category": category,
        "messages": [{"role": "user", "content": "Say hi."}],
        **extra,
    }


# --- builtin:v1 ---------------------------------------------------------------------------


def test_builtin_has_50_prompts_per_category(builtin: PromptSet) -> None:
    assert builtin.name == "builtin:v1"
    assert len(builtin) == 300
    assert builtin.categories == CATEGORIES
    for category in CATEGORIES:
        assert sum(p.category == category for p in builtin.prompts) == 50


def test_builtin_ids_are_unique_and_numbered(builtin: PromptSet) -> None:
    ids = [p.id for p in builtin.prompts]
    assert len(set(ids)) == 300
    for category in CATEGORIES:
        mine = [p.id for p in builtin.prompts if p.category == category]
        assert mine == [f"{category}-{i:03d}" for i in range(1, 51)]


def test_builtin_prompts_are_single_non_empty_user_messages(builtin: PromptSet) -> None:
    contents = []
    for p in builtin.prompts:
        assert len(p.messages) == 1
        assert p.messages[0]["role"] == "user"
        content = p.messages[0]["content"]
        assert content.strip() == content
        assert len(content) >= 10
        contents.append(content)
    assert len(set(contents)) == 300


def test_builtin_controls_per_category(builtin: PromptSet) -> None:
    for p in builtin.prompts:
        assert p.max_tokens == EXPECTED_MAX_TOKENS[p.category]
        assert p.temperature == 0.0
        assert p.seed == 42


def test_translation_prompts_name_source_and_target(builtin: PromptSet) -> None:
    # Every translation is to or from English, and names the other language.
    for p in builtin.prompts:
        if p.category != "translation":
            continue
        text = p.messages[0]["content"]
        assert "English" in text, p.id
        assert any(lang in text for lang in LANGUAGES), p.id


def test_data_card_length_table_matches_the_file(builtin: PromptSet) -> None:
    card = resources.files("proxy.cli.bench.prompt_sets").joinpath("README.md").read_text("utf-8")
    table: dict[str, list[str]] = {}
    for line in card.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and (cells[0] in CATEGORIES or cells[0] == "all"):
            table[cells[0]] = cells[1:]
    assert set(table) == {*CATEGORIES, "all"}
    all_lengths: list[int] = []
    for category in CATEGORIES:
        prompts = [p for p in builtin.prompts if p.category == category]
        lengths = [sum(len(m["content"]) for m in p.messages) for p in prompts]
        all_lengths += lengths
        expected = [
            str(len(lengths)),
            str(min(lengths)),
            f"{statistics.median(lengths):g}",
            str(max(lengths)),
            str(EXPECTED_MAX_TOKENS[category]),
        ]
        assert table[category] == expected, category
    assert table["all"][:4] == [
        "300",
        str(min(all_lengths)),
        f"{statistics.median(all_lengths):g}",
        str(max(all_lengths)),
    ]


def test_request_body() -> None:
    p = BenchPrompt("x-1", "sql", [{"role": "user", "content": "q"}], 128, 0.0, 42)
    body = p.request_body("m")
    assert body == {
        "model": "m",
        "messages": [{"role": "user", "content": "q"}],
        "max_tokens": 128,
        "temperature": 0.0,
        "seed": 42,
    }
    body["messages"][0]["content"] = "changed"
    assert p.messages[0]["content"] == "q"  # a copy
    unseeded = BenchPrompt("x-2", "sql", [{"role": "user", "content": "q"}], 128, 0.0, None)
    assert "seed" not in unseeded.request_body("m")


def test_controls_table() -> None:
    assert {c: v.max_tokens for c, v in CATEGORY_CONTROLS.items()} == EXPECTED_MAX_TOKENS
    assert controls_for("poetry") == DEFAULT_CONTROLS
    assert DEFAULT_CONTROLS.max_tokens == 128


# --- user files ---------------------------------------------------------------------------


def test_user_file_defaults_and_overrides(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "mine.jsonl",
        [
            row("a", "math"),
            "",
            row("b", "poetry"),
            row("c", "code", max_tokens=64, temperature=0.7, seed=None),
            row("d", "sql", seed=7),
        ],
    )
    ps = load_prompt_set(str(path))
    assert ps.name == str(path)
    a, b, c, d = ps.prompts
    assert (a.max_tokens, a.temperature, a.seed) == (192, 0.0, 42)
    assert (b.category, b.max_tokens, b.temperature, b.seed) == ("poetry", 128, 0.0, 42)
    assert (c.max_tokens, c.temperature, c.seed) == (64, 0.7, None)
    assert (d.max_tokens, d.seed) == (128, 7)
    assert ps.categories == ("math", "poetry", "code", "sql")


def test_user_file_with_system_message_bom_and_crlf(tmp_path: Path) -> None:
    r = row("a")
    r["messages"] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi \u2028 there"},  # a raw U+2028 is valid JSON
    ]
    line = json.dumps(r, ensure_ascii=False)
    path = tmp_path / "p.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + line.encode() + b"\r\n")
    ps = load_prompt_set(str(path))
    assert ps.prompts[0].messages[1]["content"] == "Hi \u2028 there"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object, got an array"),
        (json.dumps({"category": "code", "messages": []}), "'id' must be a non-empty string"),
        (json.dumps(row("  ")), "'id' must be a non-empty string"),
        (json.dumps(row(category="")), "'category' must be a non-empty string"),
        (json.dumps(row(max_token=5)), "unknown field(s) 'max_token'"),
        (json.dumps({**row(), "messages": []}), "'messages' must be a non-empty array"),
        (json.dumps({**row(), "messages": "hi"}), "'messages' must be a non-empty array"),
        (
            json.dumps({**row(), "messages": [{"role": "user"}]}),
            "messages[0] must be an object with exactly 'role' and 'content'",
        ),
        (
            json.dumps({**row(), "messages": [{"role": "robot", "content": "x"}]}),
            "messages[0]: role must be one of",
        ),
        (
            json.dumps({**row(), "messages": [{"role": "user", "content": "  "}]}),
            "messages[0]: content must be a non-empty string",
        ),
        (
            json.dumps({**row(), "messages": [{"role": "system", "content": "x"}]}),
            "must contain a user message",
        ),
        (json.dumps(row(max_tokens=0)), "'max_tokens' must be an integer >= 1"),
        (json.dumps(row(max_tokens=True)), "'max_tokens' must be an integer >= 1"),
        (json.dumps(row(max_tokens="64")), "'max_tokens' must be an integer >= 1"),
        (json.dumps(row(temperature=3)), "'temperature' must be a number in [0, 2.0]"),
        (json.dumps(row(temperature=-0.1)), "'temperature' must be a number in [0, 2.0]"),
        (json.dumps(row(temperature=float("nan"))), "'temperature' must be"),
        (json.dumps(row(seed="42")), "'seed' must be an integer or null"),
        (json.dumps(row(seed=1.5)), "'seed' must be an integer or null"),
    ],
)
def test_bad_line_names_the_line(tmp_path: Path, line: str, message: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [row("ok-1"), "", line])
    with pytest.raises(ValueError) as info:
        load_prompt_set(str(path))
    assert f"{path}: line 3: " in str(info.value)
    assert message in str(info.value)


def test_duplicate_id_names_both_lines(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "dup.jsonl", [row("a"), row("b"), row("a")])
    with pytest.raises(ValueError, match=r"line 3: duplicate id 'a' \(first on line 1\)"):
        load_prompt_set(str(path))


def test_invalid_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    good = json.dumps(row("a")).encode()
    path.write_bytes(good + b"\n" + good.replace(b"Say hi", b"Caf\xe9"))
    with pytest.raises(ValueError, match=r"line 2: not valid UTF-8"):
        load_prompt_set(str(path))


def test_empty_file_is_refused(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(ValueError, match="no prompts"):
        load_prompt_set(str(path))


def test_unknown_builtin_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown prompt set 'builtin:v9'.*builtin:v1"):
        load_prompt_set("builtin:v9")
    with pytest.raises(FileNotFoundError):
        load_prompt_set(str(tmp_path / "nope.jsonl"))


def test_parse_from_text() -> None:
    ps = parse_prompt_set(json.dumps(row("a")) + "\n", "inline")
    assert ps.name == "inline"
    assert [p.id for p in ps.prompts] == ["a"]


# --- subsets ------------------------------------------------------------------------------


def test_subset_takes_the_first_n_of_each_category(builtin: PromptSet) -> None:
    small = builtin.subset(5)
    assert len(small) == 30
    assert small.categories == CATEGORIES
    assert [p.id for p in small.prompts if p.category == "math"] == [
        f"math-{i:03d}" for i in range(1, 6)
    ]
    order = [p.id for p in builtin.prompts]
    kept = [p.id for p in small.prompts]
    assert kept == sorted(kept, key=order.index)  # the set's order is kept
    assert small == builtin.subset(5)
    assert "builtin:v1" in small.name


def test_subset_of_a_small_category_takes_all(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "p.jsonl", [row("a", "x"), row("b", "y"), row("c", "x"), row("d", "x")]
    )
    ps = load_prompt_set(str(path))
    assert [p.id for p in ps.subset(2).prompts] == ["a", "b", "c"]
    assert ps.subset(10).prompts == ps.prompts
    with pytest.raises(ValueError, match="per_category must be >= 1"):
        ps.subset(0)
