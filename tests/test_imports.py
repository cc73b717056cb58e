"""The package's import graph: no cycles between modules or top-level units, and every import
points down the layering (imports inside functions count too)."""

import ast
from pathlib import Path

import distill_jax

ROOT = Path(distill_jax.__file__).parent

# Low to high. A unit is a subpackage or a top-level module; a unit may import units of its own
# layer or below. Within a layer only cycles are forbidden.
LAYERS = (
    ("errors", "fsutil", "sharding", "locking", "configlib", "metrics", "checkpoint"),
    ("models",),
    ("assets", "tokens", "tokenizer"),  # what a tokenizer knows; loading tokenizers
    ("losses",),
    ("xtok",),
    ("data",),
    ("onpolicy",),  # prompts, rollout rows and the sampled-token objective
    ("cache",),
    ("config",),
    ("train",),
    ("export", "plan"),
    ("eval",),
    ("traces",),
    ("demo",),
    ("cli",),
)
RANK = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (anywhere in the file)."""
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for mod, path in files.items():
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        out = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                names = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            for name in names:
                while name and name not in files:
                    name = name.rpartition(".")[0]
                if name and name != mod and not mod.startswith(name + "."):
                    out.add(name)
        graph[mod] = out
    return graph


def _unit(mod: str) -> str | None:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else None


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan, iterative)."""
    index, low, on, stack, out = {}, {}, set(), [], []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root), on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w), on.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_cycles():
    assert _cycles(_graph()) == []


def test_no_unit_cycles():
    units: dict[str, set[str]] = {}
    for mod, deps in _graph().items():
        for dep in deps:
            a, b = _unit(mod), _unit(dep)
            if a and b and a != b:
                units.setdefault(a, set()).add(b)
    assert _cycles(units) == []


def test_every_unit_has_a_layer():
    units = {_unit(m) for m in _graph()} - {None}
    assert units <= set(RANK), f"units without a layer: {sorted(units - set(RANK))}"


def test_imports_point_down_the_layering():
    upward = sorted(f"{mod} -> {dep}" for mod, deps in _graph().items() for dep in deps
                    if _unit(mod) and _unit(dep) and RANK[_unit(dep)] > RANK[_unit(mod)])
    assert upward == []


def test_tokens_imports_nothing_of_the_package():
    assert _graph()["distill_jax.tokens"] == set()
