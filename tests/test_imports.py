"""Imports flow one way: the graph of compressor's own modules (compressor/, and kernels/ and
exporters/ as installed, compressor.kernels and compressor.exporters) has no cycle, counting
imports inside functions, and no module imports another module's private (underscore) name."""
import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOTS = {"compressor": "compressor", "compressor.kernels": "kernels", "compressor.exporters": "exporters"}


def modules():
    """{dotted module name: path} of every .py file under the three folders."""
    found = {}
    for package, folder in ROOTS.items():
        for base, _, files in os.walk(os.path.join(REPO, folder)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(base, f), os.path.join(REPO, folder))[:-3].split(os.sep)
                    if rel[-1] == "__init__":
                        rel = rel[:-1]
                    found[".".join([package, *rel])] = os.path.join(base, f)
    return found


def imports(name, path, known):
    """[(imported module, names taken from it, line)] of one module, relative imports resolved.
    `from package import module` counts as importing the module; `from package import name` (a
    name defined in the package's __init__, e.g. `from . import __version__`) as importing the
    package."""
    tree = ast.parse(open(path).read(), path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, (), node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names = tuple(a.name for a in node.names)
            submodules = [n for n in names if f"{base}.{n}" in known]
            found += [(f"{base}.{n}", (), node.lineno) for n in submodules]
            if len(submodules) < len(names):
                found.append((base, tuple(n for n in names if n not in submodules), node.lineno))
    return [(m, names, line) for m, names, line in found if m in known]


def graph():
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}, known


def edges(g):
    """Module -> the modules its code imports. A package's __init__ runs before its submodules
    anyway; only an import written in a submodule makes an edge back to its package."""
    return {m: {t for t, _, _ in found if t != m} for m, found in g.items()}


def find_cycle(adj):
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(adj.get(m, ())):
            if state.get(t) == "open":
                return stack[stack.index(t):] + [t]
            if t not in state:
                cycle = visit(t)
                if cycle:
                    return cycle
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(adj):
        if m not in state:
            cycle = visit(m)
            if cycle:
                return cycle
    return None


def test_the_import_graph_has_no_cycle():
    g, _ = graph()
    cycle = find_cycle(edges(g))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_imports_another_modules_private_name():
    g, _ = graph()
    private = [f"{m} imports {n} from {t} (line {line})" for m, found in g.items() for t, names, line in found
               for n in names if n.startswith("_") and not n.startswith("__") and t != m]
    assert not private, "\n".join(private)


def test_the_checker_sees_cycles_and_package_imports():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    g, known = graph()
    assert {"compressor.api", "compressor.kernels.masked_conv", "compressor.exporters.onnx"} <= set(known)
    assert "compressor.exporters" in edges(g)["compressor.api"]  # an import inside a function counts
    assert "compressor.kernels" in edges(g)["compressor.supernet"]  # from .kernels import ...
