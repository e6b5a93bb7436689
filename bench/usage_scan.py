"""What counting tokens costs the proxy: the work activator.observability.usage adds per
relayed chunk, per stream and per non-streamed answer, against parsing the JSON instead.

  python bench/usage_scan.py            # about a minute
  python bench/usage_scan.py --smoke    # seconds; CI
Options: --out DIR

Per chunk: the relay loop over vLLM-shaped SSE chunks, with and without the one thing it
now does per chunk (`StreamTail.append`); the difference, per chunk, is the hot path's
added cost. For scale: `json.loads` of each event, which a parse-every-chunk design would
pay. Per stream, once at its end: `StreamTail.usage()` on the tail of a stream that asked
for its usage and of one that did not. Per non-streamed answer: `find_usage` on a chat
answer and on embeddings answers of growing size, against `json.loads` of the same body.
Best of several repeats of timeit loops (the least disturbed by other processes).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

import benchlib as bl

from activator.observability.usage import StreamTail, find_usage

USAGE = {"prompt_tokens": 812, "completion_tokens": 256, "total_tokens": 1068}
HEAD = {
    "id": "chatcmpl-0f5c2b6e9d1a4c7f8e3b2a1d0c9e8f7a",
    "object": "chat.completion.chunk",
    "created": 1767225600,
    "model": "Qwen/Qwen2.5-Coder-7B-Instruct",
}


def event(value: Any) -> bytes:
    return b"data: " + json.dumps(value, separators=(",", ":")).encode() + b"\n\n"


def token_chunk(i: int) -> bytes:
    choice = {"index": 0, "delta": {"content": f" tok{i}"}, "logprobs": None, "finish_reason": None}
    return event({**HEAD, "choices": [choice]})


def stream_chunks(n: int, *, usage: bool) -> list[bytes]:
    """A vLLM stream as read: one event per read, then the usage event, then [DONE]."""
    chunks = [token_chunk(i) for i in range(n)]
    if usage:
        chunks.append(event({**HEAD, "choices": [], "usage": USAGE}))
    return [*chunks, b"data: [DONE]\n\n"]


def embeddings_body(inputs: int, dims: int = 4096) -> bytes:
    data = [
        {"object": "embedding", "index": i, "embedding": [0.0123456789] * dims}
        for i in range(inputs)
    ]
    answer = {
        "id": "embd-1",
        "object": "list",
        "created": 1767225600,
        "model": "e5",
        "data": data,
        "usage": {"prompt_tokens": 9 * inputs, "total_tokens": 9 * inputs},
    }
    return json.dumps(answer).encode()


def best(fn: Callable[[], object], *, number: int, repeat: int) -> float:
    """Seconds per call: the best of `repeat` timeit runs of `number` calls."""
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number


def per_chunk(chunks: list[bytes], *, repeat: int) -> dict[str, float]:
    def plain() -> None:
        for _chunk in chunks:
            pass

    def kept() -> None:
        tail = StreamTail()
        keep = tail.append
        for chunk in chunks:
            keep(chunk)

    def parsed() -> None:
        for chunk in chunks:
            if chunk.startswith(b"data: {"):
                json.loads(chunk[6:])

    n = len(chunks)
    base = best(plain, number=5, repeat=repeat) / n
    with_tail = best(kept, number=5, repeat=repeat) / n
    return {
        "loop_ns": base * 1e9,
        "loop_with_tail_ns": with_tail * 1e9,
        "added_ns": (with_tail - base) * 1e9,
        "json_loads_per_event_ns": best(parsed, number=1, repeat=repeat) / n * 1e9,
    }


def per_stream(*, repeat: int) -> dict[str, float]:
    results = {}
    for name, usage in (("with_usage", True), ("without_usage", False)):
        tail = StreamTail()
        for chunk in stream_chunks(200, usage=usage):
            tail.append(chunk)
        assert (tail.usage() is not None) == usage
        results[f"{name}_us"] = best(tail.usage, number=2000, repeat=repeat) * 1e6
    return results


def per_answer(*, repeat: int, sizes: tuple[int, ...]) -> list[dict[str, Any]]:
    chat = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1767225600,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "word " * 200},
                "finish_reason": "stop",
            }
        ],
        "usage": USAGE,
    }
    bodies = [("chat", json.dumps(chat).encode())]
    bodies += [(f"embeddings x{n}", embeddings_body(n)) for n in sizes]
    # The worst case: no usage key anywhere (an engine that does not report it), so
    # the search reads the whole body.
    largest = embeddings_body(sizes[-1]).replace(b'"usage"', b'"other"')
    bodies.append((f"embeddings x{sizes[-1]}, no usage", largest))
    rows = []
    for name, body in bodies:
        assert (find_usage(body) is not None) == ("no usage" not in name)
        number = max(1, 200_000 // len(body))
        rows.append(
            {
                "answer": name,
                "bytes": len(body),
                "find_usage_us": best(lambda b=body: find_usage(b), number=number, repeat=repeat)
                * 1e6,
                "json_loads_us": best(lambda b=body: json.loads(b), number=number, repeat=repeat)
                * 1e6,
            }
        )
    return rows


def report(data: dict[str, Any]) -> str:
    c, s = data["per_chunk"], data["per_stream"]
    lines = [
        "| per relayed chunk | ns |",
        "|---|---|",
        f"| relay loop alone (iteration) | {c['loop_ns']:.1f} |",
        f"| with StreamTail.append | {c['loop_with_tail_ns']:.1f} |",
        f"| **added by token counting** | **{c['added_ns']:.1f}** |",
        f"| json.loads of each event (not done) | {c['json_loads_per_event_ns']:.0f} |",
        "",
        "| per stream, at its end | us |",
        "|---|---|",
        f"| StreamTail.usage(), stream with usage | {s['with_usage_us']:.2f} |",
        f"| StreamTail.usage(), stream without | {s['without_usage_us']:.2f} |",
        "",
        "| non-streamed answer | bytes | find_usage us | json.loads us |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['answer']} | {r['bytes']:,} | {r['find_usage_us']:.2f} | {r['json_loads_us']:.1f} |"
        for r in data["per_answer"]
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="seconds, for CI")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    repeat = 2 if args.smoke else 7
    started = time.monotonic()
    data: dict[str, Any] = {
        "benchmark": "usage_scan",
        "command": " ".join(["python", "bench/usage_scan.py", *sys.argv[1:]]),
        "machine": bl.machine(),
        "per_chunk": per_chunk(
            stream_chunks(2_000 if args.smoke else 200_000, usage=True), repeat=repeat
        ),
        "per_stream": per_stream(repeat=repeat),
        "per_answer": per_answer(repeat=repeat, sizes=(1, 10) if args.smoke else (1, 10, 100)),
    }
    data["seconds"] = round(time.monotonic() - started, 1)
    text = report(data)
    # A smoke run's results go to an ignored file: never over the committed figures.
    name = "usage_scan-smoke" if args.smoke else "usage_scan"
    path = bl.write_results(name, data, out_dir=args.out)
    print(text)
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
