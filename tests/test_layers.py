"""The import contracts in pyproject.toml ([tool.importlinter]) hold, and they catch a break.

`lint-imports` is run as a user runs it; the break tests copy the package to a temporary folder, add
one forbidden import there, and check that the contract it breaks is named.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """`lint-imports` on the kdhar package under `root`, with `root`'s pyproject.toml."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    # --no-cache: parallel test workers must not share (or race on) one cache folder.
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=120)


def test_contracts_are_kept() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract", "named"),
    [
        # data below cli: a dataset module reaching up to the command line
        ("kdhar/data/sampling.py", "import kdhar.cli", "kdhar's layers", "kdhar.data.sampling -> kdhar.cli"),
        # engine and tracking are siblings on one layer: neither may import the other
        ("kdhar/engine.py", "import kdhar.tracking", "kdhar's layers", "kdhar.engine -> kdhar.tracking"),
        ("kdhar/report.py", "import mlflow", "only kdhar.tracking imports mlflow", "kdhar.report -> mlflow"),
        ("kdhar/experiments/spec.py", "import optuna", "only kdhar.tuning imports optuna",
         "kdhar.experiments.spec -> optuna"),
        # inside the grid package: planning cells reaching up to the grid runner
        ("kdhar/experiments/plan.py", "import kdhar.experiments.run", "the experiment grid's layers",
         "kdhar.experiments.plan -> kdhar.experiments.run"),
        # click belongs to the command line's package, whose submodules import it
        ("kdhar/engine.py", "import click", "only kdhar.cli imports click", "kdhar.engine -> click"),
        ("kdhar/data/dataset.py", "import decord", "only kdhar.data.video imports decord",
         "kdhar.data.dataset -> decord"),
        ("kdhar/report.py", "import kdhar.models", "does not import torch", "kdhar.models"),
    ],
)
def test_a_forbidden_import_breaks_its_contract(tmp_path: Path, module: str, line: str, contract: str,
                                                named: str) -> None:
    shutil.copytree(ROOT / "kdhar", tmp_path / "kdhar", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    path = tmp_path / module
    path.write_text(path.read_text() + f"\n{line}  # the forbidden import under test\n")

    result = lint_imports(tmp_path)

    assert result.returncode == 1, result.stdout + result.stderr
    broken = [row for row in result.stdout.splitlines() if " BROKEN" in row]
    # An upward import also closes a cycle, so the acyclic contract may break beside the named one.
    assert any(contract in row for row in broken), result.stdout
    assert named in result.stdout, result.stdout


def test_an_unplaced_module_breaks_the_layers(tmp_path: Path) -> None:
    """The layers contract is exhaustive: a new top-level module must say where it belongs."""
    shutil.copytree(ROOT / "kdhar", tmp_path / "kdhar", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "kdhar" / "newcomer.py").write_text('"""A module no layer lists yet."""\n')

    result = lint_imports(tmp_path)

    assert result.returncode == 1, result.stdout + result.stderr
    assert "kdhar.newcomer" in result.stdout, result.stdout


def test_report_loads_without_torch() -> None:
    """The tables and plots load without torch (tracking, which needs it, is imported only when runs are read)."""
    code = "import sys, kdhar.report; assert 'torch' not in sys.modules, 'torch was imported'"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
