"""The shape of the house, read from the source (docs/ARCHITECTURE.md says why it is so):

- imports between the package's rooms go one way, down the order below, lazy imports inside
  functions included; the math room (qdq) imports nothing of the package but its errors;
- no option is read from an environment variable;
- no attribute of another library (torch, transformers, ...) is reassigned;
- no function over 80 lines, no module over 600.
"""
from __future__ import annotations

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(__file__), "..", "lowbit")

# The rooms, bottom first: a room imports only rooms before it. "lowbit" is the package's top
# (lowbit/__init__.py, the public API), which only the command line above it may import.
ROOMS = [
    "errors", "version", "host", "progress", "qdq", "schemes", "quantized", "activations", "calib", "checkpoint", "experts", "model", "mixes", "algorithms", "pipeline",
    "allocate", "runtime", "export", "job", "eval", "api", "lowbit", "cli",
]
MAX_FUNCTION_LINES, MAX_MODULE_LINES = 80, 600


def modules() -> dict[str, ast.Module]:
    """{path relative to the package: parsed module} for every .py file of the package."""
    out = {}
    for root, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                with open(path) as fh:
                    out[os.path.relpath(path, PACKAGE)] = ast.parse(fh.read(), filename=path)
    return out


def room_of_file(rel: str) -> str:
    first = rel.split(os.sep)[0]
    return "lowbit" if first == "__init__.py" else first.removesuffix(".py")


def imported_modules(tree: ast.Module, rel: str) -> list[tuple[str, int]]:
    """Every module an import statement anywhere in the file names (absolute names), with its line."""
    package = ["lowbit", *rel.split(os.sep)[:-1]]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            out.append((base, node.lineno))
            # `from lowbit import x` may name a room (a subpackage) rather than an attribute
            if base == "lowbit":
                out += [(f"lowbit.{a.name}", node.lineno) for a in node.names if a.name in ROOMS]
    return out


def room_of_module(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] != "lowbit":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in ROOMS else "lowbit"


def room_imports() -> list[tuple[str, str, str, int]]:
    """(from room, to room, file, line) for every import of another room."""
    out = []
    for rel, tree in modules().items():
        src = room_of_file(rel)
        for name, line in imported_modules(tree, rel):
            dst = room_of_module(name)
            if dst is not None and dst != src and not (src == "lowbit" and name == "lowbit"):
                out.append((src, dst, rel, line))
    return out


def test_every_room_is_placed():
    on_disk = {room_of_file(rel) for rel in modules()}
    assert on_disk <= set(ROOMS), f"place the new room(s) {sorted(on_disk - set(ROOMS))} in ROOMS"


def test_imports_go_down_only():
    upward = [f"{f}:{line}: {src} imports {dst}" for src, dst, f, line in room_imports()
              if ROOMS.index(dst) > ROOMS.index(src)]
    assert not upward, "imports against the order of the rooms:\n" + "\n".join(upward)


def test_math_imports_only_errors():
    bad = [f"{f}:{line}: qdq imports {dst}" for src, dst, f, line in room_imports() if src == "qdq" and dst != "errors"]
    assert not bad, "\n".join(bad)


def test_the_import_checker_sees_lazy_and_relative_imports():
    tree = ast.parse("def f():\n    from lowbit.pipeline import quantize\n    from ..export import fake\n")
    names = [n for n, _ in imported_modules(tree, os.path.join("algorithms", "x.py"))]
    assert names == ["lowbit.pipeline", "lowbit.export"]


def _library_names(tree: ast.Module) -> set[str]:
    """Names bound anywhere in the file by importing something that is not lowbit."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names if not a.name.startswith("lowbit")}
        elif isinstance(node, ast.ImportFrom) and not node.level and not (node.module or "").startswith("lowbit"):
            names |= {a.asname or a.name for a in node.names}
    return names


def _root(node) -> str | None:
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def library_patches(tree: ast.Module) -> list[int]:
    """Lines that assign to, delete or setattr an attribute of something imported from another
    library (torch.nn.functional.x = ..., nn.Module.y = ..., setattr(F, ...))."""
    libs = _library_names(tree)
    lines = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, (ast.Assign, ast.Delete)):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("setattr", "delattr"):
            if node.args and _root(node.args[0]) in libs:
                lines.append(node.lineno)
        while targets:
            t = targets.pop()
            if isinstance(t, (ast.Tuple, ast.List)):
                targets += t.elts
            elif isinstance(t, (ast.Attribute, ast.Subscript)) and _root(t) in libs:
                lines.append(node.lineno)
    return sorted(set(lines))


def test_no_library_attribute_is_reassigned():
    found = [f"{rel}:{line}" for rel, tree in modules().items() for line in library_patches(tree)]
    assert not found, "another library's attributes changed at:\n" + "\n".join(found)


def test_the_patch_checker_finds_patches():
    src = ("import torch.nn.functional as F\nfrom torch import nn\n"
           "def f(model):\n    F.scaled_dot_product_attention = g\n    nn.Module.register_parameter = h\n"
           "    setattr(F, 'x', 1)\n    model.config.x = 1\n    d[re.escape(x)] = 1\n    a, nn.y = 1, 2\n")
    assert library_patches(ast.parse("import re\n" + src)) == [5, 6, 7, 10]


ENV_NAMES = {"environ", "getenv", "putenv", "unsetenv"}


def env_reads(tree: ast.Module) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in ENV_NAMES:
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module == "os" and {a.name for a in node.names} & ENV_NAMES:
            lines.append(node.lineno)
    return sorted(lines)


def test_no_environment_variables():
    found = [f"{rel}:{line}" for rel, tree in modules().items() for line in env_reads(tree)]
    assert not found, "environment variables read at:\n" + "\n".join(found)
    assert env_reads(ast.parse("import os\nx = os.environ.get('A')\nfrom os import getenv\n")) == [2, 3]


@pytest.mark.parametrize("rel", sorted(modules()))
def test_sizes(rel):
    tree = modules()[rel]
    with open(os.path.join(PACKAGE, rel)) as f:
        n = len(f.read().splitlines())
    assert n <= MAX_MODULE_LINES, f"{rel} has {n} lines"
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{rel}: " + ", ".join(long)
