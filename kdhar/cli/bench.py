"""`kdhar bench gpu`: this machine's training speed at the paper's size."""

from __future__ import annotations

from pathlib import Path

import click

from kdhar.cli.options import DEFAULT_ROOT, FLOAT, INT, bool_option
from kdhar.cli.train import distill


@click.group()
def bench() -> None:
    """Checks of this machine's speed."""


def _distill_default(name: str) -> str:
    """The default of a `kdhar distill` option, so the GPU check measures the pair a run trains."""
    return next(p.default for p in distill.params if p.name == name)


@bench.command("gpu")
@click.option("--dry-run", is_flag=True, help="the same path at a tiny size on the CPU, a couple of steps per configuration (CI)")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None,
              help="where the results go (default: $OUT/gpu.json when $OUT is set, else benchmarks/results/gpu.json)")
@click.option("--budget-s", type=FLOAT, default=300.0, show_default=True, help="seconds the whole check may take; steps are sized to it")
@click.option("--peak-tflops", type=FLOAT, default=None, help="the device's dense bf16 peak for MFU (default: from a table of common GPUs)")
@click.option("--num-workers", type=INT, default=2, show_default=True, help="loader workers (the training commands' default)")
@click.option("--batch-size", type=INT, default=None, help="default: the paper's 16 (4 in a dry run)")
@click.option("--teacher", default=_distill_default("teacher"), show_default=True, help="architecture of the teacher")
@click.option("--student", default=_distill_default("student"), show_default=True, help="architecture of the student")
@click.option("--root", default=DEFAULT_ROOT, show_default=True,
              help="videos to load (UCF101 layout); the default, when absent, is a small synthetic set made in a temporary folder")
@bool_option("--deterministic", help="deterministic kernels, cuDNN autotuning off (default: on, as runs)")
@click.option("--device", default="auto", show_default=True, help="auto: CUDA when available (the CPU in a dry run)")
def bench_gpu(dry_run, json_path, budget_s, peak_tflops, num_workers, batch_size, teacher, student, root, deterministic,
              device) -> None:
    """Training clips/s, peak memory and MFU of the default teacher and student at the paper's size,
    with bf16 autocast, channels_last_3d and torch.compile on and off, and whether the loader keeps up."""
    from kdhar import gpu_check

    import torch

    if not dry_run and not torch.cuda.is_available():
        click.echo("note: no CUDA device: measuring the paper's size on the CPU (--dry-run is the quick check)", err=True)
    res = gpu_check.run_check(
        dry_run=dry_run, budget_s=budget_s, root=root, default_root=DEFAULT_ROOT, teacher=teacher, student=student,
        batch_size=batch_size, num_workers=num_workers, device=device, deterministic=deterministic,
        peak_tflops_override=peak_tflops, log=lambda line: click.echo(line, err=True),
    )
    click.echo(gpu_check.format_report(res))
    path = gpu_check.write_json(res, json_path or gpu_check.default_json_path())
    click.echo(f"wrote {path}")


COMMANDS = (bench,)
