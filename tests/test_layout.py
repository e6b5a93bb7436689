"""The package's layout: no import cycles, no import from a lower layer to a higher one,
and no fake API server in the wheel (issue 19).

The module graph comes from the source with `ast` (nothing is imported): every
`import` and `from ... import` anywhere in a module counts, those under
`if TYPE_CHECKING:` and inside functions too, since a cycle for types is still a cycle
for the reader. `from package import name` is an edge to `package.name` when that is a
module, else to the package.

LAYERS maps module prefixes to layer numbers, lowest first; the longest prefix wins
(`activator.config.ha` is configuration, the rest of `activator.ha` is HA). A module
may import its own layer or lower ones, never higher; within a layer, never in a cycle.
A new module falls under its package's prefix; a new top-level module needs a row.
"""

from __future__ import annotations

import ast
import fnmatch
import tomllib
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "activator"

# The packages, lowest layer first: a package may import its own layer and those below.
LAYERS: dict[str, int] = {
    # 0 core: typed errors, guarded tasks, the names of a model's states
    "activator": 0,  # the package itself: its docstring and version
    "activator.core": 0,
    # 1 configuration
    "activator.config": 1,
    # 2 observability
    "activator.observability": 2,
    # 3 talking to an engine over HTTP
    "activator.engine": 3,
    # 4 placement: pure policy, scaling, routing to pods, the scale-out loop
    "activator.placement": 4,
    # 5 backends
    "activator.backends": 5,
    # 6 a model
    "activator.model": 6,
    # 7 the fleet: the registry and the pools
    "activator.fleet": 7,
    # 8 config reload
    "activator.reload": 8,
    # 9 the request edge
    "activator.edge": 9,
    # 10 the status page
    "activator.ui": 10,
    # 11 several replicas
    "activator.ha": 11,
    # 12 top: the app, its entry points, and the stand-in engine demos run
    "activator.app": 12,
    "activator.cli": 12,
    "activator.litellm_config": 12,
    "activator.__main__": 12,
    "activator.testing": 12,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}


def imported(name: str, path: Path, known: set[str]) -> Iterator[str]:
    """The package's modules that `name` (at `path`) imports, anywhere in its body."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield from _within(alias.name, known)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                # Relative: level 1 is the module's own package (a package's own name).
                base = name.split(".")
                drop = node.level - 1 if is_package else node.level
                base = base[: len(base) - drop] if drop else base
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                if sub in known:
                    yield sub  # `from package import module`
                else:
                    yield from _within(source, known)


def _within(target: str, known: set[str]) -> Iterator[str]:
    """`target` if it is one of the package's modules, else its nearest known parent
    within the package (`import activator.x.y` of a name that is not a module)."""
    while target:
        if target in known:
            yield target
            return
        if "." not in target:
            return
        target = target.rsplit(".", 1)[0]


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {
        name: {t for t in imported(name, path, known) if t != name} for name, path in found.items()
    }


def layer(name: str) -> int:
    prefix = max(
        (p for p in LAYERS if name == p or name.startswith(p + ".")), key=len, default=None
    )
    if prefix is None:
        raise AssertionError(f"{name} is in no layer: add a row to LAYERS")
    return LAYERS[prefix]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(found)


def test_the_graph_sees_every_kind_of_import(tmp_path: Path) -> None:
    """The parser itself: relative, TYPE_CHECKING and function-level imports count, and
    `from package import module` is an edge to the module."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    for name in ("__init__", "a", "b", "c", "d", "sub/__init__", "sub/e"):
        (package / f"{name}.py").write_text("")
    (package / "sub" / "f.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "import pkg.a\n"
        "from .. import b\n"
        "from ..c import thing\n"
        "from . import e\n"
        "if TYPE_CHECKING:\n"
        "    from pkg.sub import __name__\n"
        "def later():\n"
        "    import pkg.d.attribute\n"
    )
    known = {"pkg", "pkg.a", "pkg.b", "pkg.c", "pkg.d", "pkg.sub", "pkg.sub.e", "pkg.sub.f"}
    found = set(imported("pkg.sub.f", package / "sub" / "f.py", known))
    assert found == {"pkg.a", "pkg.b", "pkg.c", "pkg.d", "pkg.sub", "pkg.sub.e"}
    (package / "sub" / "__init__.py").write_text("from . import e\nfrom .. import a\n")
    assert set(imported("pkg.sub", package / "sub" / "__init__.py", known)) == {
        "pkg.sub.e",
        "pkg.a",
    }

    edges = graph()
    assert "activator.placement.scaleout" in edges["activator.model.tasks"]  # TYPE_CHECKING
    assert all(name in edges for name in LAYERS), "a LAYERS row names no module"


def test_no_import_cycles() -> None:
    found = cycles(graph())
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_no_upward_imports() -> None:
    edges = graph()
    upward = [
        f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
        for a in sorted(edges)
        for b in sorted(edges[a])
        if layer(b) > layer(a)
    ]
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def wheel_packages() -> list[str]:
    """The packages `[tool.setuptools.packages.find]` gives (no namespace packages: a
    folder counts when it has an __init__.py), as setuptools' find_packages does."""
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"][
        "find"
    ]
    where = ROOT / (find.get("where") or ["."])[0]
    include = find.get("include") or ["*"]
    exclude = find.get("exclude") or []
    found = []
    for init in sorted(where.rglob("__init__.py")):
        name = ".".join(init.parent.relative_to(where).parts)
        if not name or any(not part.isidentifier() for part in name.split(".")):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in include) and not any(
            fnmatch.fnmatchcase(name, p) for p in exclude
        ):
            found.append(name)
    return found


def test_wheel_packages_are_found() -> None:
    """The helper below reads pyproject as setuptools does: the product is in."""
    packages = wheel_packages()
    assert {"activator", "activator.backends.kube", "activator.ha"} <= set(packages)
    assert not any(p.startswith("tests") for p in packages)


def test_wheel_carries_no_fake_api_server() -> None:
    """The fake Kubernetes API server and its kubelet are test doubles, not product: no
    package of the wheel holds them (the stand-in engine stays: the demo runs it)."""
    carried = []
    for package in wheel_packages():
        folder = ROOT.joinpath(*package.split("."))
        if "fakekube" in package.split("."):
            carried.append(package)
        fakes = [f.stem for f in folder.glob("*.py") if f.stem in ("fake_kube", "fakekube")]
        carried += [f"{package}.{stem}" for stem in fakes]
    assert not carried, f"the wheel carries the fake API server: {carried}"
