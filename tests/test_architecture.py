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
    {
        "core",
        "imaging",
        "store",
        "models",
        "dicom_node",
        "serving",
        "ris",
        "workspace",
        "triage",
        "training",
        "evaluation",
        "migrations",
        "cli",
        "benchmarks",
    }
)
# Bottom to top: each way in or out (dicom_node: PACS, ris: HL7/FHIR, workspace: browsers,
# serving: Ray Serve) sits on core/imaging/models and the shared durable store (index, spool,
# outbox, result records); triage composes them; cli wires everything.
ALLOWED: dict[str, frozenset[str]] = {
    "core": frozenset(),
    "imaging": frozenset({"core"}),
    "store": frozenset({"core"}),
    "models": frozenset({"core", "imaging"}),
    "dicom_node": frozenset({"core", "imaging", "store"}),
    "serving": frozenset({"core", "models"}),
    "ris": frozenset({"core", "imaging", "store"}),
    "workspace": frozenset({"core", "imaging", "models", "store", "dicom_node"}),
    "triage": frozenset({"core", "imaging", "models", "store", "dicom_node", "ris"}),
    "training": frozenset({"core", "imaging", "models"}),
    "evaluation": frozenset({"core", "imaging", "models", "training"}),
    "migrations": frozenset({"core", "store", "ris", "workspace"}),
    "cli": OURS - {"cli", "benchmarks"},
}
# Third-party libraries a package must not reach for: the DICOM node speaks DICOM (its DICOMweb
# routes may use the web framework), Ray Serve serves arrays.
FORBIDDEN_LIBRARIES: dict[str, frozenset[str]] = {
    "core": frozenset({"fastapi", "starlette", "ray", "pynetdicom", "hl7", "hl7apy", "sqlalchemy"}),
    "imaging": frozenset({"fastapi", "ray", "pynetdicom", "hl7", "hl7apy", "sqlalchemy"}),
    "store": frozenset({"fastapi", "starlette", "ray", "pynetdicom", "hl7", "hl7apy", "argon2"}),
    "dicom_node": frozenset({"hl7", "hl7apy", "fhir", "argon2", "itsdangerous"}),
    "serving": frozenset(
        {"fastapi", "starlette", "uvicorn", "argon2", "hl7", "hl7apy", "fhir", "pynetdicom"}
    ),
    "ris": frozenset({"pynetdicom", "ray", "argon2"}),
    "workspace": frozenset({"ray", "hl7", "hl7apy", "pynetdicom"}),
}


def _imports(path: Path, *, ours: bool = True) -> set[str]:
    """Top-level package names that `path` imports (ours only, unless `ours` is False)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & OURS if ours else found


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


@pytest.mark.parametrize("package", sorted(FORBIDDEN_LIBRARIES))
def test_package_uses_no_library_of_another_way_in(package: str) -> None:
    bad = {
        str(path.relative_to(ROOT)): sorted(
            _imports(path, ours=False) & FORBIDDEN_LIBRARIES[package]
        )
        for path in _modules(package)
    }
    assert not {k: v for k, v in bad.items() if v}


def test_ris_workspace_triage_reach_each_other_through_no_back_door() -> None:
    """The three integrations meet only in triage (which composes ris) and the composition
    root: ris and workspace never import each other or triage."""
    for package, others in (("ris", {"workspace", "triage"}), ("workspace", {"ris", "triage"})):
        for path in _modules(package):
            assert not _imports(path) & others, f"{path.relative_to(ROOT)} imports {others}"


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
