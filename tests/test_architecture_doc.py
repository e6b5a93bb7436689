"""docs/architecture.md's layer diagram is the code's: redrawn from the import graph."""

from __future__ import annotations

from tests.architecture import DOC, current


def test_the_layer_diagram_is_drawn_from_the_current_imports() -> None:
    text = DOC.read_text()
    assert current(text) == text, "stale: run python -m tests.architecture"
