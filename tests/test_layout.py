"""The shape of the library: stages import only lower stages, nothing but the UI imports Streamlit,
no import cycle (imports inside functions included), few imports inside functions, short modules.

Every rule is read off the source with `ast`, so it covers every subpackage, present and future.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "mka_core"

# Stages, lowest first; a module may import its own stage and any lower one, never a higher one.
# Top-level modules (errors, files, jsonfields) are the base every stage may use.
STAGES = [
    "base",
    "data",
    "engine",
    "models",
    "analysis",
    "compression",
    "evaluation",
    "figures",
    "workflows",
    "cli",
    "ui",
]
RANK = {name: i for i, name in enumerate(STAGES)}
# optional dependencies that must stay lazy (imported inside the function that needs them)
LAZY_OK = ("ray", "umap", "playwright", "llama_cpp", "lm_eval")
MAX_INNER_IMPORTS = 40
MAX_LINES = 620  # "no module past ~600 lines"
MAX_TOP_LEVEL_MODULES = 8


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts)
        out[name.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _stage(module: str) -> str:
    parts = module.split(".")
    if module == "mka_core.__main__":  # `python -m mka_core` is the command line's entry point
        return "cli"
    if len(parts) == 1 or (len(parts) == 2 and not (PKG / parts[1]).is_dir()):
        return "base"
    return parts[1]


def _imports(module: str) -> list[tuple[str, bool]]:
    """(imported module, inside a function) for every import statement of `module`."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    inner = {
        id(n)
        for f in ast.walk(tree)
        if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
        for n in ast.walk(f)
        if isinstance(n, ast.Import | ast.ImportFrom)
    }
    pkg = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            out += [(a.name, id(n) in inner) for a in n.names]
        elif isinstance(n, ast.ImportFrom):
            if n.level:
                base = pkg.split(".")[: len(pkg.split(".")) - (n.level - 1)]
                mod = ".".join(base + ([n.module] if n.module else []))
            else:
                mod = n.module or ""
            for a in n.names:  # `from pkg import module` imports the module
                full = f"{mod}.{a.name}"
                out.append((full if full in MODULES else mod, id(n) in inner))
    return out


def _graph() -> dict[str, set[str]]:
    graph = {}
    for module in MODULES:
        deps = set()
        for target, _ in _imports(module):
            while target and target not in MODULES and "." in target:
                target = target.rsplit(".", 1)[0]
            if target not in MODULES or target == module:
                continue
            deps.add(target)
            # importing a.b.c runs a/__init__ and a/b/__init__ first
            parent = target
            while "." in parent:
                parent = parent.rsplit(".", 1)[0]
                if parent in MODULES and not module.startswith(parent + "."):
                    deps.add(parent)
        deps.discard(module)
        graph[module] = deps
    return graph


def test_every_stage_is_known():
    unknown = {_stage(m) for m in MODULES} - set(STAGES)
    assert not unknown, f"add the new stage(s) {unknown} to STAGES in their place"


def test_lower_stages_never_import_higher_ones():
    bad = [
        f"{m} ({_stage(m)}) imports {d} ({_stage(d)})"
        for m, deps in _graph().items()
        for d in deps
        if d != "mka_core" and RANK[_stage(d)] > RANK[_stage(m)]
    ]
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return path + [m, d]
            if d not in state and (cycle := visit(d, path + [m])):
                return cycle
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m, [])):
            pytest.fail("import cycle: " + " -> ".join(cycle[cycle.index(cycle[-1]) :]))


def test_only_ui_imports_streamlit():
    for module in MODULES:
        if _stage(module) == "ui":
            continue
        names = [t for t, _ in _imports(module)]
        assert not any(t.split(".")[0] == "streamlit" for t in names), module


def test_imports_live_at_the_top():
    inner = [
        (m, t)
        for m in MODULES
        for t, is_inner in _imports(m)
        if is_inner and not t.startswith(LAZY_OK)
    ]
    lazy = [(m, t) for m in MODULES for t, is_inner in _imports(m) if is_inner]
    assert not inner, f"imports inside functions (only optional dependencies may be lazy): {inner}"
    assert len(lazy) < MAX_INNER_IMPORTS


def test_modules_are_short_and_the_top_is_small():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these by purpose: {long}"
    top = [p.name for p in PKG.glob("*.py")]
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top
    for sub in PKG.iterdir():
        if sub.is_dir() and not sub.name.startswith("__"):
            init = sub / "__init__.py"
            assert init.is_file() and ast.get_docstring(ast.parse(init.read_text())), (
                f"{sub.name}/ needs an __init__.py whose docstring says what the stage owns"
            )


def test_no_comment_cites_a_file_users_do_not_have():
    hits = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in [*PKG.rglob("*.py"), *(ROOT / "pages").glob("*.py"), ROOT / "app.py"]
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if "SPEC §" in line or "SPEC.md" in line
    ]
    assert not hits, hits


def test_tests_mirror_the_stages():
    """A stage's tests live in tests/<stage>/ (the base modules' beside this file)."""
    for stage in STAGES:
        if stage in ("base", "figures"):  # figures are exercised through the app tests
            continue
        folder = ROOT / "tests" / stage
        assert any(folder.glob("test_*.py")), f"no tests in tests/{stage}/"
