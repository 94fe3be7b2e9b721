"""The package's shape: no import cycle among disp modules, no import hidden in a function, no
pointer to files or issues a reader of the repository does not have."""

import ast
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "disp"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def disp_imports(path: Path, modules: set) -> tuple:
    """(disp modules imported at module level, imports found inside functions or classes)."""
    tree = ast.parse(path.read_text(), str(path))
    top, nested = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # "from disp.support import checkpoint" imports the module disp.support.checkpoint
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]
        else:
            continue
        names = [n for n in names if n.split(".")[0] == "disp"]
        if node.col_offset > 0:
            nested.extend(f"{path.relative_to(ROOT)}:{node.lineno}" for _ in names[:1])
        top.update(names)
    return top, nested


def import_graph() -> tuple:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(f) for f in files}
    graph, nested = {}, []
    for f in files:
        top, inner = disp_imports(f, modules)
        graph[module_name(f)] = {m for m in top if m in modules and m != module_name(f)}
        nested += inner
    return graph, nested


def find_cycle(graph: dict):
    """A list of modules forming a cycle, or None (depth-first search with colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_among_disp_modules():
    graph, _ = import_graph()
    assert "disp.support.checkpoint" in graph and graph["disp.support.checkpoint"]  # the scan sees imports
    assert find_cycle(graph) is None, find_cycle(graph)


def test_no_disp_import_inside_a_function():
    _, nested = import_graph()
    assert not nested, nested


def test_data_does_not_import_the_method():
    graph, _ = import_graph()
    for module, deps in graph.items():
        if module.startswith("disp.data"):  # data needs neither the model nor the training loop
            assert not {d for d in deps if d in ("disp.model", "disp.training", "disp.evaluation", "disp.saliency")}, module


def test_nothing_points_outside_the_repository():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not tracked:  # not a git checkout: scan the usual files
        tracked = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.suffix in (".py", ".md", ".sh")]
    pattern = re.compile(r"\bMETHOD\b|STYLE\.md|\bissue [0-9]|the \w+ issue\b")
    found = []
    for name in tracked:
        path = ROOT / name
        if path.suffix not in (".py", ".md", ".sh", ".ini", ".txt") or name == "tests/test_architecture.py":
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if pattern.search(line):
                found.append(f"{name}:{number}: {line.strip()[:80]}")
    assert not found, found


def test_the_readme_layout_lists_every_module_with_its_line_count():
    """Each `disp` module appears in the README's layout table, and each single-file row's line count
    is within 10% of the file's (so the table cannot drift far from the code)."""
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout"):readme.index("## Design notes")]
    rows = re.findall(r"^\| `([^`]+)` \| (\d+) \|", layout, flags=re.M)
    assert rows, "no layout table found"
    listed = {}
    for spec, lines in rows:
        for part in spec.split(", "):
            listed[part] = int(lines) if "," not in spec else None
    for path in sorted(PACKAGE.rglob("*.py")):
        name = str(path.relative_to(ROOT))
        if path.name == "__init__.py":
            continue
        assert name in listed or any(name.endswith("/" + p) for p in listed), f"{name} is not in the README layout"
    for name, lines in listed.items():
        if lines is not None and name.endswith(".py"):
            actual = len((ROOT / name).read_text().splitlines())
            assert abs(actual - lines) <= 0.1 * actual, f"README says {name} has {lines} lines; it has {actual}"
