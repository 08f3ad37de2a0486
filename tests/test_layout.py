"""The shape of the code a student reads: the six paper files stay short and at the top, no function
is longer than a screen, each paper file pulls in only what it needs (imports go one way and the
step lifts out), the folders beside them stand wholly below them or wholly above, no file is longer
than a sitting, no module reaches into another's private names, and nothing cites a file a reader
of the repository cannot open."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
READING_PATH = ("rewards.py", "grpo.py", "preresq.py", "video.py", "data.py", "evaluate.py")
FOLDERS = ("support", "harness", "tools")
MODULES = sorted([*ROOT.glob("*.py"), *(p for folder in FOLDERS for p in ROOT.glob(f"{folder}/*.py"))])
NAMES = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p for p in MODULES}
# What each paper file may pull in when imported (the entry points import the machinery they run,
# inside the function that starts it).
ALLOWED = {"rewards": set(), "video": {"support", "support.frames", "support.cli"},
           "preresq": {"rewards", "support", "support.prompt_sharing"},
           "grpo": {"rewards", "preresq", "support", "support.prompt_sharing"}}
ENTRY_POINTS = {"main", "command", "train", "loop", "score_files", "score"}


def tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def top_level(node):
    """The statements run when the module is imported (not those inside functions)."""
    for child in ast.iter_child_nodes(node):
        if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield child
            yield from top_level(child)


def imported(nodes) -> dict[str, set[str]]:
    """Our modules that the import statements among `nodes` import -> the names taken from each."""
    found: dict[str, set[str]] = {}
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in NAMES:
                    found.setdefault(alias.name, set())
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            if node.module in NAMES:
                found.setdefault(node.module, set())
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                if full in NAMES:
                    found.setdefault(full, set())
                elif node.module in NAMES:
                    found[node.module].add(alias.name)
    return found


PACKAGE = lambda m: {m.split(".")[0]} if m.startswith(("support.", "harness.")) else set()
GRAPH = {m: set(imported(top_level(tree(p)))) | PACKAGE(m) for m, p in NAMES.items()}
# Counting the imports inside functions too: what a module may load at some point.
EVERY_IMPORT = {m: set(imported(ast.walk(tree(p)))) | PACKAGE(m) for m, p in NAMES.items()}


def closure(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        for n in GRAPH[todo.pop()] - seen:
            seen.add(n)
            todo.append(n)
    return seen


def test_the_reading_path_is_short():
    lines = {name: len((ROOT / name).read_text().splitlines()) for name in READING_PATH}
    print(lines, "total", sum(lines.values()))
    assert all(n <= 600 for n in lines.values()), lines
    assert sum(lines.values()) <= 2800, lines


def test_the_paper_files_alone_stand_at_the_top():
    assert {p.name for p in ROOT.glob("*.py")} == set(READING_PATH)


@pytest.mark.parametrize("name", READING_PATH)
def test_no_function_is_longer_than_sixty_lines(name):
    path = ROOT / name
    long = [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(tree(path))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60]
    assert not long, f"{path.name}: {long}"


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_each_paper_file_pulls_in_only_what_it_needs(module):
    pulled = closure(module)
    lines = sum(len(NAMES[m].read_text().splitlines()) for m in pulled)
    print(module, sorted(pulled), lines, "lines")
    assert pulled <= ALLOWED[module], sorted(pulled - ALLOWED[module])


@pytest.mark.parametrize("name", READING_PATH)
def test_paper_files_import_the_machinery_only_where_a_command_starts(name):
    """Inside a function, a paper file may import support modules only in its entry points."""
    bad = []
    for node in ast.walk(tree(ROOT / name)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name not in ENTRY_POINTS:
            inner = [n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))]
            bad += [f"{node.name}: {m}" for m in imported(inner) if m not in ALLOWED.get(name[:-3], set(NAMES))]
    assert not bad, bad


@pytest.mark.parametrize("graph", ["module level", "inside functions too"])
def test_imports_have_no_cycles(graph):
    edges = GRAPH if graph == "module level" else EVERY_IMPORT
    state: dict[str, int] = {}

    def visit(m, trail):
        if state.get(m) == 1:
            raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(m):] + [m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for n in sorted(edges.get(m, ())):
            visit(n, trail + [m])
        state[m] = 2

    for m in edges:
        visit(m, [])


def test_grpo_imports_only_rewards_and_preresq():
    assert {m for m in GRAPH["grpo"] if not m.startswith("support")} <= {"rewards", "preresq"}
    assert not {m for m in GRAPH["grpo"] if m.startswith("support")}, GRAPH["grpo"]


def test_each_folder_stands_wholly_below_the_paper_files_or_wholly_above():
    """Below: none of its files imports a paper file (not even inside a function). Above: no paper
    file imports any of its files at module level (their commands may, where they start)."""
    papers = {name[:-3] for name in READING_PATH}
    for folder in FOLDERS:
        files = {m for m in NAMES if m.startswith(folder + ".")}
        below = not any(EVERY_IMPORT[m] & papers for m in files)
        above = not any(GRAPH[p] & (files | {folder}) for p in papers)
        print(folder, "below" if below else "", "above" if above else "")
        assert below or above, folder


def test_no_file_outside_the_paper_files_and_tests_is_longer_than_about_450_lines():
    long = {str(p.relative_to(ROOT)): n for p in MODULES if p.name not in READING_PATH or p.parent != ROOT
            if (n := len(p.read_text().splitlines())) > 450}
    assert not long, long


def test_no_module_uses_another_modules_private_names():
    short = {m.split(".")[-1] for m in NAMES}
    bad = []
    for path in MODULES:  # (tests may test a module's private helpers)
        source = tree(path)
        for module, names in imported(ast.walk(source)).items():
            bad += [f"{path.name}: from {module} import {n}" for n in names if n.startswith("_")]
        for node in ast.walk(source):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in short
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
