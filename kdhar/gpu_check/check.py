"""`run_check`: the GPU check's phases in order, each a named step of plan, measure or report."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kdhar.gpu_check.measure import Bench, Device, measure_compile, measure_eager, measure_loader, release_except, \
    synthetic_batch
from kdhar.gpu_check.plan import EAGER, Clock, Data, Setup, check_arguments, make_setup, prepare_data, workloads
from kdhar.gpu_check.report import decide_compile, decide_eager, results


def run_check(
    *,
    dry_run: bool = False,
    budget_s: float = 300.0,
    root: str = "data/synthetic/ucf101",
    default_root: str = "data/synthetic/ucf101",
    teacher: str = "c3d",
    student: str = "tiny3d",
    batch_size: int | None = None,
    num_workers: int = 2,
    device: str = "auto",
    deterministic: bool | None = None,
    peak_tflops_override: float | None = None,
    compile_backend: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Runs the check and returns its results (what `kdhar bench gpu` writes as JSON).

    Plans the sizes and data, measures the four eager settings, torch.compile on the one they keep,
    then the loader alone and end to end, and reports what it measured and which settings it keeps.
    """
    from kdhar.engine import set_determinism
    from kdhar.train import pick_device

    check_arguments(teacher, student, budget_s, num_workers)
    clock = Clock(budget_s)
    dev = torch.device("cpu") if dry_run and device == "auto" else pick_device(device)
    setup = make_setup(dry_run=dry_run, root=root, teacher=teacher, student=student, batch_size=batch_size,
                       num_workers=num_workers, compile_backend=compile_backend)
    torch.set_num_threads(setup.optim.threads)
    det = setup.optim.deterministic if deterministic is None else deterministic
    det_note = set_determinism(setup.optim.seed, det)
    with tempfile.TemporaryDirectory(prefix="kdhar-bench-gpu-") as tmp:
        data = prepare_data(root, default_root, setup, Path(tmp), log)
        bench = _open_bench(setup, data, Device.of(dev, peak_tflops_override), clock, log)
        measure_eager(bench, EAGER)
        decision = decide_eager(bench)
        bench.log(f"eager settings measured ({clock.elapsed():.0f} s); best {decision.best_eager.name}, "
                  f"chosen {decision.eager.name}")
        release_except(bench, {decision.eager, decision.default})
        compile_skipped = measure_compile(bench, decision.eager, decision.compiled)
        decide_compile(bench, decision)
        log(f"torch.compile measured ({clock.elapsed():.0f} s)")
        settings = [decision.chosen] + ([decision.default] if decision.default != decision.chosen else [])
        loader = measure_loader(bench, setup, data, settings)
    return results(bench, setup, data, decision, loader, (det, det_note), compile_skipped)


def _open_bench(setup: Setup, data: Data, device: Device, clock: Clock, log: Callable[[str], None]) -> Bench:
    """The workloads and the synthetic batch on `device`, announced in one line."""
    dev, clip, batch = device.dev, setup.clip, setup.batch
    bench = Bench(device, setup.plan, clock, setup.optim, synthetic_batch(setup, data.classes, dev),
                  workloads(setup, data.classes), setup.dry_run, log)
    where = f"{dev} ({device.name})" if dev.type == "cuda" else str(dev)
    t, s = bench.workloads
    log(f"device {where}, {'dry run, tiny size' if setup.dry_run else 'size paper'}: batch {batch}x3x"
        f"{clip.clip_len}x{clip.crop}x{clip.crop} from {clip.resize[0]}x{clip.resize[1]}, widths "
        f"{t.arch} {t.width} / {s.arch} {s.width}, budget {clock.budget_s:.0f} s")
    return bench

