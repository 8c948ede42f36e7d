"""The package's structure: no import cycle (lazy imports inside functions
included), no private name imported across modules, and leaf modules that
import nothing else of the package. Read from the sources (ast), so it fails
on the change that breaks it, whatever the import order at run time."""
import ast
import pathlib

import pgest

PKG = pathlib.Path(pgest.__file__).parent
LEAVES = {"pgest._status", "pgest._checks", "pgest._vmap", "pgest._apply"}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports():
    """{module: [(imported module, [names], lineno)]} for every pgest module."""
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        mod = _module_name(path)
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        found = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                if node.module:
                    found.append((target, [a.name for a in node.names], node.lineno))
                else:  # from . import a, b: the modules a and b
                    found.extend((f"{target}.{a.name}", [], node.lineno) for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pgest"):
                found.append((node.module, [a.name for a in node.names], node.lineno))
            elif isinstance(node, ast.Import):
                found.extend((a.name, [], node.lineno) for a in node.names if a.name.startswith("pgest"))
        out[mod] = found
    return out


def test_no_import_cycle():
    imports = _imports()
    graph = {m: {t for t, _, _ in deps if t in imports and t not in (m, "pgest")} for m, deps in imports.items()}
    state, stack, cycles = {}, [], []

    def visit(u):
        state[u] = "open"
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == "open":
                cycles.append(" -> ".join(stack[stack.index(v):] + [v]))
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "\n".join(cycles)


def test_no_private_name_crosses_modules():
    bad = [f"{m}:{line} imports {name} from {target}" for m, deps in _imports().items()
           for target, names, line in deps for name in names
           if name.startswith("_") and not name.startswith("__") and name != "_C"]
    assert not bad, "\n".join(bad)


def test_leaf_modules_import_nothing_of_the_package():
    imports = _imports()
    bad = [f"{m} imports {t}" for m in LEAVES for t, _, _ in imports[m] if t.startswith("pgest") and t != "pgest._C"]
    assert not bad, "\n".join(bad)


def test_every_registered_handle_is_named_op():
    ops = [name for name in dir(__import__("torch").ops.pgest) if not name.startswith("_")]
    assert len(ops) >= 12
    handles = {}
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and any(
                    isinstance(d, ast.Call) and ast.unparse(d.func).endswith("custom_op") for d in node.decorator_list):
                handles[node.name] = path.name
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and \
                    "custom_op" in ast.unparse(node.value):
                handles[ast.unparse(node.targets[0])] = path.name
    assert handles and all(h.endswith("_op") for h in handles), handles


def test_modules_registering_ops_keep_their_annotations_objects():
    # torch.library.custom_op reads the annotations of the function it
    # registers, and postponed annotations (from __future__ import
    # annotations) are strings, which some torch releases cannot read (2.4.1
    # failed at pgest's import): objects read alike everywhere
    for path in sorted(PKG.rglob("*.py")):
        tree = ast.parse(path.read_text())
        registers = any(isinstance(n, ast.Attribute) and n.attr == "custom_op" for n in ast.walk(tree))
        postponed = any(isinstance(n, ast.ImportFrom) and n.module == "__future__"
                        and any(a.name == "annotations" for a in n.names) for n in tree.body)
        assert not (registers and postponed), f"{path.relative_to(PKG.parent)} registers ops with postponed annotations"
