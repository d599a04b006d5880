"""The package's import structure: no circle of modules, imports at the top of the file.

Read from the source with ``ast`` (nothing is imported), counting imports inside functions too, since
an import hidden in a function body still ties two modules together. An import inside a function is
allowed only to defer a heavy or optional dependency, and then says why in a comment on its line.
"""
from __future__ import annotations

import ast
from pathlib import Path

import voxlib

PACKAGE = Path(voxlib.__file__).parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(node: ast.AST, here: str, modules: set[str]) -> list[str]:
    """The voxlib modules one import statement names (``from voxlib import x`` may name module x)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:  # relative: resolve against this module's package
            base = here.split(".")[: -node.level] if not here.endswith("__init__") else here.split(".")
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        names = [prefix] + [f"{prefix}.{a.name}" for a in node.names]
    found = []
    for name in names:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name and name != "voxlib":
            found.append(name)
    return found


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, int, str]]]:
    """(module -> the voxlib modules it imports anywhere, [(module, line, source line) of every
    import statement inside a function body])."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    in_functions = []
    for name, path in files.items():
        source = path.read_text(encoding="utf-8")
        lines = source.splitlines()
        tree = ast.parse(source)
        for func in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            for node in ast.walk(func):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    in_functions.append((name, node.lineno, lines[node.lineno - 1].strip()))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[name].update(m for m in imported_modules(node, name, modules) if m != name)
    return graph, sorted(set(in_functions))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_itself_through_others():
    graph, _ = import_graph()
    assert cycles(graph) == []


def test_the_graph_reader_finds_a_circle_and_function_body_imports(tmp_path):
    """The checks above can fail: a made-up circle is found, and so is every import in a function."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    graph, in_functions = import_graph()
    assert "voxlib.step" in graph["voxlib.train"] and "voxlib.train" not in graph["voxlib.step"]
    assert all(line.startswith(("import ", "from ")) for _, _, line in in_functions)


def test_imports_inside_functions_only_defer_a_heavy_dependency_and_say_so():
    _, in_functions = import_graph()
    unexplained = [f"{m}:{n}: {line}" for m, n, line in in_functions if "#" not in line]
    assert unexplained == []
    assert len(in_functions) <= 6, "\n".join(f"{m}:{n}: {line}" for m, n, line in in_functions)


def test_the_run_folder_contract_and_the_command_line_stand_low():
    """runfolder.py (the contract) needs no torch, corpus or CLI code; cli.py no run-folder code."""
    graph, _ = import_graph()

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for w in graph[todo.pop()] - seen:
                seen.add(w)
                todo.append(w)
        return seen

    assert reachable("voxlib.runfolder") <= {"voxlib.fileio", "voxlib.lock", "voxlib.signals"}
    assert reachable("voxlib.cli") <= {"voxlib.config", "voxlib.signals", "voxlib.text"}
