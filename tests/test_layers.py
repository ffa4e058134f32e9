"""The architecture of docs/architecture.md, checked on the source: imports point down the
layers, models/ and data/ never import each other, the engine uses a model's public surface
only, no module imports another's private names, and ``import minimask.models`` loads neither
pycocotools nor Pillow."""

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "minimask")

# The layer of each top-level part of the package (docs/architecture.md's table).
LAYERS = {
    "backend": 0, "categories": 0,
    "tensor": 1, "gradcheck": 1,
    "kernels": 2,
    "functional": 3, "ops": 3,
    "nn": 4, "optim": 4,
    "models": 5, "data": 5, "viz": 5,
    "engine": 6,
    "cli": 7, "interop": 7, "inspect": 7, "bench": 7, "__init__": 7,
}
# The one deliberate upward reference: a Tensor's operators (a + b, a[i], a.sum()) are
# Functions of functional/, looked up when called (tensor.py's _arith and _shape), as DeZero.
UPWARD_ALLOWED = {("tensor", "functional")}
# The engine may use only these attributes of a model (plus the Module methods).
MODEL_SURFACE = {"predict", "reseed", "cfg", "to", "train", "eval", "training", "parameters",
                 "named_parameters", "named_buffers", "state_dict", "load_state_dict", "zero_grad", "modules"}


def sources():
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                with open(path) as f:
                    yield rel, ast.parse(f.read(), path)


def imported_modules(module, tree):
    """(minimask.X.Y, line, imported names) for every import of the package in ``tree``."""
    package = module.split(".")[:-1]
    if module.endswith("__init__"):
        package = module.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join(["minimask"] + base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("minimask"):
                yield target, node.lineno, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("minimask"):
                    yield a.name, node.lineno, []


def part(dotted):
    """The top-level part of minimask a dotted name belongs to ("models", "tensor", ...)."""
    pieces = dotted.split(".")
    return pieces[1] if len(pieces) > 1 else "__init__"


def test_every_part_has_a_layer():
    parts = {rel.split(".")[0] for rel, _ in sources()}
    assert parts <= set(LAYERS), f"add {sorted(parts - set(LAYERS))} to LAYERS and docs/architecture.md"


def test_imports_point_down_the_layers():
    bad = []
    for rel, tree in sources():
        own = rel.split(".")[0]
        for target, line, names in imported_modules(rel, tree):
            other = part(target)
            if other == "__init__" and names:  # "from .. import nn": the names are the parts
                others = [n for n in names if n in LAYERS]
            else:
                others = [other]
            for o in others:
                if o != own and LAYERS[o] > LAYERS[own] and (own, o) not in UPWARD_ALLOWED:
                    bad.append(f"minimask/{rel.replace('.', '/')}.py:{line} imports {o} "
                               f"(layer {LAYERS[o]}) from layer {LAYERS[own]}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("a, b", [("models", "data"), ("data", "models")])
def test_models_and_data_never_import_each_other(a, b):
    bad = [f"{rel}:{line} imports {target}" for rel, tree in sources() if rel.startswith(a + ".")
           for target, line, names in imported_modules(rel, tree)
           if part(target) == b or (part(target) == "__init__" and b in names)]
    assert not bad, "\n".join(bad)


def test_no_module_imports_another_modules_private_names():
    bad = []
    for rel, tree in sources():
        for target, line, names in imported_modules(rel, tree):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                bad.append(f"{rel}:{line} imports {private} from {target}")
    assert not bad, "\n".join(bad)


def test_the_engine_uses_only_a_models_public_surface():
    bad = []
    for rel, tree in sources():
        if not rel.startswith("engine."):
            continue
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id == "model" and node.attr not in MODEL_SURFACE):
                bad.append(f"{rel}:{node.lineno} uses model.{node.attr}")
    assert not bad, "\n".join(bad)


def test_import_models_loads_no_data_libraries():
    code = ("import sys, minimask.models; "
            "print(sorted(m for m in ('pycocotools', 'PIL', 'minimask.data') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
