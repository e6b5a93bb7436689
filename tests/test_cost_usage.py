"""Finding the engines' `usage` (activator.observability.usage): in every answer shape vLLM and the
OpenAI API use, from the end, without being fooled by the word elsewhere, and bounded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from activator.observability.usage import (
    MAX_USAGE_BYTES,
    TAIL_CHUNKS,
    StreamTail,
    Usage,
    find_usage,
)
from tests.test_bench_smoke import run_smoke

CHAT_USAGE = {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}


def body(value: Any, *, indent: int | None = None) -> bytes:
    return json.dumps(value, indent=indent).encode()


def sse(*events: Any) -> bytes:
    return b"".join(b"data: " + body(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"


def chunk(content: str, **extra: Any) -> dict[str, Any]:
    return {
        "object": "chat.completion.chunk",
        "choices": [{"delta": {"content": content}}],
        **extra,
    }


@pytest.mark.parametrize(
    ("answer", "usage"),
    [
        pytest.param(
            {"object": "chat.completion", "choices": [], "usage": CHAT_USAGE},
            Usage(12, 5),
            id="chat",
        ),
        pytest.param(
            {"choices": [], "usage": {**CHAT_USAGE, "prompt_tokens_details": {"cached_tokens": 8}}},
            Usage(12, 5, cached=8),
            id="chat-cached",
        ),
        pytest.param(
            {
                "object": "list",
                "data": [{"embedding": [0.1] * 1000}],
                "usage": {"prompt_tokens": 7, "total_tokens": 7},
            },
            Usage(7, 0),
            id="embeddings",
        ),
        pytest.param(
            {
                "object": "response",
                "output": [],
                "usage": {
                    "input_tokens": 9,
                    "output_tokens": 3,
                    "input_tokens_details": {"cached_tokens": 4},
                },
                "user": None,
            },
            Usage(9, 3, cached=4),
            id="responses",
        ),
        pytest.param(
            # vLLM puts prompt_logprobs after usage; a prompt token may be the word.
            {
                "choices": [],
                "usage": CHAT_USAGE,
                "prompt_logprobs": [{"1": {"decoded_token": "usage"}}] * 3,
            },
            Usage(12, 5),
            id="word-after",
        ),
        pytest.param(
            # The word as content, and a quoted key inside a string: both escaped.
            {
                "choices": [{"message": {"content": 'say "usage": {"prompt_tokens": 99}'}}],
                "usage": CHAT_USAGE,
            },
            Usage(12, 5),
            id="in-content",
        ),
        pytest.param({"choices": [], "usage": None}, None, id="null"),
        pytest.param({"choices": []}, None, id="none"),
        pytest.param({"usage": {"total_tokens": 3}}, None, id="no-prompt-tokens"),
        pytest.param({"usage": {"prompt_tokens": -1}}, None, id="negative"),
        pytest.param({"usage": {"prompt_tokens": True}}, None, id="boolean"),
        pytest.param({"usage": {"prompt_tokens": 10**12}}, None, id="absurd"),
        pytest.param({"usage": [1, 2]}, None, id="not-an-object"),
    ],
)
def test_usage_of_an_answer(answer: Any, usage: Usage | None) -> None:
    assert find_usage(body(answer)) == usage
    assert find_usage(body(answer, indent=2)) == usage  # "usage": { with spaces


def test_cached_tokens_are_part_of_input_never_more() -> None:
    answer = {"usage": {"prompt_tokens": 3, "prompt_tokens_details": {"cached_tokens": 9}}}
    assert find_usage(body(answer)) == Usage(3, 0, cached=3)


def test_a_usage_object_cut_short_or_too_large_is_not_counted() -> None:
    whole = body({"usage": CHAT_USAGE})
    assert find_usage(whole[:-5]) is None
    padded = {"usage": {**CHAT_USAGE, "padding": "x" * MAX_USAGE_BYTES}}
    assert find_usage(body(padded)) is None
    assert find_usage(b'{"usage": {"prompt_tokens": 1, \xff\xfe}') is None


def stream_of(events: bytes, *, size: int) -> StreamTail:
    tail = StreamTail()
    for i in range(0, len(events), size):
        tail.append(events[i : i + size])
    return tail


def test_a_stream_ends_with_its_usage_however_it_was_read() -> None:
    events = sse(
        chunk("a", usage=None),  # the OpenAI API's include_usage: null until the last
        chunk("b", usage=None),
        {"object": "chat.completion.chunk", "choices": [], "usage": CHAT_USAGE},
    )
    for size in (len(events), 100, 64):
        assert stream_of(events, size=size).usage() == Usage(12, 5), size


def test_continuous_usage_stats_count_the_last_cumulative_one() -> None:
    events = sse(
        chunk("a", usage={"prompt_tokens": 12, "completion_tokens": 1}),
        chunk("b", usage={"prompt_tokens": 12, "completion_tokens": 2}),
        chunk("", usage={"prompt_tokens": 12, "completion_tokens": 2}),
    )
    assert stream_of(events, size=40).usage() == Usage(12, 2)


def test_a_stream_without_usage_or_cut_before_it_counts_nothing() -> None:
    assert stream_of(sse(chunk("a"), chunk("b")), size=16).usage() is None
    cut = sse(chunk("a", usage=None), {"choices": [], "usage": CHAT_USAGE})
    assert stream_of(cut[:-30], size=16).usage() is None
    assert StreamTail().usage() is None


def test_a_stream_keeps_only_its_last_reads() -> None:
    """Bounded: reads finer than TAIL_CHUNKS pieces of the usage event lose it."""
    events = sse({"choices": [], "usage": CHAT_USAGE})
    tail = stream_of(sse(chunk("x")) * 1000 + events, size=len(events))
    assert len(tail._chunks) == TAIL_CHUNKS
    assert tail.usage() == Usage(12, 5)
    assert stream_of(events, size=len(events) // (TAIL_CHUNKS + 2)).usage() is None


def test_a_responses_stream_counts_its_completed_event() -> None:
    completed = {
        "type": "response.completed",
        "response": {
            "output": [{"content": [{"text": "long " * 500}]}],
            "usage": {"input_tokens": 20, "output_tokens": 500},
            "user": None,
        },
    }
    created = {"type": "response.created", "response": {"usage": None}}
    events = b"event: response.created\n" + sse(created) + b"event: response.completed\n"
    events += sse(completed)
    assert stream_of(events, size=1024).usage() == Usage(20, 500)


def test_the_usage_scan_bench_runs(tmp_path: Path) -> None:
    """bench/usage_scan.py (the hot path's added cost) in its --smoke mode: no figure is
    asserted, only that it measures what it says and writes its JSON."""
    stdout = run_smoke("usage_scan.py", out=tmp_path, timeout=100)
    assert "added by token counting" in stdout
    data = json.loads((tmp_path / "usage_scan-smoke.json").read_text())
    assert data["per_chunk"]["loop_with_tail_ns"] > 0
    assert data["per_answer"][0]["answer"] == "chat"
