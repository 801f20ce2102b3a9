"""Commands about data and models: `data synth`, `data check`, `models`; and `ensure_data`, which
makes the synthetic default on a run's first use of it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from kdhar.cli.errors import UserError
from kdhar.cli.options import DEFAULT_HMDB_ROOT, DEFAULT_ROOT, FLOAT, INT, text_or_none


def ensure_data(root: str) -> None:
    """Generates the embedded synthetic datasets on first use of the default root."""
    if Path(root).exists() or root not in (DEFAULT_ROOT, DEFAULT_HMDB_ROOT):
        if not Path(root).exists():
            raise UserError(f"dataset root {root} does not exist; check --root (or omit it to use the synthetic default)")
        return
    click.echo(f"{root} not found: generating the synthetic datasets (once)", err=True)
    synthesize(Path(DEFAULT_ROOT).parent, layout="both", spec_kw={})


def synthesize(out: Path, layout: str, spec_kw: dict[str, Any], workers: int = 2, overwrite: bool = False) -> None:
    from kdhar.data import synthetic

    spec = synthetic.SynthSpec(**{k: v for k, v in spec_kw.items() if v is not None})
    layouts = ["ucf101", "hmdb51"] if layout == "both" else [layout]
    for name in layouts:
        with ProgressBar(f"synth {name}") as bar:
            ds = synthetic.generate(out / name, layout=name, spec=spec, workers=workers, on_progress=bar, overwrite=overwrite)
        click.echo(f"wrote {ds.num_videos} videos, {len(ds.classes)} classes -> {ds.root}")


class ProgressBar:
    """A click progress bar usable as an on_progress(done, total) callback."""

    def __init__(self, label: str):
        self.label, self.bar, self.done = label, None, 0

    def __enter__(self):
        return self

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = click.progressbar(length=total, label=self.label, file=sys.stderr)
            self.bar.__enter__()
        self.bar.update(done - self.done)
        self.done = done

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)


@click.group()
def data() -> None:
    """Generate and check datasets."""


@data.command("synth")
@click.option("--out", default="data/synthetic", show_default=True, type=click.Path(path_type=Path))
@click.option("--layout", default="both", show_default=True, type=click.Choice(["ucf101", "hmdb51", "both"]))
@click.option("--classes", "num_classes", type=INT, default=None)
@click.option("--groups", type=INT, default=None)
@click.option("--clips-per-group", type=INT, default=None)
@click.option("--frames", type=INT, default=None)
@click.option("--difficulty", type=FLOAT, default=None, help="0 (easy) .. 1 (hard)")
@click.option("--seed", type=INT, default=None)
@click.option("--workers", type=int, default=2, show_default=True)
@click.option("--overwrite", is_flag=True, help="replace an existing set made with other settings")
def data_synth(out, layout, num_classes, groups, clips_per_group, frames, difficulty, seed, workers, overwrite) -> None:
    """Write synthetic action videos (real encoded AVIs) with UCF101/HMDB51 split files."""
    spec = dict(num_classes=num_classes, groups=groups, clips_per_group=clips_per_group, frames=frames, difficulty=difficulty, seed=seed)
    synthesize(out, layout, spec, workers, overwrite)


@data.command("check")
@click.argument("root", type=click.Path(path_type=Path))
@click.option("--dataset", default="ucf101", show_default=True)
@click.option("--split", default=1, show_default=True, type=INT)
@click.option("--split-dir", default=None, help="folder of the split files when they are not in ROOT")
@click.option("--workers", default=2, show_default=True, type=int)
def data_check(root, dataset, split, split_dir, workers) -> None:
    """Decode every listed video and report counts per class and every bad file."""
    from kdhar.data.check import LAYOUTS, check_dataset, format_report
    from kdhar.data.index import SplitFileError

    if not root.exists():
        raise UserError(f"dataset root {root} does not exist")
    try:
        with ProgressBar("decoding") as bar:
            report = check_dataset(root, dataset, split, workers, split_dir=text_or_none(split_dir), on_progress=bar)
    except SplitFileError as exc:
        click.echo(f"Error: {exc}", err=True)
        click.echo("kdhar reads these layouts:\n" + "\n".join(f"  {text}" for text in LAYOUTS.values()), err=True)
        sys.exit(2)
    click.echo(format_report(report))
    if report.bad:
        sys.exit(1)


@click.command("models")
@click.option("--width", default=8, show_default=True)
@click.option("--clip-len", default=8, show_default=True)
@click.option("--crop", default=56, show_default=True)
@click.option("--num-classes", default=101, show_default=True)
def models_cmd(width, clip_len, crop, num_classes) -> None:
    """Parameters and forward FLOPs per clip of every registered model."""
    from kdhar.models import MODELS, describe

    click.echo(f"input 3x{clip_len}x{crop}x{crop}, width {width}, {num_classes} classes")
    click.echo(f"{'model':<14}{'params':>12}{'GFLOPs/clip':>14}")
    for name in MODELS:
        d = describe(name, num_classes, width, clip_len, crop)
        click.echo(f"{name:<14}{d['params']:>12,}{d['flops'] / 1e9:>14.3f}")


COMMANDS = (data, models_cmd)
