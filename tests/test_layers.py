"""The package's modules form layers: no import, lazy ones included, runs back up to a module that imports it."""
import ast
from pathlib import Path

import llama_fast

PACKAGE = Path(llama_fast.__file__).parent


def _unit(module: str) -> str:
    """llama_fast.train.trainer -> train: a subpackage is one unit of the layering."""
    return module.split(".")[1] if module.count(".") else module


def import_graph() -> dict[str, set[str]]:
    """unit -> the units it imports (at module level or inside functions); the package's __init__ left out."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] in ("__init__", "__main__") and len(parts) == 2:
            continue
        module = ".".join(p for p in parts if p not in ("__init__", "__main__"))
        package = module if path.name in ("__init__.py", "__main__.py") else module.rpartition(".")[0]
        deps = graph.setdefault(_unit(module), set())
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")
                base = base[: len(base) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                names = [f"{target}.{a.name}" for a in node.names] if not node.module else [target]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                if name.startswith("llama_fast.") and _unit(name) != _unit(module):
                    deps.add(_unit(name))
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep] if dep in path else path + [dep]
            if dep not in state and (found := visit(dep, path + [dep])):
                return found
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node, [node])):
            return found
    return None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert {"data", "tokenizer", "train", "generate", "model", "convert"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_lower_layers_import_nothing_above_them():
    graph = import_graph()
    assert "data" not in graph["tokenizer"]
    assert "generate" not in graph["train"]
