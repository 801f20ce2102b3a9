"""How long `kdhar --version` and `kdhar -h` take to answer, next to importing torch.

Each command runs in a fresh process, as a user types it; the figure is the median wall time of
--repeats runs (after one unrecorded warm-up run of each, so the first read of the files from
disk does not count). The ratio against `python -c "import torch"` shows whether a command pays
for torch: a CLI that imports it while defining options sits at about 1.0 or above.

    python benchmarks/bench_cli.py --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path


def kdhar_command() -> list[str]:
    """The installed `kdhar` script beside this Python, else `python -m kdhar`."""
    script = Path(sys.executable).parent / "kdhar"
    return [str(script)] if script.exists() else [sys.executable, "-m", "kdhar"]


def wall_times(argv: list[str], repeats: int) -> list[float]:
    """Seconds each of `repeats` fresh runs of `argv` takes; a failing command stops the benchmark."""
    subprocess.run(argv, check=True, capture_output=True)  # warm-up: file cache, .pyc files
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per command (the median is shown)")
    args = parser.parse_args()

    kdhar = kdhar_command()
    commands = {
        'python -c "import torch"': [sys.executable, "-c", "import torch"],
        "kdhar --version": [*kdhar, "--version"],
        "kdhar -h": [*kdhar, "-h"],
        "kdhar distill -h": [*kdhar, "distill", "-h"],
    }
    medians = {name: statistics.median(wall_times(argv, args.repeats)) for name, argv in commands.items()}
    torch_s = medians['python -c "import torch"']
    print(f"{'command':<28}{'median s':>10}{'x import torch':>16}")
    for name, seconds in medians.items():
        print(f"{name:<28}{seconds:>10.3f}{seconds / torch_s:>16.2f}")


if __name__ == "__main__":
    main()
