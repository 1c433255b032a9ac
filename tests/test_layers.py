"""Each file on its floor: no import runs from a lower layer up to a higher one, not even
inside a function (the layer order of ../shared/DESIGN.md)."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("jaxdiff", "conversion", "tuning", "demos")

# (module prefix, layer): the longest matching prefix wins. Imports may only point to the
# same or a lower layer.
LAYERS = [
    ("jaxdiff.models", 0), ("jaxdiff.schedules", 0), ("jaxdiff.schedule_files", 0),
    ("jaxdiff.images", 0), ("jaxdiff.sampling.pytree", 0), ("jaxdiff.safetensors_io", 0),
    ("jaxdiff.checkpoint", 0), ("jaxdiff.lora", 0),
    ("conversion.convert", 1), ("conversion.safetensors_io", 1), ("conversion.checkpoint", 1),
    ("conversion.testing", 1), ("conversion.lora", 1),
    ("jaxdiff.solvers", 2), ("jaxdiff.guidance", 2), ("jaxdiff.parallel", 2),
    ("jaxdiff.sampling", 3),
    ("jaxdiff.pipeline", 4), ("jaxdiff", 4),            # the package re-exports the pipeline
    ("conversion.loaders", 5), ("conversion", 5),
    ("jaxdiff.zoo", 6),
    ("tuning", 7),
    ("tuning.cli", 8), ("jaxdiff.cli", 8), ("demos", 8), ("conversion.demo", 8),
]


def layer_of(module: str):
    best = None
    for prefix, layer in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, layer)
    return None if best is None else best[1]


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: pathlib.Path):
    """(imported module, line) for every import statement, wherever it stands."""
    mod = module_name(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")
                up = up[:len(up) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            for a in node.names:
                # ``from pkg import sub`` names a submodule when there is one
                sub = f"{base}.{a.name}"
                is_module = any((ROOT / pathlib.Path(*sub.split("."))).with_suffix(s).exists()
                                for s in (".py",)) or (ROOT / pathlib.Path(*sub.split("."))
                                                       / "__init__.py").exists()
                yield (sub if is_module else base), node.lineno


def sources():
    for pkg in PACKAGES:
        yield from sorted((ROOT / pkg).rglob("*.py"))


def test_every_source_has_a_layer():
    missing = [module_name(p) for p in sources() if layer_of(module_name(p)) is None]
    assert not missing, f"give these modules a layer in tests/test_layers.py: {missing}"


def test_no_import_runs_up_the_layers():
    upward = []
    for path in sources():
        mod = module_name(path)
        here = layer_of(mod)
        for target, line in imports_of(path):
            there = layer_of(target)
            if there is not None and there > here:
                upward.append(f"{path.relative_to(ROOT)}:{line} ({mod}, layer {here}) imports "
                              f"{target} (layer {there})")
    assert not upward, "imports that run up the layers:\n" + "\n".join(upward)


@pytest.mark.parametrize("target,expect", [("jaxdiff.sampling.run", 3),
                                           ("jaxdiff.sampling.pytree", 0),
                                           ("conversion.loaders", 5), ("tuning.cli", 8)])
def test_layer_table(target, expect):
    assert layer_of(target) == expect


def test_the_checker_sees_function_level_imports(tmp_path, monkeypatch):
    """The check would catch an upward import hidden inside a function."""
    pkg = tmp_path / "jaxdiff" / "solvers"
    pkg.mkdir(parents=True)
    (pkg / "bad.py").write_text("def f():\n    from tuning import artifacts\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    found = [(t, line) for t, line in imports_of(pkg / "bad.py")]
    assert found == [("tuning", 2)]
    assert layer_of("jaxdiff.solvers.bad") < layer_of(found[0][0])


SATELLITES = ("conversion", "tuning", "demos")


def test_the_core_imports_no_satellite():
    """Package level: nothing in ``jaxdiff`` (its CLI aside) imports ``conversion``, ``tuning``
    or ``demos``, and nothing at all imports ``demos`` (its scripts call the library)."""
    found = []
    for path in sources():
        mod = module_name(path)
        for target, line in imports_of(path):
            top = target.split(".")[0]
            core = mod.split(".")[0] == "jaxdiff" and mod != "jaxdiff.cli"
            if (core and top in SATELLITES) or (top == "demos" and not mod.startswith("demos")):
                found.append(f"{path.relative_to(ROOT)}:{line} ({mod}) imports {target}")
    assert not found, "imports of satellite packages:\n" + "\n".join(found)


def private_uses(path: pathlib.Path):
    """(module, name, line) for each private name (``_x``, not dunder) taken from another of
    our modules: ``from m import _x`` and ``alias._x`` on an imported module."""
    mod = module_name(path)
    tree = ast.parse(path.read_text(), str(path))
    ours = lambda m: m.split(".")[0] in PACKAGES  # noqa: E731
    private = lambda n: n.startswith("_") and not n.startswith("__")  # noqa: E731
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if ours(a.name) and a.asname:
                    aliases[a.asname] = a.name
        elif isinstance(node, ast.ImportFrom):
            targets = dict(imports_of_node(path, node))
            for a in node.names:
                target = targets[a.name]
                if not ours(target):
                    continue
                if target.endswith("." + a.name):          # a submodule, bound by name
                    aliases[a.asname or a.name] = target
                elif private(a.name) and target != mod:
                    yield target, a.name, node.lineno
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in aliases and private(node.attr)
                and aliases[node.value.id] != mod):
            yield aliases[node.value.id], node.attr, node.lineno


def imports_of_node(path, node):
    """(name as imported, the module it resolves to) for one ImportFrom node."""
    mod = module_name(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    base = node.module or ""
    if node.level:
        up = package.split(".")
        up = up[:len(up) - (node.level - 1)]
        base = ".".join(up + ([base] if base else []))
    for a in node.names:
        sub = f"{base}.{a.name}"
        p = ROOT / pathlib.Path(*sub.split("."))
        yield a.name, (sub if p.with_suffix(".py").exists() or (p / "__init__.py").exists()
                       else base)


def test_no_private_name_crosses_a_module():
    """A name with a leading underscore is its module's own: another module that needs it
    gets a public name (or the code moves)."""
    found = [f"{p.relative_to(ROOT)}:{line} uses {m}.{n}" for p in sources()
             for m, n, line in private_uses(p)]
    assert not found, "private names used across modules:\n" + "\n".join(found)
