"""The tags every kdhar run carries, so runs, models and reports can be filtered the same way."""

from __future__ import annotations

import subprocess
from pathlib import Path

# Copied from a run onto its logged model and registered version, so the registry says what a
# version is (method, teacher, data share, seed) without opening its run.
STANDARD_TAGS = ("role", "arch", "dataset", "dataset_fingerprint", "method", "teacher_arch", "teacher_run_id",
                 "fraction", "seed", "modality")


def git_commit(path: str | Path | None = None) -> str | None:
    """Returns the commit checked out at `path` (default: cwd), or None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=path,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        # No git binary, not a repository, or no commit yet: the run is still worth tracking.
        return None
    return out.stdout.strip() or None


def standard_tags(
    role: str, arch: str, dataset: str, dataset_fingerprint: str
) -> dict[str, str]:
    """Builds the tags every run carries: role (teacher/student/...), arch, dataset, its fingerprint
    and, when available, the git commit of the code."""
    tags = {"role": role, "arch": arch, "dataset": dataset, "dataset_fingerprint": dataset_fingerprint}
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
    return tags
