"""What a chat template adds to a prompt, learnt from the backend's own counts."""

from __future__ import annotations

from metering.accounting.prompt_template import (
    MAX_SHAPES,
    MAX_TRIES,
    TemplateTokens,
    prompt_shape,
)


def test_the_shape_is_the_number_of_messages_or_a_prompt() -> None:
    assert prompt_shape({"messages": [{"role": "user", "content": "hi"}]}) == 1
    assert prompt_shape({"prompt": "1, 2, 3"}) == 0
    assert prompt_shape({"input": "embed me"}) is None


def test_a_learnt_template_completes_the_texts_count() -> None:
    t = TemplateTokens()
    assert t.count("m", 1, 6) == (6, False)  # not learnt yet: the text alone, said so
    t.learn("m", 1, backend_count=36, text_count=6)
    assert t.count("m", 1, 6) == (36, True)
    assert t.count("m", 1, 10) == (40, True)
    assert t.count("m", 2, 10) == (10, False)  # another shape: more role markers
    assert t.count("other", 1, 10) == (10, False)
    assert not t.wants("m", 1) and t.wants("m", 2)


def test_a_difference_no_template_makes_is_not_learnt() -> None:
    t = TemplateTokens()
    t.learn("m", 1, backend_count=5, text_count=9)  # fewer than the text: not a template's
    assert t.count("m", 1, 9) == (9, False)
    for shape in range(MAX_SHAPES + 5):
        t.learn("m", shape + 10, backend_count=3, text_count=1)
    assert len(t.added) + len(t.tries) == MAX_SHAPES  # bounded


def test_a_backend_whose_tokenizer_fails_is_not_asked_on_every_answer() -> None:
    t = TemplateTokens()
    for _ in range(MAX_TRIES):
        assert t.wants("m", 1)
        t.failed("m", 1)
    assert not t.wants("m", 1)  # given up: no tokenize call per answer from here
    assert t.wants("m", 2)


def test_what_the_tokenizer_does_not_see_teaches_nothing() -> None:
    """Tools, response formats and images are in the backend's count, not in the text:
    such a request's difference is not the template's."""
    user = {"role": "user", "content": "hi"}
    assert prompt_shape({"messages": [user], "tools": [{"type": "function"}]}) is None
    assert prompt_shape({"messages": [user], "response_format": {"type": "json_schema"}}) is None
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
    assert prompt_shape({"messages": [image]}) is None
    text = {"role": "user", "content": [{"type": "text", "text": "hi"}]}
    assert prompt_shape({"messages": [text, user]}) == 2


def test_a_difference_out_of_range_counts_as_a_failed_try() -> None:
    t = TemplateTokens()
    for _ in range(MAX_TRIES):
        t.learn("m", 1, backend_count=3, text_count=10)
    assert not t.wants("m", 1)  # not asked again on every answer
