"""The import layers of docs/architecture.md, read from the source: imports only go down, no loops, and
every import of the project's own modules inside a function is listed with its reason.

`python tests/test_layers.py` prints the report (edges that climb, loops, in-function imports)."""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Bottom to top. A module belongs to the first prefix it starts with; an import may go to its own layer
# (no loops) or any layer below.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("finetune", "finetune.errors", "finetune.distributed", "finetune.quiet")),
    ("compat", ("finetune.compat",)),
    ("kernels", ("finetune.kernels",)),
    ("family", ("finetune.family",)),
    ("fast path", ("finetune.fast",)),
    ("model", ("finetune.model",)),
    (
        "run support",
        (
            "finetune.heap",
            "finetune.health",
            "finetune.data",
            "finetune.formats",
            "finetune.mixture",
            "finetune.preferences",
            "finetune.heldout",
            "finetune.scoring",
            "finetune.labels",
            "finetune.rundir",
            "finetune.context",
            "finetune.toy",
            "finetune.esft",
        ),
    ),
    ("declarative", ("finetune.schema", "finetune.recipe", "finetune.stagetypes")),
    ("bench, predict, push", ("finetune.bench", "finetune.predict", "finetune.push")),
    ("stages", ("finetune.stages",)),
    ("pipeline", ("finetune.pipeline",)),
    ("cli", ("finetune.cli", "finetune.__main__")),
]

# Imports that climb a layer, each justified in docs/architecture.md (at most two).
CLIMBS: dict[tuple[str, str], str] = {}

# Imports of the project's own modules inside functions: only to defer a heavy optional dependency.
_CLI = "the CLI loads torch / transformers only once a verb runs: --help, --version stay fast and quiet.library_noise_off runs before libraries load"
_TRITON = "the Triton kernels import triton, which CPU-only torch builds lack: loaded only where a kernel runs (CUDA)"
DEFERRED: dict[tuple[str, str], str] = {
    ("finetune.cli", "finetune.recipe"): _CLI,
    ("finetune.cli", "finetune.pipeline"): _CLI,
    ("finetune.cli", "finetune.data"): _CLI,
    ("finetune.cli", "finetune.distributed"): _CLI,
    ("finetune.cli", "finetune.predict"): _CLI,
    ("finetune.cli", "finetune.bench.fetch"): _CLI,
    ("finetune.cli", "finetune.bench.harness"): _CLI,
    ("finetune.cli", "finetune.model.inspect"): _CLI,
    ("finetune.cli", "finetune.model.export"): _CLI,
    ("finetune.cli", "finetune.push"): _CLI,
    ("finetune.model.experts", "finetune.kernels.nf4_dequant"): _TRITON,
    ("finetune.model.experts", "finetune.kernels.nf4_decode"): _TRITON,
    ("finetune.fast.linear4bit", "finetune.kernels.nf4_dequant"): _TRITON,
    ("finetune.fast.decode", "finetune.kernels.nf4_pairs"): _TRITON,
}


def _modules() -> dict[str, Path]:
    found = {}
    for package in ("finetune", "rewards"):
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


MODULES = _modules()


def _target(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _resolve(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{base}" if base else package
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    return [t for t in map(_target, names) if t is not None and t != module]


def edges() -> list[tuple[str, str, int, bool]]:
    """(importer, imported, line, inside a function) for every import of the project's own modules."""
    out = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())

        def walk(node: ast.AST, depth: int, module: str = module) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and getattr(child.test, "id", None) == "TYPE_CHECKING":
                    continue
                if isinstance(child, ast.Import | ast.ImportFrom):
                    out.extend((module, t, child.lineno, depth > 0) for t in _resolve(module, child))
                inner = isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
                walk(child, depth + inner)

        walk(tree, 0)
    return out


def layer(module: str) -> int | None:
    """Index in LAYERS (None: the `rewards` package, a leaf outside them)."""
    best, found = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, found = len(p), i
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(MODULES):
        if v not in index:
            visit(v)
    return out


def climbs() -> list[tuple[str, str, int]]:
    out = []
    for src, dst, line, _ in edges():
        if src.startswith("rewards"):
            if not dst.startswith("rewards"):
                out.append((src, dst, line))  # the reward package is a leaf
            continue
        a, b = layer(src), layer(dst)
        if a is not None and b is not None and b > a:
            out.append((src, dst, line))
    return out


def test_every_module_has_a_layer():
    assert [m for m in MODULES if m.startswith("finetune") and layer(m) is None] == []


def test_no_import_loops():
    graph: dict[str, set[str]] = defaultdict(set)
    for src, dst, _, _ in edges():
        graph[src].add(dst)
    assert cycles(graph) == []


def test_imports_only_go_down():
    found = {(s, d) for s, d, _ in climbs()}
    assert found == set(CLIMBS), sorted(found)
    assert len(CLIMBS) <= 2


def test_imports_inside_functions_are_listed():
    found = {(s, d) for s, d, _, inner in edges() if inner}
    assert found == set(DEFERRED), sorted(found - set(DEFERRED))


def test_one_module_knows_the_family():
    users = [str(p.relative_to(ROOT)) for p in MODULES.values() if "models.deepseek_v2" in p.read_text()]
    assert users == ["finetune/family.py"]


if __name__ == "__main__":
    graph: dict[str, set[str]] = defaultdict(set)
    all_edges = edges()
    for src, dst, _, _ in all_edges:
        graph[src].add(dst)
    print("loops:", cycles(graph))
    print("no layer:", [m for m in MODULES if m.startswith("finetune") and layer(m) is None])
    print("climbing imports:")
    for src, dst, line in climbs():
        print(f"  {MODULES[src].relative_to(ROOT)}:{line} -> {dst}")
    inner = [(s, d, n) for s, d, n, i in all_edges if i]
    print(f"imports inside functions ({len(inner)}):")
    for src, dst, line in inner:
        print(f"  {MODULES[src].relative_to(ROOT)}:{line} -> {dst}")
