"""The memory report: one JSON file per engine process, kept current, for observers.

A test or a benchmark reads a directory of them to check, from outside activator, that
no more engines hold the GPU than there are GPUs and that sleeping engines stay within
the pool's host memory. Each write is atomic; the file goes when the process exits
(cleanly: a SIGKILLed engine leaves it, and readers skip files of dead processes).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

JsonObject = dict[str, Any]


def report_path(directory: Path, pid: int | None = None) -> Path:
    return directory / f"{os.getpid() if pid is None else pid}.json"


def write_report(directory: Path, body: JsonObject) -> None:
    """Atomic: a reader sees the old file or the new one, never a partial one."""
    directory.mkdir(parents=True, exist_ok=True)
    final = report_path(directory)
    temporary = final.with_name(f".{final.name}.tmp")
    temporary.write_text(json.dumps(body))
    os.replace(temporary, final)


def read_reports(directory: Path) -> list[JsonObject]:
    """Every engine's current report in a directory (for observers: tests, benchmarks).
    A file whose process is gone (killed with SIGKILL, so it could not remove it) is
    skipped."""
    reports = []
    for path in sorted(directory.glob("*.json")):
        try:
            body: JsonObject = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            continue  # removed meanwhile
        if alive(body.get("pid")):
            reports.append(body)
    return reports


def alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, another user's
    return True
