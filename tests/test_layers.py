"""The layers of the package, checked from the source: no module-level import cycle anywhere, the core (nr/)
imports nothing of the app, the config and the analysis load no torch."""
import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1] / "nr_study"
MODULES = {".".join(p.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__"): p
           for p in ROOT.rglob("*.py")}


def module_level_imports(path: pathlib.Path) -> set[str]:
    """The nr_study modules a module imports when it loads (function-local imports and TYPE_CHECKING blocks are
    deliberate and do not count)."""
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return {m for m in out if m in MODULES}


def find_cycle(graph: dict) -> list:
    state, stack = {}, []

    def visit(v):
        state[v] = "open"
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == "open":
                return stack[stack.index(w):] + [w]
            if w not in state and (c := visit(w)):
                return c
        stack.pop()
        state[v] = "done"
        return None

    for v in sorted(graph):
        if v not in state and (c := visit(v)):
            return c
    return []


def test_no_import_cycle():
    graph = {m: module_level_imports(p) - {m} for m, p in MODULES.items()}
    assert find_cycle(graph) == []


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_the_core_imports_nothing_of_the_app():
    """nr/ may use the standard-library helpers (schema: validated dataclasses; errors) and itself, nothing else."""
    allowed = ("nr_study.nr", "nr_study.schema", "nr_study.errors")
    for m, p in MODULES.items():
        if m.startswith("nr_study.nr.") or m == "nr_study.nr":
            tree = ast.parse(p.read_text())
            used = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
            used |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
            bad = sorted(u for u in used if u.startswith("nr_study") and not u.startswith(allowed))
            assert not bad, f"{m} imports {bad}"


def test_config_and_nr_settings_load_without_torch():
    code = ("import sys; import nr_study.config, nr_study.nr.settings, nr_study.methods; "
            "from nr_study.nr import NRConfig; assert NRConfig is nr_study.config.NRCfg; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
