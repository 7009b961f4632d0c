"""Imports run downward: no cycle between rsseg modules, and the compute core imports with torch
alone (ray, mlflow, rasterio and polars only where they are used)."""

import ast
import subprocess
import sys
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "platform" / "rsseg"


def module_graph() -> dict[str, set[str]]:
    """rsseg module -> the rsseg modules it imports (anywhere in the file, lazy imports too)."""
    mods = {}
    for p in PACKAGE.rglob("*.py"):
        rel = p.relative_to(PACKAGE.parent).with_suffix("")
        mods[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = p
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                # a package importing its own submodules is the package's structure, not a cycle
                # (its submodules importing the package are edges like any other)
                if t and t != m and not t.startswith(m + "."):
                    edges[m].add(t)
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path (first module repeated at the end), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        stack.append(v)
        for w in sorted(edges[v]):
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        stack.pop()
        state[v] = 2
        return None

    for v in sorted(edges):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_between_rsseg_modules():
    edges = module_graph()
    assert len(edges) > 40  # the walk saw the package
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def layer_graph(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    """The module graph collapsed to the package's top-level parts (rsseg.pretrain, rsseg.runtags,
    ...): a loop there is an import running back up a layer, even when no two modules loop."""
    top = lambda m: ".".join(m.split(".")[:2])  # noqa: E731
    layers: dict[str, set[str]] = {}
    for m, ts in edges.items():
        layers.setdefault(top(m), set()).update(top(t) for t in ts if top(t) != top(m))
    for ts in list(layers.values()):
        for t in ts:
            layers.setdefault(t, set())
    return layers


def test_a_loop_between_parts_is_found_where_modules_do_not_loop():
    # rsseg.a.low <- rsseg.b <- rsseg.a.high: no module cycle, but rsseg.a and rsseg.b loop
    modules = {"rsseg.a.high": {"rsseg.b"}, "rsseg.b": {"rsseg.a.low"}, "rsseg.a.low": set()}
    assert find_cycle(modules) is None
    assert find_cycle(layer_graph(modules)) == ["rsseg.a", "rsseg.b", "rsseg.a"]


def test_no_import_runs_back_up_a_layer():
    layers = layer_graph(module_graph())
    assert {"rsseg.checkpoints", "rsseg.methods", "rsseg.pretrain", "rsseg.runspec"} <= set(layers)
    cycle = find_cycle(layers)
    assert cycle is None, "layer cycle: " + " -> ".join(cycle)


def test_the_config_edge_knows_no_plugin():
    edges = module_graph()
    for m in ("rsseg.config.specs", "rsseg.config.loader", "rsseg.config.profiles"):
        assert not {e for e in edges[m] if e.startswith(("rsseg.methods", "rsseg.runspec", "rsseg_baselines"))}, m


def test_compute_core_imports_with_torch_alone():
    core = ["rsseg.methods.ddpm.encoder", "rsseg.methods.ddpm.objective", "rsseg.heads.mlp", "rsseg.heads.upernet",
            "rsseg.pretrain.schedule", "rsseg.pretrain.retry", "rsseg.metrics", "rsseg.encoders"]
    code = ("import sys, importlib\n"
            f"for m in {core!r}: importlib.import_module(m)\n"
            "heavy = sorted(h for h in ('ray', 'mlflow', 'rasterio', 'polars') if h in sys.modules)\n"
            "print(','.join(heavy))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", f"the compute core imported {out.stdout.strip()}"
