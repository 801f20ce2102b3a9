"""Commands about data and models: `data synth`, `data check`, `models`; and `ensure_data`, which
makes the synthetic default on a run's first use of it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from kdhar.cli.errors import UserError
from kdhar.cli.options import DEFAULT_HMDB_ROOT, DEFAULT_ROOT, DEFAULT_TAD_ROOT, FLOAT, INT, text_or_none


def ensure_data(root: str) -> None:
    """Generates the embedded synthetic datasets on first use of the default root."""
    if Path(root).exists() or root not in (DEFAULT_ROOT, DEFAULT_HMDB_ROOT, DEFAULT_TAD_ROOT):
        if not Path(root).exists():
            raise UserError(f"dataset root {root} does not exist; check --root (or omit it to use the synthetic default)")
        return
    click.echo(f"{root} not found: generating the synthetic datasets (once)", err=True)
    synthesize(Path(root).parent, layout="thumos14" if root == DEFAULT_TAD_ROOT else "both", spec_kw={})


def synthesize(out: Path, layout: str, spec_kw: dict[str, Any], workers: int = 2, overwrite: bool = False) -> None:
    from kdhar.data import synthetic

    if layout == "thumos14":
        synthesize_untrimmed(out / layout, spec_kw, workers, overwrite)
        return
    spec = synthetic.SynthSpec(**{k: v for k, v in spec_kw.items() if v is not None})
    layouts = ["ucf101", "hmdb51"] if layout == "both" else [layout]
    for name in layouts:
        with ProgressBar(f"synth {name}") as bar:
            ds = synthetic.generate(out / name, layout=name, spec=spec, workers=workers, on_progress=bar, overwrite=overwrite)
        click.echo(f"wrote {ds.num_videos} videos, {len(ds.classes)} classes -> {ds.root}")


def synthesize_untrimmed(root: Path, spec_kw: dict[str, Any], workers: int, overwrite: bool) -> None:
    """The THUMOS14-style untrimmed set: `frames` is its shortest video, the longest twice that, and
    `clips_per_group` its videos per group."""
    from kdhar.data import untrimmed

    given = {k: v for k, v in spec_kw.items() if v is not None}
    if "frames" in given:
        given["frames"] = (given["frames"], 2 * given["frames"])
    if "clips_per_group" in given:
        given["videos_per_group"] = given.pop("clips_per_group")
    spec = untrimmed.UntrimmedSpec(**given)
    with ProgressBar("synth thumos14") as bar:
        ds = untrimmed.generate(root, spec, workers=workers, on_progress=bar, overwrite=overwrite)
    counts = ", ".join(f"{n} {subset}" for subset, n in ds.num_videos.items())
    click.echo(f"wrote {counts} untrimmed videos, {len(ds.classes)} classes -> {ds.root}")


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
@click.option("--layout", default="both", show_default=True, type=click.Choice(["ucf101", "hmdb51", "both", "thumos14"]),
              help="both: ucf101 and hmdb51 (recognition); thumos14: untrimmed videos with segments (detection)")
@click.option("--classes", "num_classes", type=INT, default=None)
@click.option("--groups", type=INT, default=None)
@click.option("--clips-per-group", type=INT, default=None, help="clips (thumos14: videos) per group")
@click.option("--frames", type=INT, default=None,
              help="frames per clip; thumos14: of the shortest video, the longest having twice as many")
@click.option("--difficulty", type=FLOAT, default=None, help="0 (easy) .. 1 (hard)")
@click.option("--seed", type=INT, default=None)
@click.option("--workers", type=int, default=2, show_default=True)
@click.option("--overwrite", is_flag=True, help="replace an existing set made with other settings")
def data_synth(out, layout, num_classes, groups, clips_per_group, frames, difficulty, seed, workers, overwrite) -> None:
    """Write synthetic action videos (real encoded files) with UCF101/HMDB51 split files, or untrimmed
    videos with THUMOS14 annotations (--layout thumos14)."""
    spec = dict(num_classes=num_classes, groups=groups, clips_per_group=clips_per_group, frames=frames, difficulty=difficulty, seed=seed)
    synthesize(out, layout, spec, workers, overwrite)


@data.command("check")
@click.argument("root", type=click.Path(path_type=Path))
@click.option("--dataset", default="ucf101", show_default=True, help="ucf101, hmdb51, folder or thumos14")
@click.option("--split", default=1, show_default=True, type=INT, help="split 1-3 (thumos14 has one)")
@click.option("--split-dir", default=None,
              help="folder of the split files (thumos14: of the annotation files) when they are not in ROOT")
@click.option("--workers", default=2, show_default=True, type=int)
def data_check(root, dataset, split, split_dir, workers) -> None:
    """Decode every listed video and report counts per class and every bad file."""
    from kdhar.data.check import LAYOUTS, check_dataset, format_report
    from kdhar.data.index import SplitFileError

    if not root.exists():
        raise UserError(f"dataset root {root} does not exist")
    if dataset == "thumos14":
        check_untrimmed(root, split_dir, workers)
        return
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


def check_untrimmed(root: Path, split_dir: str | None, workers: int) -> None:
    """`data check --dataset thumos14`: a malformed or absent annotation file is one line (exit 2);
    missing or unreadable videos are listed with the report (exit 1)."""
    from kdhar.data.check import check_detection, format_detection_report

    with ProgressBar("decoding") as bar:
        report = check_detection(root, workers, annotation_dir=text_or_none(split_dir), on_progress=bar)
    click.echo(format_detection_report(report))
    if not report.ok:
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
