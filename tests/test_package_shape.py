"""The chatglm package's imports run one way (bottom to top) and sit at the top of each module, so a reader can
follow them and a new cycle fails here rather than as an ImportError in someone's script. Read from the source."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "chatglm"
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py"))


def package_imports(node: ast.AST) -> list:
    """chatglm modules that one import statement names (relative or absolute)."""
    if isinstance(node, ast.ImportFrom):
        if node.level == 1 or (node.level == 0 and (node.module or "").split(".")[0] == "chatglm"):
            parts = (node.module or "").split(".")
            name = parts[0] if node.level == 1 else (parts[1] if len(parts) > 1 else "")
            if name:
                return [name]
            return [a.name for a in node.names if a.name in MODULES]  # from . import x
    if isinstance(node, ast.Import):
        return [a.name.split(".")[1] for a in node.names if a.name.startswith("chatglm.")]
    return []


def parse(module: str) -> ast.Module:
    return ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))


def import_graph() -> dict:
    graph = {}
    for module in MODULES:
        deps = set()
        for node in parse(module).body:
            deps.update(package_imports(node))
        graph[module] = deps - {module}
    return graph


def reachable(graph: dict, start: str) -> set:
    seen, todo = set(), list(graph[start])
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph.get(m, ()))
    return seen


def test_the_graph_is_read_from_the_real_package():
    graph = import_graph()
    assert {"modeling", "loading", "checkpoint"} <= set(graph)
    assert "modeling" in graph["loading"] and "checkpoint" in graph["loading"]  # the parser sees relative imports


def test_no_import_cycle_inside_the_package():
    graph = import_graph()
    cycles = sorted(m for m in graph if m in reachable(graph, m))
    assert not cycles, f"these chatglm modules import themselves through others (a cycle): {cycles}"


def test_no_import_of_a_chatglm_module_below_the_top_of_a_module():
    hidden = []
    for module in MODULES:
        tree = parse(module)
        for scope in ast.walk(tree):
            if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                for node in ast.walk(scope):
                    for name in package_imports(node):
                        hidden.append(f"{module}.py:{node.lineno} {scope.name} imports {name}")
    assert not hidden, "imports of chatglm modules inside functions or classes hide a cycle: " + "; ".join(hidden)


def test_the_network_does_not_depend_on_loading_or_cpu_packing():
    graph = import_graph()
    assert not {"loading", "cpu_pack"} & reachable(graph, "modeling")
    assert not reachable(graph, "checkpoint"), "checkpoint.py is the bottom: it imports nothing of ours"
