"""Imports point one way: a module imports its own layer and lower ones, never a higher one.

Every ``lightrainer/**/*.py`` is parsed (not imported) and each ``import`` / ``from`` naming a
lightrainer module, at top level or inside a function, is checked against the layers below.
An import inside a function is for an optional third-party package (onnx, tensorrt, wandb, ...),
never for a lightrainer module: one that would need it sits in the wrong layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightrainer"

#: Bottom to top. A key names a module or a package (every module under it).
LAYERS: dict[str, int] = {
    # L0: the small core that imports nothing of lightrainer but itself
    "errors": 0, "registry": 0, "io": 0, "task": 0, "version": 0, "assets": 0, "logs": 0, "tables": 0,
    # L1: config and the core every task uses
    "config": 1, "optim": 1, "ema": 1, "plots": 1, "module": 1, "constraints": 1, "weights": 1, "record": 1,
    "runs": 1,
    "datamodules": 2,
    "quant": 3,
    "export": 4,
    "callbacks": 5,
    "modules": 6,
    "build": 7, "trainer": 7, "tuner": 7, "sweep": 7,
    "cli": 8,
}  # fmt: skip

#: The package itself (``import lightrainer``) imports every layer: nothing inside may import it.
PACKAGE_LAYER = max(LAYERS.values()) + 1

#: Files that may import anything: the package's own ``__init__`` (it imports everything so the
#: registries are full) and ``python -m lightrainer``.
EXEMPT = {"__init__.py", "__main__.py"}


def _module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).as_posix() not in EXEMPT)


def layer_of(module: str) -> int | None:
    """The layer of ``lightrainer.x.y`` (None: a module no layer lists)."""
    parts = module.split(".")
    if parts == ["lightrainer"]:
        return PACKAGE_LAYER
    return LAYERS.get(parts[1])


def _resolve(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    """The absolute module a ``from`` import names (relative imports resolved against ``importer``)."""
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def lightrainer_imports(path: Path, package: Path = PACKAGE) -> list[tuple[int, str, bool]]:
    """(line, imported lightrainer module, inside a function) for every import in ``path``."""
    importer = _module_name(path, package)
    is_package = path.name == "__init__.py"
    found: list[tuple[int, str, bool]] = []

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((child.lineno, a.name, inside) for a in child.names if a.name.split(".")[0] == "lightrainer")
            elif isinstance(child, ast.ImportFrom):
                module = _resolve(child, importer, is_package)
                if module.split(".")[0] != "lightrainer":
                    continue
                if module == "lightrainer":
                    # ``from lightrainer import quant`` imports a subpackage; ``import X`` of the package's names is the package.
                    for alias in child.names:
                        sub = package / alias.name
                        named = f"lightrainer.{alias.name}" if sub.is_dir() or sub.with_suffix(".py").is_file() else module
                        found.append((child.lineno, named, inside))
                else:
                    found.append((child.lineno, module, inside))
            visit(child, inside)

    visit(ast.parse(path.read_text(), filename=str(path)), False)
    return found


def violations(path: Path, package: Path = PACKAGE) -> list[str]:
    """Every import in ``path`` that points up a layer, names an unplaced module, or sits in a function."""
    rel = path.relative_to(package.parent).as_posix()
    name = _module_name(path, package)
    own = layer_of(name)
    if own is None:
        return [f"{rel}: {name} is in no layer: add it to LAYERS in tests/test_layers.py"]
    found = []
    for line, module, nested in lightrainer_imports(path, package):
        layer = layer_of(module)
        if layer is None:
            found.append(f"{rel}:{line}: imports {module}, which is in no layer (add it to LAYERS)")
        elif layer > own:
            what = "the package lightrainer (every layer)" if layer == PACKAGE_LAYER else f"{module} (layer {layer})"
            found.append(f"{rel}:{line}: layer {own} imports {what}, a higher layer")
        if nested:
            found.append(
                f"{rel}:{line}: imports {module} inside a function: import lightrainer modules at the top "
                "(an import in a function is for optional third-party packages only)"
            )
    return found


@pytest.mark.parametrize("path", _files(), ids=lambda p: p.relative_to(PACKAGE.parent).as_posix())
def test_imports_point_down(path: Path) -> None:
    found = violations(path)
    assert not found, "\n".join(found)


def test_the_checker_sees_upward_nested_and_relative_imports(tmp_path) -> None:
    # A fake package laid out like lightrainer: the checker must flag what it is written to flag.
    fake = tmp_path / "lightrainer"
    (fake / "quant").mkdir(parents=True)
    (fake / "quant" / "__init__.py").write_text("")
    (fake / "export").mkdir()
    (fake / "export" / "__init__.py").write_text("")
    bad = fake / "quant" / "bad.py"
    bad.write_text(
        "import lightrainer\n"
        "from lightrainer.export.pipeline import load_weights\n"
        "from lightrainer.errors import ConfigError\n"
        "from .base import x\n"
        "from .. import export\n"
        "def f():\n"
        "    from lightrainer.config import Config\n"
        "    import onnx\n"
    )
    assert violations(bad, fake) == [
        "lightrainer/quant/bad.py:1: layer 3 imports the package lightrainer (every layer), a higher layer",
        "lightrainer/quant/bad.py:2: layer 3 imports lightrainer.export.pipeline (layer 4), a higher layer",
        "lightrainer/quant/bad.py:5: layer 3 imports lightrainer.export (layer 4), a higher layer",
        "lightrainer/quant/bad.py:7: imports lightrainer.config inside a function: import lightrainer modules at "
        "the top (an import in a function is for optional third-party packages only)",
    ]
