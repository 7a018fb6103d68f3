"""The package's shape: every import arrow points one way (no cycle, at module or function level), no
module grows past about 450 lines, and the names the config accepts are the names the registries know."""

import ast
from pathlib import Path
from typing import get_args

PACKAGE = Path(__file__).resolve().parents[1] / "tskd_tune"
MAX_LINES = 460


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Every tskd_tune module ``path`` imports, at any level (module, function, TYPE_CHECKING excluded)."""
    tree = ast.parse(path.read_text())
    type_checking = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_checking |= {id(n) for n in ast.walk(node)}
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if id(node) in type_checking:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            # `from pkg import mod` imports the submodule when there is one
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rsplit(".", 1)[0] if "." in t else ""
            if t and t != name:
                out.add(t)
    return out


def test_no_import_cycles():
    modules = _modules()
    graph = {m: _imports(p, m, set(modules)) for m, p in modules.items()}
    # a package's __init__ that re-exports its submodules is the package's face, not a participant: an
    # import of the package from inside it would be the cycle, and that is an edge like any other
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycles.append(stack[stack.index(n) :] + [n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_module_is_too_long():
    long = {m: n for m, p in _modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_config_literals_equal_the_registries():
    from tskd_tune.config import DistillConfig, SearchConfig, StudentConfig, SyntheticConfig
    from tskd_tune.kinds import GENERATOR_KINDS
    from tskd_tune.methods import METHODS
    from tskd_tune.models.students import STUDENTS

    assert set(get_args(DistillConfig.model_fields["method"].annotation)) == set(METHODS)
    # any method can be a search's reference trial
    (baseline,) = get_args(SearchConfig.model_fields["baselines"].annotation)
    assert set(get_args(baseline)) == set(METHODS)
    assert set(get_args(StudentConfig.model_fields["model"].annotation)) == set(STUDENTS)
    # a generator is built from its kind's properties (synth.pool), so its kind is its registry entry
    assert set(get_args(SyntheticConfig.model_fields["generator"].annotation)) == set(GENERATOR_KINDS)
    from tskd_tune.search import SAMPLERS, SCHEDULERS

    assert set(get_args(SearchConfig.model_fields["algorithm"].annotation)) == set(SAMPLERS)
    assert set(get_args(SearchConfig.model_fields["scheduler"].annotation)) == set(SCHEDULERS)
