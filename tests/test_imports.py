"""The import graph, read from the source (every import statement, lazy ones inside functions included).

Layers, lowest first: ``refine.core`` (on-disk artifacts, shared infrastructure) <- ``refine.scorers`` and
``refine.fetch`` <- the refine stage (``refine.*``) ; ``distill`` stands on ``refine.core`` only. vLLM is imported
by one module; the scorer interface imports no backend; no package-level cycles.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VLLM_MODULE = "refine.scorers.vllm"


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in ("refine", "distill"):
        for p in sorted((REPO / pkg).rglob("*.py")):
            parts = p.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _imports(path: Path) -> set[str]:
    """Every module name ``path`` imports (absolute names; ``from X import Y`` counts as X and X.Y)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import (the project uses absolute ones)"
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    # a module importing itself (``python -m`` re-entering as its package name) is no cycle
    return {m: {n for n in _imports(p) if n in mods and n != m} for m, p in mods.items()}


def _layer(mod: str) -> str:
    for layer in ("refine.core", "refine.scorers", "refine.fetch"):
        if mod == layer or mod.startswith(layer + "."):
            return layer
    return mod.split(".")[0]


# which layers each layer may import from (itself included)
ALLOWED = {
    "refine.core": {"refine.core"},
    "refine.scorers": {"refine.core", "refine.scorers"},
    "refine.fetch": {"refine.core", "refine.fetch"},
    "refine": {"refine", "refine.core", "refine.scorers", "refine.fetch"},
    "distill": {"distill", "refine.core"},
}


def test_layers_import_only_what_is_below_them():
    bad = [f"{m} imports {n}" for m, deps in _graph().items() for n in deps
           if _layer(n) not in ALLOWED[_layer(m)]]
    assert not bad, "\n".join(bad)


def test_vllm_is_imported_by_one_module():
    mods = _modules()
    users = sorted(m for m, p in mods.items() if any(n == "vllm" or n.startswith("vllm.") for n in _imports(p)))
    assert users == [VLLM_MODULE]


def test_the_scorer_interface_imports_no_backend():
    deps = _graph()["refine.scorers.base"]
    assert not [d for d in deps if d.startswith("refine.scorers.")], deps


def test_no_package_cycles():
    """Between layers the graph is acyclic; inside one, a module never reaches itself through its imports."""
    graph = _graph()
    layers: dict[str, set[str]] = {}
    for m, deps in graph.items():
        layers.setdefault(_layer(m), set()).update(_layer(d) for d in deps if _layer(d) != _layer(m))

    def cycle_from(start, edges):
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in edges.get(node, ()):
                if nxt == start:
                    return path + [nxt]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
        return None

    for edges in (layers, graph):
        cycles = [c for c in (cycle_from(n, edges) for n in edges) if c]
        assert not cycles, " -> ".join(cycles[0])


def test_the_checker_sees_a_violation(tmp_path):
    """The graph reader finds lazy imports inside functions (a guard that cannot fail guards nothing)."""
    p = tmp_path / "m.py"
    p.write_text("def f():\n    from refine.scorers.vllm import VLLMScorer\n    import vllm\n")
    assert {"refine.scorers.vllm", "refine.scorers.vllm.VLLMScorer", "vllm"} <= _imports(p)
