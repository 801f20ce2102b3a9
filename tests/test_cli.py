"""The `kdhar` command line itself: a start-up that does not load the training stack."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "mlflow", "optuna")


@pytest.mark.parametrize("argv", [["--version"], ["-h"], ["distill", "-h"], ["train-teacher", "-h"], ["tune", "-h"]])
def test_version_and_help_load_no_training_stack(argv):
    # In a fresh interpreter, since this test process has imported them already.
    code = ("import json, sys\nfrom kdhar.cli import main\nsys.argv = ['kdhar', *json.loads(sys.argv[1])]\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]), file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(argv)], capture_output=True, text=True, timeout=60,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "Usage:" in out.stdout or "version" in out.stdout
    assert json.loads(out.stderr.strip().splitlines()[-1]) == []
