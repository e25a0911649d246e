"""The relay's pure helpers: usage in each API's names, the usage the proxy asks for,
multipart heads, compressed answers, the passthrough rules."""

from __future__ import annotations

import gzip
import json
import zlib

import pytest

from proxy.relay.encoding import StreamDecoder, content_coding, decodable, decode_whole
from proxy.relay.exchange import ask_for_usage, tokens_from_usage
from proxy.relay.multipart import boundary_of, complete_fields
from proxy.relay.path_rules import PathRules, check_patterns, plain_path


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        ({"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}, (5, 3, "backend")),
        ({"input_tokens": 34, "output_tokens": 8, "total_tokens": 42}, (34, 8, "backend")),
        # Anthropic: input_tokens excludes the cached part; the prompt read is all of it.
        (
            {"input_tokens": 10, "cache_read_input_tokens": 90, "output_tokens": 2},
            (100, 2, "backend"),
        ),
        ({"total_tokens": 12}, (12, 0, "backend")),  # rerank: prompt work only
        ({"prompt_tokens": 9, "total_tokens": 9}, (9, 0, "backend")),
        ({"type": "duration", "seconds": 3}, (None, 4, "proxy")),  # audio: no tokens
        (None, (None, 4, "proxy")),
        ({"prompt_tokens": -1}, (None, 4, "proxy")),
        # A broken or hostile backend's figures are no counts (they would overflow sums).
        ({"prompt_tokens": 2**63 - 1, "completion_tokens": 7}, (None, 4, "proxy")),
        ({"prompt_tokens": 3, "completion_tokens": 2**63}, (3, 0, "backend")),
        ({"prompt_tokens": 3.5, "completion_tokens": -100}, (None, 4, "proxy")),
        ({"prompt_tokens": True, "completion_tokens": 2}, (None, 4, "proxy")),
    ],
)
def test_tokens_from_each_apis_usage(usage: object, expected: tuple[object, ...]) -> None:
    t = tokens_from_usage(usage, 4)
    assert (t.prompt, t.completion, t.source) == expected


def test_usage_the_client_did_not_ask_for_stays_off_its_chunks() -> None:
    payload = {"model": "m", "stream": True, "stream_options": {"continuous_usage_stats": True}}
    body, wanted = ask_for_usage(payload, json.dumps(payload).encode())
    assert not wanted
    opts = json.loads(body)["stream_options"]
    assert opts == {"continuous_usage_stats": False, "include_usage": True}
    both = {**payload, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    raw = json.dumps(both).encode()
    assert ask_for_usage(both, raw) == (raw, True)  # asked for both: untouched


def test_multipart_fields_before_the_file() -> None:
    b = b"XyZ"
    head = (
        b'--XyZ\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper\r\n'
        b'--XyZ\r\nContent-Disposition: form-data; name="stream"\r\n\r\ntrue\r\n'
        b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\nRIFF'
    )
    assert boundary_of(b"multipart/form-data; boundary=XyZ") == b
    assert boundary_of(b'multipart/form-data; boundary="XyZ"') == b
    assert boundary_of(b"application/json") is None
    assert complete_fields(head, b) == ({"model": "whisper", "stream": "true"}, True)
    # A field cut off mid-value is not taken until its part is complete.
    cut = b'--XyZ\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhis'
    assert complete_fields(cut, b) == ({}, False)
    whole = cut + b'per\r\n--XyZ--\r\n'
    assert complete_fields(whole, b) == ({"model": "whisper"}, False)


def test_compressed_answers_decode_whole_and_in_pieces() -> None:
    text = b"data: " + b"x" * 5000 + b"\n\n"
    assert content_coding([(b"Content-Encoding", b"GZIP")]) == b"gzip"
    assert content_coding([(b"content-encoding", b"identity")]) == b""
    assert decodable(b"gzip") and decodable(b"deflate") and not decodable(b"br")
    assert decode_whole(b"gzip", gzip.compress(text)) == text
    assert decode_whole(b"deflate", zlib.compress(text)) == text
    raw = zlib.compressobj(wbits=-15)
    assert decode_whole(b"deflate", raw.compress(text) + raw.flush()) == text
    comp = zlib.compressobj(wbits=31)
    pieces = [comp.compress(text[:100]) + comp.flush(zlib.Z_SYNC_FLUSH),
              comp.compress(text[100:]) + comp.flush()]  # fmt: skip
    decode = StreamDecoder(b"gzip")
    assert decode(pieces[0]) == text[:100]  # an event inflates as it arrives
    assert decode(pieces[1]) == text[100:]


def test_passthrough_rules() -> None:
    default = PathRules()
    for path in ("/v1/responses/r1", "/v1/models/x", "/tokenize", "/health", "/v2/anything"):
        assert default.allows(path), path
    for path in ("/invocations", "/v1/load_lora_adapter", "/sleep", "/reset_prefix_cache", "/"):
        assert not default.allows(path), path
    # Dot segments are normalised on the way (`/v1/../invocations` is `/invocations` at
    # the backend): never passed, whatever the patterns.
    for path in ("/v1/../invocations", "/v1/./x", "/v1//x", "/v1/..", "/v1/x/.."):
        assert not default.allows(path), path
        assert not PathRules(("/v1/*",)).allows(path), path
    assert default.allows("/v1/models/") and plain_path("/v1/models/a.b")
    opened = PathRules(("/invocations", "!/v2/*", "/v1/load_lora_adapter"))
    assert opened.allows("/invocations") and opened.allows("/v1/load_lora_adapter")
    assert not opened.allows("/v2/anything")
    assert check_patterns([" /invocations ", "!/v2/*"]) == ["/invocations", "!/v2/*"]
    with pytest.raises(ValueError, match="starts with /"):
        check_patterns(["invocations"])


def test_usage_figures_are_whole_numbers_and_skip_what_is_not_finite() -> None:
    from proxy.relay.whole_answer import usage_figures

    assert usage_figures({"joules": 1.23456, "co2eq_g": 0.0001234}) == {
        "energy_millijoules": 1235,
        "co2eq_micrograms": 123,
    }
    assert usage_figures({"joules": float("nan"), "co2eq_g": float("inf")}) == {}
    assert usage_figures({}) == {}
