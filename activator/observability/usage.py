"""Token counts from the engines' answers: their OpenAI `usage` object, found without
parsing the answer.

Where `usage` is: last, or nearly so. A non-streamed answer has it as a top-level key
after `choices` / `data` / `output` (vLLM may add `prompt_logprobs`, `prompt_token_ids`
or `kv_transfer_params` after it). A stream has it only when the client asked for it
(`stream_options: {"include_usage": true}`, or vLLM's `--enable-force-include-usage`):
in one event after the last choice, just before `data: [DONE]` (with
`continuous_usage_stats`, in every event, the last one cumulative); a Responses API
stream has it in its closing `response.completed` event.

So a relayed stream keeps only its last reads (`StreamTail`: a bounded deque, one
append per chunk and nothing else on the hot path), and the usage is looked for once,
when the stream has ended, in the last TAIL_BYTES. A non-streamed body is already in
memory whole: it is searched from its end. Either way the search is for the byte string
`"usage"` followed by a colon, backwards. In valid JSON those bytes can only be an object
key (a quote inside a string is escaped), so no JSON outside the usage object is decoded;
the object itself (a few hundred bytes) is, with a bound.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass
from typing import Any

# Reads of a stream kept for the search at its end. The usage event and [DONE] are two
# writes of the engine, arriving in one or two reads; eight leave room for a network
# that splits them finer. A stream read in smaller pieces than that loses its usage (it
# is not counted), never more.
TAIL_CHUNKS = 8
# The end of a stream searched for `usage`: the usage event (about 300 bytes) and what
# follows it; a Responses API `response.completed` event has a few fields after it.
TAIL_BYTES = 16 * 1024
# Keys named "usage" tried from the end before giving up (a body may carry the word as a
# key elsewhere, e.g. in a tool's JSON schema).
MAX_KEYS = 4
# Longest usage object decoded; vLLM's, with its details, is under 300 bytes.
MAX_USAGE_BYTES = 2048
# More tokens than any one request has: a number beyond it is not a count.
MAX_TOKENS = 10**9

_KEY = b'"usage"'
_WHITESPACE = b" \t\r\n"
_DECODER = json.JSONDecoder()


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens of one answer. `cached` is the part of `input` the engine's prefix cache
    served (vLLM reports it with --enable-prompt-tokens-details), not an addition."""

    input: int
    output: int = 0
    cached: int = 0


class StreamTail:
    """The last reads of a relayed stream. `append` is all the hot path does."""

    __slots__ = ("_chunks", "append")

    def __init__(self) -> None:
        self._chunks: deque[bytes] = deque(maxlen=TAIL_CHUNKS)
        self.append = self._chunks.append

    def usage(self) -> Usage | None:
        """The usage the stream ended with, if its end has one."""
        tail = b"".join(self._chunks)
        return find_usage(tail, start=max(0, len(tail) - TAIL_BYTES))


def find_usage(data: bytes, *, start: int = 0) -> Usage | None:
    """The last `usage` object in `data[start:]`, or None when there is none (or it is
    not an OpenAI usage object)."""
    end = len(data)
    for _ in range(MAX_KEYS):
        at = data.rfind(_KEY, start, end)
        if at < 0:
            return None
        i = _skip(data, at + len(_KEY))
        if data[i : i + 1] == b":":
            i = _skip(data, i + 1)
            if data[i : i + 1] != b"{":
                return None  # "usage": null, the usual value before the last event
            return _usage(data[i : i + MAX_USAGE_BYTES])
        end = at  # the word, not a key: look further back
    return None


def _skip(data: bytes, i: int) -> int:
    while data[i : i + 1] and data[i] in _WHITESPACE:
        i += 1
    return i


def _usage(text: bytes) -> Usage | None:
    try:
        value, _ = _DECODER.raw_decode(text.decode("utf-8", "replace"))
    except ValueError:  # cut short by MAX_USAGE_BYTES, or not JSON
        return None
    if not isinstance(value, dict):
        return None
    # Chat and completions: prompt_tokens / completion_tokens; embeddings have no
    # completion_tokens; the Responses API: input_tokens / output_tokens.
    prompt = _count(value, "prompt_tokens", "input_tokens")
    if prompt is None:
        return None
    completion = _count(value, "completion_tokens", "output_tokens") or 0
    details = value.get("prompt_tokens_details") or value.get("input_tokens_details")
    cached = _count(details, "cached_tokens") if isinstance(details, dict) else None
    return Usage(input=prompt, output=completion, cached=min(cached or 0, prompt))


def _count(value: dict[str, Any], *keys: str) -> int | None:
    for key in keys:
        number = value.get(key)
        if isinstance(number, int) and not isinstance(number, bool):
            return number if 0 <= number <= MAX_TOKENS else None
    return None
