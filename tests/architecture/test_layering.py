"""The dependency rules of the brief, checked on every run: stations never need torch/sklearn/trainer."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STATION_PACKAGES = ("core", "edge", "protocol")
# faiss-cpu is in the edge extra (numpy only, no torch): a station loads the ANN index its bundle ships.
FORBIDDEN_ON_STATION = {"torch", "sklearn", "trainer", "matplotlib", "onnx"}


def imported_top_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", STATION_PACKAGES)
def test_station_packages_import_no_trainer_torch_or_sklearn(package: str) -> None:
    offenders = {
        str(p.relative_to(ROOT)): sorted(imported_top_modules(p) & FORBIDDEN_ON_STATION)
        for p in (ROOT / package).rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_protocol_imports_nothing_of_ours() -> None:
    ours = {"core", "edge", "trainer", "deploy", "collector"}
    offenders = {str(p): imported_top_modules(p) & ours for p in (ROOT / "protocol").rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


@pytest.mark.parametrize("package", ["deploy", "collector"])
def test_fleet_roles_never_import_trainer(package: str) -> None:
    offenders = {str(p): imported_top_modules(p) & {"trainer"} for p in (ROOT / package).rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_station_modules_import_without_torch_in_a_fresh_interpreter() -> None:
    """Importing every station module must not drag torch or sklearn in (transitively)."""
    modules = sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for pkg in STATION_PACKAGES
        for p in (ROOT / pkg).rglob("*.py")
    )
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "bad = sorted(m for m in ('torch', 'sklearn', 'trainer') if m in sys.modules)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


def test_import_linter_contracts_hold() -> None:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    result = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_is_clean() -> None:
    exe = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    result = subprocess.run([exe, "check", "."], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout
