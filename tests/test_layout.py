"""The shape of the code a student reads: the six modules of the reading path stay short, no function
is longer than a screen, imports go one way, no module reaches into another's private names, and
nothing cites a file a reader of the repository cannot open."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
READING_PATH = ("rewards.py", "grpo.py", "preresq.py", "video.py", "data.py", "evaluate.py")
MODULES = sorted(p for p in ROOT.glob("*.py"))
OURS = {p.stem for p in MODULES}


def tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def test_the_reading_path_is_short():
    lines = {name: len((ROOT / name).read_text().splitlines()) for name in READING_PATH}
    print(lines, "total", sum(lines.values()))
    assert all(n <= 610 for n in lines.values()), lines
    assert sum(lines.values()) <= 2800, lines


@pytest.mark.parametrize("name", READING_PATH)
def test_no_function_is_longer_than_sixty_lines(name):
    path = ROOT / name
    long = [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(tree(path))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60]
    assert not long, f"{path.name}: {long}"


def imports(path: Path) -> dict[str, set[str]]:
    """Our modules that `path` imports -> the names it takes from each (empty: the module itself)."""
    found: dict[str, set[str]] = {}
    for node in ast.walk(tree(path)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in OURS:
                    found.setdefault(alias.name, set())
        elif isinstance(node, ast.ImportFrom) and node.module in OURS and not node.level:
            found.setdefault(node.module, set()).update(a.name for a in node.names)
    return found


def test_imports_have_no_cycles():
    graph = {p.stem: set(imports(p)) for p in MODULES}
    state: dict[str, int] = {}

    def visit(m, trail):
        if state.get(m) == 1:
            raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(m):] + [m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            visit(n, trail + [m])
        state[m] = 2

    for m in graph:
        visit(m, [])


def test_no_module_uses_another_modules_private_names():
    bad = []
    for path in MODULES:  # (tests may test a module's private helpers)
        source = tree(path)
        for module, names in imports(path).items():
            bad += [f"{path.name}: from {module} import {n}" for n in names if n.startswith("_")]
        for node in ast.walk(source):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in OURS
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                bad.append(f"{path.name}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not bad, bad


def test_nothing_cites_a_file_the_repository_does_not_have():
    texts = [p for p in [*MODULES, *(ROOT / "tests").glob("*.py"), ROOT / "README.md", *(ROOT / "docs").glob("*")]
             if p.suffix in (".py", ".md")]
    missing = []
    for path in texts:
        text = path.read_text()
        for cited in set(re.findall(r"\b((?:[\w-]+/)*[\w-]+\.(?:md|py))\b", text)):
            name = Path(cited).name
            if not (ROOT / cited).exists() and not list(ROOT.glob(f"**/{name}")):
                missing.append(f"{path.relative_to(ROOT)} cites {cited}")
        missing += [f"{path.relative_to(ROOT)} cites an issue number" for _ in re.findall(r"\bissue \d+", text)]
    assert not missing, missing
