"""Import rules of the layout (DESIGN.md): data flows one way, each package one job.

Parsed from the source with `ast`, so an import inside a function counts as much as one at the
top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = frozenset(
    {"core", "dicom_node", "models", "serving", "training", "evaluation", "cli", "benchmarks"}
)
ALLOWED: dict[str, frozenset[str]] = {
    "core": frozenset(),
    "dicom_node": frozenset({"core"}),
    "models": frozenset({"core"}),
    "serving": frozenset({"core", "models", "dicom_node"}),
    "training": frozenset({"core", "models", "dicom_node"}),
    "evaluation": frozenset({"core", "models", "dicom_node", "training"}),
    "cli": OURS - {"cli", "benchmarks"},
}


def _imports(path: Path) -> set[str]:
    """Top-level package names of ours that `path` imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & OURS


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_what_the_layout_allows(package: str) -> None:
    modules = _modules(package)
    assert modules, f"package {package} has no modules"
    bad = {
        str(path.relative_to(ROOT)): sorted(_imports(path) - ALLOWED[package] - {package})
        for path in modules
    }
    assert not {k: v for k, v in bad.items() if v}


def _defines_serve_deployment(path: Path) -> bool:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for dec in node.decorator_list:
                target = dec.func if isinstance(dec, ast.Call) else dec
                if isinstance(target, ast.Attribute) and target.attr == "deployment":
                    return True
    return False


def test_no_ray_serve_deployment_module_imports_dicom_node() -> None:
    deployment_modules = [p for p in _modules("serving") if _defines_serve_deployment(p)]
    assert deployment_modules, "no module defines a @serve.deployment"
    offenders = {
        str(p.relative_to(ROOT)) for p in deployment_modules if "dicom_node" in _imports(p)
    }
    assert offenders == set()


def test_no_module_shadows_the_standard_library() -> None:
    import sys

    shadowing = [
        str(p.relative_to(ROOT))
        for package in ALLOWED
        for p in _modules(package)
        if p.stem in sys.stdlib_module_names
    ]
    assert shadowing == []
