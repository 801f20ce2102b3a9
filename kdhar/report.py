"""Paper-style comparison tables and plots, built from the runs of one MLflow experiment alone.

Runs are found by their tags: students (`role=student`, `student_arch`, `teacher_arch` = "none" for
scratch, `fraction`, `seed`, `dataset`, optionally `views`, `collapsed` and `teacher_run_id`) and
fine-tunes (`role=finetune`, `source_run`). For every student, dataset and fraction there is one row per
teacher run (and one for scratch): two runs of the same teacher recipe are never merged. Each row has
the accuracy at the end and at the early/mid stages as mean ± std over seeds, in two readings: the
epoch's own value ("last") and the best test accuracy reached by then ("best", as the KD paper's tables
read it), the number of collapsed runs, the KD - scratch differences and the accuracy after transfer.
The final accuracy of each KD row is also compared with its scratch twin seed by seed, in both readings
(`kdhar.stats`): a paired t-interval, an exact sign-flip p-value, Holm's correction over every such test
of the report, an equivalence test against a margin, a verdict, and the seeds the margin calls for.
Rows are only compared when both were trained on the same number of fixed views. The maths (`mean_std`,
`paired_interval`, `compare_rows`, `aggregate`, `mean_curve`) are pure functions of run dicts.
"""

from __future__ import annotations

import csv
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from kdhar import stats  # noqa: E402
from kdhar.config import PCL_KD_WEIGHTING, KDConfig, default_kd_weighting  # noqa: E402
from kdhar.detection_report import detection_rows, format_detection, write_detection_csv  # noqa: E402
from kdhar.methods import ATTENTION_METHODS, REPORT_MARKS  # noqa: E402
from kdhar.stats import PairedTest  # noqa: E402

# Table column -> the metric it is read from. The stages are logged by kdhar.train at 25/75/100 % of
# the epochs, the paper's 50/150/200 of 200.
ACC_METRICS = {
    "final": "final_test_video_top1",
    "early": "acc_early",
    "mid": "acc_mid",
    "late": "acc_late",
}
STAGES = ("early", "mid", "late")
# The two readings of a stage: its epoch's own test accuracy, or the best one reached by then.
READINGS = ("last", "best")
READING_NAMES = {"last": "last epoch", "best": "best so far"}
CURVE_METRIC = "test_video_top1"
SCRATCH = "none"
DEFAULT_MARGIN = 0.05  # equivalence margin, as a fraction (5 points)
ATTENTION = f"{SCRATCH} [attention]"  # the "scratch + attention" row: GKD's module without a teacher
# What two compared rows must share besides the student, dataset and fraction (their recipe): the
# name a difference is reported by, the run param it is read from, and the value a run that did not
# log the param trained with (None: no such runs, so a missing param is not compared).
RECIPE = (
    ("lr", "optim.lr", None), ("momentum", "optim.momentum", None), ("weight decay", "optim.weight_decay", None),
    ("schedule", "optim.schedule", None), ("warm-up", "optim.warmup", None), ("epochs", "optim.epochs", None),
    ("batch", "optim.batch_size", None), ("grad clip", "optim.grad_clip", None), ("views", "data.views", "0"),
    ("clip", "clip.clip_len", None), ("frame interval", "clip.frame_interval", None), ("crop", "clip.crop", None),
    ("resize", "clip.resize", None), ("augment", "clip.augment", None), ("flips", "clip.hflip", None),
    ("width", "model.width", None), ("dropout", "model.dropout", None), ("modality", "model.modality", "rgb"),
    ("keep_time", "model.keep_time", "0"), ("init", "init", "-"),
)


def reading_metric(col: str, reading: str) -> str:
    """The metric a column is read from: `acc_mid` last, `best_acc_mid` best; the best final accuracy is
    the best of the whole run (`best_acc_late`)."""
    if reading == "last":
        return ACC_METRICS[col]
    return "best_" + ACC_METRICS["late" if col == "final" else col]


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (NaN for fewer than two values) of n values."""

    mean: float
    std: float
    n: int


@dataclass
class Row:
    """One (dataset, student, teacher run, fraction) cell of the comparison; teacher "none" is scratch.

    `delta`, `best_delta` and `transfer_delta` are differences of means; `tests` compares the final
    accuracy seed by seed, per reading. A KD row whose views differ from its scratch twin's has none of
    them, and its verdict says so.
    """

    dataset: str
    student: str
    teacher: str
    fraction: float
    seeds: list[int]
    run_ids: list[str]
    acc: dict[str, Stat]  # last-epoch reading, keys of ACC_METRICS present in the runs
    best: dict[str, Stat] = field(default_factory=dict)  # best-so-far reading, likewise
    delta: dict[str, float] = field(default_factory=dict)  # KD mean - scratch mean, per ACC_METRICS key
    best_delta: dict[str, float] = field(default_factory=dict)
    transfer: Stat | None = None
    transfer_delta: float | None = None
    epochs_to_scratch: Stat | None = None
    collapsed: int = 0  # runs whose training collapsed; they stay in `acc`
    views: list[int] = field(default_factory=list)  # distinct `views` tags of the runs (0 = fresh views)
    teacher_run: str = ""  # `teacher_run_id` tag of the KD runs; empty for scratch and untagged runs
    init: bool = False  # the runs started from other weights (--init)
    teacher_acc: float | None = None  # that teacher run's final accuracy, when known
    grid_teacher: str = ""  # the grid's name for that teacher run (`grid_teacher` tag, e.g. "c3d-res-s0"), if any
    tests: dict[str, PairedTest] = field(default_factory=dict)  # reading -> final accuracy, KD - scratch
    verdict: str = ""  # the last-epoch reading's verdict, or why there is no comparison; empty for scratch
    pair_key: str = ""  # the runs' `pair_key` tag: a KD row is compared only with scratch runs sharing it
    method: str = ""  # the runs' `method` tag
    recipe: dict[str, str] = field(default_factory=dict)  # RECIPE name -> value, from the first run's params
    # Against the "scratch + attention" row (rows whose student has GKD's attention module and a
    # teacher): the teacher's own contribution, with the module's held fixed.
    att_delta: dict[str, float] = field(default_factory=dict)  # reading -> final mean - that row's final mean
    att_tests: dict[str, PairedTest] = field(default_factory=dict)
    att_verdict: str = ""  # its last-epoch verdict, or why there is no comparison; empty when not applicable
    # A KD row under another loss weighting than the default (`loss`, e.g. "sum") against the same
    # teacher run's row under the default one: which loss, paired by seed, in a Holm family of its own.
    loss: str = ""
    loss_default: str = KDConfig.weighting  # the weighting `loss` is compared with: its regime's default
    loss_delta: dict[str, float] = field(default_factory=dict)  # reading -> final mean - that row's final mean
    loss_tests: dict[str, PairedTest] = field(default_factory=dict)
    loss_verdict: str = ""


@dataclass
class Report:
    """What `build_report` produced; `text` is the printable table (or why there is none)."""

    experiment: str
    rows: list[Row]
    text: str
    files: list[Path] = field(default_factory=list)
    run_id: str | None = None


class ReportError(ValueError):
    """A report that cannot be made (e.g. the experiment does not exist)."""


# ---------------------------------------------------------------- maths

def mean_std(values: Iterable[float]) -> Stat:
    """Mean and sample standard deviation (ddof=1, as usual for a spread over seeds)."""
    vals = [float(v) for v in values]
    if not vals:
        return Stat(math.nan, math.nan, 0)
    mean = sum(vals) / len(vals)
    if len(vals) < 2:
        return Stat(mean, math.nan, 1)
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    return Stat(mean, math.sqrt(var), len(vals))


def paired_interval(
    kd_runs: Sequence[dict[str, Any]], scratch_runs: Sequence[dict[str, Any]], metric: str = ACC_METRICS["final"],
    margin: float = DEFAULT_MARGIN,
) -> PairedTest | None:
    """Per-seed differences d_s = kd_s - scratch_s over the seeds both lists have, tested by `stats.compare`.

    Pairing by seed removes the part of the spread the two runs of a seed share (same data order and
    initialisation), so the interval is narrower than one from two independent means. The interval is
    mean(d) ± t(0.975, n - 1) * sd(d) / sqrt(n).

    Args:
        kd_runs: run dicts of the distilled row; the first run of a seed counts (the newest, as listed
            by `tracking.find_runs`).
        scratch_runs: run dicts of the scratch row, likewise.
        metric: the metric compared; a seed whose run lacks it is not paired.
        margin: the equivalence margin, in the metric's unit.

    Returns:
        The paired test of this cell alone (no Holm adjustment, no verdict), or None when no seed pairs up.
    """
    kd, scratch = _by_seed(kd_runs, metric), _by_seed(scratch_runs, metric)
    diffs = [kd[seed] - scratch[seed] for seed in sorted(kd.keys() & scratch.keys())]
    return stats.compare(diffs, margin) if diffs else None


def compare_rows(kd_runs: Sequence[dict[str, Any]], scratch_runs: Sequence[dict[str, Any]],
                 margin: float = DEFAULT_MARGIN) -> dict[str, PairedTest]:
    """The final accuracy of a KD row against its scratch twin (rows already paired), per reading.

    Which scratch row a KD row is compared with is decided by the caller; this only pairs their runs
    by seed. A reading that no seed pairs up in is left out.
    """
    out = {}
    for reading in READINGS:
        test = paired_interval(kd_runs, scratch_runs, reading_metric("final", reading), margin)
        if test is not None:
            out[reading] = test
    return out


def verdict(test: PairedTest | None) -> str:
    """The verdict of one comparison on its own (a family of one, so no multiplicity correction)."""
    if test is None:
        return "no paired seeds"
    return stats.adjust([test])[0].verdict


def adjust_family(rows: Sequence[Row]) -> int:
    """Holm-adjusts every test of every row as one family, sets the verdicts, and returns the family size.

    The family is all KD-vs-scratch tests of the report, both readings of every KD row, and the tests
    against "scratch + attention": rejecting where Holm's p < 0.05 keeps the chance of any false
    "helps" or "hurts" among them at most 5 %.
    """
    members = [(row, kind, reading) for row in rows for kind in ("tests", "att_tests") for reading in READINGS
               if reading in getattr(row, kind)]
    tests = stats.adjust([getattr(row, kind)[r] for row, kind, r in members])
    for (row, kind, reading), test in zip(members, tests):
        getattr(row, kind)[reading] = test
    for row in rows:
        if "last" in row.tests:
            row.verdict = row.tests["last"].verdict
        if "last" in row.att_tests:
            row.att_verdict = row.att_tests["last"].verdict
    return len(members)


def _seed(run: dict[str, Any]) -> int:
    return int(float(run["tags"].get("seed", 0)))


def _by_seed(runs: Sequence[dict[str, Any]], metric: str) -> dict[int, float]:
    seen: set[int] = set()
    out = {}
    for run in runs:
        seed = _seed(run)
        if seed in seen:
            continue
        seen.add(seed)
        if metric in run["metrics"]:
            out[seed] = float(run["metrics"][metric])
    return out


def _collapsed(run: dict[str, Any]) -> bool:
    # A stuck run (kdhar.objectives.stuck). Training sets both the tag and the metric; either is
    # enough, older runs carry neither.
    return run["tags"].get("collapsed", "").lower() == "true" or run["metrics"].get("collapsed") == 1.0


def _views(run: dict[str, Any]) -> int:
    # Runs from before the teacher-logit cache have no tag: they drew a fresh view every epoch.
    return int(run["tags"].get("views", "0"))


def default_weighting(run: dict[str, Any]) -> str:
    """The KD weighting a run gets unless told: the paper's Eq. 7 (sum) inside PCL, else mix. A
    `kd_stage: after_ssl` student distils supervised, from its PCL pretraining, so it takes mix."""
    tags = run["tags"]
    return default_kd_weighting(tags.get("ssl", "none"), tags.get("kd_stage", "during_ssl"))


def _loss_mark(run: dict[str, Any]) -> str:
    # A KD run whose loss weighting is not its regime's default ("sum" or "balanced" where mix is the
    # default, "mix" inside PCL) gets a row of its own: the weighting is left out of the pair key, so
    # without the mark two losses would share a row.
    weighting = run.get("params", {}).get("kd.weighting")
    return weighting if weighting and weighting != default_weighting(run) else ""


def _key(run: dict[str, Any]) -> tuple[str, str, str, float, str, str]:
    tags = run["tags"]
    student = tags.get("student_arch") or tags.get("arch", "?")
    # A grid's `kd_stage: after_ssl` students train supervised from their PCL pretraining.
    after_ssl = tags.get("kd_stage") == "after_ssl"
    ssl = "pcl" if after_ssl else tags.get("ssl", "none")
    if ssl != "none":
        # Students trained inside PCL get tables of their own, beside the supervised ones, and pair
        # with the scratch runs of their own regime.
        student = f"{student} ({ssl})"
    teacher = tags.get("teacher_arch", SCRATCH)
    marks = [REPORT_MARKS.get(tags.get("method", ""), ""), tags.get("gkd_ablation", ""), _loss_mark(run),
             "after pcl" if after_ssl else "init" if tags.get("init") else ""]
    if any(marks):
        # Methods beyond logit KD (GKD's) and runs started from other weights (--init; "after pcl"
        # for a PCL pretraining) get rows of their own, e.g. "c3d [gkd]", "none [init]"; the scratch
        # run with GKD's attention module is "none [attention]".
        teacher = f"{teacher} [{', '.join(m for m in marks if m)}]"
    # Each teacher run is a row of its own: two teachers of one recipe can teach very differently.
    teacher_run = tags.get("teacher_run_id", "") if not teacher.startswith(SCRATCH) else ""
    return (tags.get("dataset", "?"), student, teacher, float(tags.get("fraction", "1.0")), tags.get("pair_key", ""),
            teacher_run)


def _recipe(run: dict[str, Any]) -> dict[str, str]:
    """The run's RECIPE values from its params (a default where it did not log one); the weights it
    started from are their `init_key` where it has one (the same for every seed of a row)."""
    params = run.get("params", {})
    if run["tags"].get("init_key"):
        params = {**params, "init": run["tags"]["init_key"]}
    return {name: str(params.get(param, default)) for name, param, default in RECIPE
            if param in params or default is not None}


def _same(a: str, b: str) -> bool:
    try:
        return float(a) == float(b)  # 0.01 and 1e-2, 6 and 6.0
    except ValueError:
        return a == b


def recipe_differences(a: Mapping[str, str], b: Mapping[str, str]) -> list[str]:
    """The RECIPE entries two rows disagree on, as "lr 0.001 vs 0.01" (a's value first); a value only
    one side has is not compared."""
    return [f"{name} {a[name]} vs {b[name]}" for name, _param, _default in RECIPE
            if name in a and name in b and not _same(a[name], b[name])]


def _closest(key: tuple, rows: Mapping[tuple, Row], teacher: str) -> tuple | None:
    """The row of `teacher` (plain scratch, or scratch + attention) for the same dataset, student and
    fraction that shares `key`'s pair key, else the one whose recipe differs least."""
    dataset, student, _teacher, fraction, pkey, _teacher_run = key
    same = (dataset, student, teacher, fraction, pkey, "")
    if same in rows and same != key:
        return same
    candidates = [k for k in rows if k != key and (k[0], k[1], k[2], k[3]) == (dataset, student, teacher, fraction)]
    return min(candidates, key=lambda k: len(recipe_differences(rows[key].recipe, rows[k].recipe)), default=None)


def _scratch_partner(key: tuple, rows: Mapping[tuple, Row]) -> tuple | None:
    """The scratch row a row is compared with. An --init row: the teacher-less row sharing its
    `pair_key` (a twin started from the same weights). Any other: the plain scratch row sharing its
    `pair_key` (same configuration but the teacher and KD weights), else the plain scratch row of
    the same student and fraction with the closest recipe (a GKD or feature-KD row's pair key names
    its method's knobs), which is compared only if the recipes are the same."""
    if rows[key].init:
        return next((k for k in rows if k != key and k[2].startswith(f"{SCRATCH} [") and k[:2] == key[:2]
                     and k[3:5] == key[3:5]), None)
    return _closest(key, rows, SCRATCH)


def one_run_per_seed(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keeps the first run of each (dataset, student, teacher run, fraction, seed).

    `tracking.find_runs` lists the newest run first, so a repeated cell counts once, with its latest run.
    """
    seen: set[tuple] = set()
    out = []
    for run in runs:
        k = (*_key(run), run["tags"].get("seed", "0"))
        if k not in seen:
            seen.add(k)
            out.append(run)
    return out


def _accuracy(members: Sequence[dict[str, Any]], reading: str) -> dict[str, Stat]:
    out = {}
    for col in ACC_METRICS:
        metric = reading_metric(col, reading)
        vals = [m["metrics"][metric] for m in members if metric in m["metrics"]]
        if vals:
            out[col] = mean_std(vals)
    return out


def _row(key: tuple, members: Sequence[dict[str, Any]], transfer_by_source: Mapping[str, list[float]],
         teacher_acc: Mapping[str, float]) -> Row:
    # A source fine-tuned twice counts once (its latest fine-tune), like a repeated seed.
    transfers = [transfer_by_source[m["run_id"]][0] for m in members if transfer_by_source.get(m["run_id"])]
    ets = [m["metrics"]["epochs_to_scratch_acc"] for m in members
           if m["metrics"].get("epochs_to_scratch_acc", -1) >= 0]
    return Row(
        dataset=key[0], student=key[1], teacher=key[2], fraction=key[3], pair_key=key[4],
        seeds=sorted(_seed(m) for m in members),
        run_ids=[m["run_id"] for m in members],
        acc=_accuracy(members, "last"),
        best=_accuracy(members, "best"),
        transfer=mean_std(transfers) if transfers else None,
        epochs_to_scratch=mean_std(ets) if ets else None,
        collapsed=sum(_collapsed(m) for m in members),
        views=sorted({_views(m) for m in members}),
        teacher_run=key[5],
        teacher_acc=float(teacher_acc[key[5]]) if key[5] in teacher_acc else None,
        grid_teacher=members[0]["tags"].get("grid_teacher", "") if key[5] else "",
        method=members[0]["tags"].get("method", ""),
        recipe=_recipe(members[0]),
        init=bool(members[0]["tags"].get("init")),
        loss=_loss_mark(members[0]),
        loss_default=default_weighting(members[0]),
    )


def _compare_with_scratch(row: Row, scratch: Row | None, kd_runs: Sequence[dict[str, Any]],
                          scratch_runs: Sequence[dict[str, Any]], margin: float) -> None:
    if scratch is None:
        row.verdict = "no scratch runs"
        return
    if len(set(row.views) | set(scratch.views)) > 1:
        # A cached-views run sees less augmentation than a fresh-view run: comparing them would
        # credit (or blame) distillation for the data pipeline.
        row.verdict = f"mismatched views (kd {_join(row.views)} vs scratch {_join(scratch.views)})"
        return
    differ = recipe_differences(row.recipe, scratch.recipe)
    if differ:
        # Another optimiser, schedule, batch or clip credits (or blames) the method for the recipe.
        row.verdict = "recipes differ (kd vs scratch): " + ", ".join(differ)
        return
    row.delta = {col: row.acc[col].mean - scratch.acc[col].mean for col in row.acc if col in scratch.acc}
    row.best_delta = {col: row.best[col].mean - scratch.best[col].mean for col in row.best if col in scratch.best}
    if row.transfer is not None and scratch.transfer is not None:
        row.transfer_delta = row.transfer.mean - scratch.transfer.mean
    row.tests = compare_rows(kd_runs, scratch_runs, margin)
    row.verdict = "" if row.tests else "no paired seeds"


def _final_deltas(row: Row, twin: Row) -> dict[str, float]:
    """Per reading, `row`'s mean final accuracy minus `twin`'s (a difference of means)."""
    pairs = (("last", row.acc, twin.acc), ("best", row.best, twin.best))
    return {reading: acc["final"].mean - other["final"].mean for reading, acc, other in pairs
            if "final" in acc and "final" in other}


def _compare_with_attention(row: Row, twin: Row | None, kd_runs: Sequence[dict[str, Any]],
                            twin_runs: Sequence[dict[str, Any]], margin: float) -> None:
    """The final accuracy of a distilled row whose student has GKD's attention module against the
    "scratch + attention" row: what the teacher adds to the module, the paper's ablation logic."""
    if twin is None:
        row.att_verdict = "no scratch + attention runs"
        return
    differ = recipe_differences(row.recipe, twin.recipe)
    if len(set(row.views) | set(twin.views)) > 1:
        differ.insert(0, f"views {_join(row.views)} vs {_join(twin.views)}")
    if differ:
        row.att_verdict = "recipes differ (kd vs scratch + attention): " + ", ".join(differ)
        return
    row.att_delta = _final_deltas(row, twin)
    row.att_tests = compare_rows(kd_runs, twin_runs, margin)
    row.att_verdict = "" if row.att_tests else "no paired seeds"


def _default_loss_partner(key: tuple, rows: Mapping[tuple, Row]) -> tuple | None:
    """The row a KD row under another loss weighting is compared with: the same teacher run, student,
    fraction, pair key and method under the default weighting."""
    row = rows[key]
    return next((k for k, r in rows.items() if k != key and not r.loss and r.teacher != SCRATCH
                 and (k[0], k[1], k[3], k[4], k[5]) == (key[0], key[1], key[3], key[4], key[5])
                 and r.method == row.method and r.init == row.init), None)


def _compare_losses(row: Row, twin: Row | None, kd_runs: Sequence[dict[str, Any]],
                    twin_runs: Sequence[dict[str, Any]], margin: float) -> None:
    if twin is None:
        row.loss_verdict = f"no {row.loss_default} runs of this teacher run"
        return
    row.loss_delta = _final_deltas(row, twin)
    row.loss_tests = compare_rows(kd_runs, twin_runs, margin)
    row.loss_verdict = "" if row.loss_tests else "no paired seeds"


def adjust_loss_family(rows: Sequence[Row]) -> int:
    """Holm over the report's loss comparisons (both readings of every row under a non-default
    weighting), a family of their own: which loss is a question apart from whether KD helps."""
    members = [(row, reading) for row in rows for reading in READINGS if reading in row.loss_tests]
    for (row, reading), test in zip(members, stats.adjust([row.loss_tests[r] for row, r in members])):
        row.loss_tests[reading] = test
    for row in rows:
        if "last" in row.loss_tests:
            row.loss_verdict = row.loss_tests["last"].verdict
    return len(members)


def aggregate(
    student_runs: Sequence[dict[str, Any]],
    finetune_runs: Sequence[dict[str, Any]] = (),
    teacher_acc: Mapping[str, float] | None = None,
    margin: float = DEFAULT_MARGIN,
) -> list[Row]:
    """Groups FINISHED student runs into rows, with KD - scratch deltas, tests, verdicts and transfer accuracy.

    A KD row is compared with the scratch row of the same dataset, student and fraction only when all
    runs of both share one `views` value and one recipe (`RECIPE`: optimiser, schedule, batch, clip
    ...); otherwise it gets no deltas and a "mismatched views" or "recipes differ" verdict naming
    what differs. A distilled row whose student has GKD's attention module is also compared with
    the "scratch + attention" row, under the same conditions (`att_*`). The tests of all rows form
    one Holm family (`adjust_family`).

    Args:
        student_runs: run dicts (run_id, tags, metrics, status) with role=student.
        finetune_runs: run dicts with role=finetune; each joins the row of its `source_run` tag.
        teacher_acc: final accuracy per teacher run id, shown beside the teacher; optional.
        margin: equivalence margin of the tests, as a fraction (0.05 = 5 points).

    Returns:
        Rows sorted by dataset, student, teacher (scratch first), teacher run and fraction (largest first).
    """
    runs = one_run_per_seed([r for r in student_runs if r.get("status", "FINISHED") == "FINISHED"])
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        groups[_key(run)].append(run)
    transfer_by_source: dict[str, list[float]] = defaultdict(list)
    for ft in finetune_runs:
        value = transfer_accuracy(ft)
        if ft.get("status", "FINISHED") == "FINISHED" and value is not None and ft["tags"].get("source_run"):
            transfer_by_source[ft["tags"]["source_run"]].append(float(value))

    rows = {key: _row(key, members, transfer_by_source, teacher_acc or {}) for key, members in groups.items()}
    for key, row in rows.items():
        if row.teacher != SCRATCH:
            twin = _scratch_partner(key, rows)
            _compare_with_scratch(row, rows.get(twin), groups[key], groups.get(twin, []), margin)
        if row.method in ATTENTION_METHODS and not row.teacher.startswith(SCRATCH):
            twin = _closest(key, rows, ATTENTION)
            _compare_with_attention(row, rows.get(twin), groups[key], groups.get(twin, []), margin)
        if row.loss and row.teacher != SCRATCH:
            twin = _default_loss_partner(key, rows)
            _compare_losses(row, rows.get(twin), groups[key], groups.get(twin, []), margin)
    out = sorted(rows.values(), key=lambda r: (r.dataset, r.student, r.teacher != SCRATCH, r.teacher,
                                               r.teacher_run, -r.fraction, r.pair_key))
    adjust_family(out)
    adjust_loss_family(out)
    return out


def transfer_accuracy(finetune_run: Mapping[str, Any]) -> float | None:
    """A fine-tune's test video accuracy: under PCL's protocol (tag `finetune_protocol` pcl) that of
    its epoch of lowest validation loss (`sel_acc_late`), the checkpoint PCL's code tests; else
    its last epoch's."""
    pcl = finetune_run["tags"].get("finetune_protocol") == "pcl"
    return finetune_run["metrics"].get("sel_acc_late" if pcl else ACC_METRICS["final"])


def _join(values: Iterable[int]) -> str:
    return ",".join(map(str, values))


def mean_curve(histories: Sequence[Sequence[tuple[int, float]]]) -> list[tuple[int, float]]:
    """Per-step mean of several (step, value) histories, over the steps every history has."""
    if not histories:
        return []
    per_run = [dict(h) for h in histories]
    steps = sorted(set.intersection(*(set(h) for h in per_run)))
    return [(s, sum(h[s] for h in per_run) / len(per_run)) for s in steps]


# ---------------------------------------------------------------- tables

def _pct(stat: Stat | None) -> str:
    if stat is None or math.isnan(stat.mean):
        return "-"
    if math.isnan(stat.std):
        return f"{100 * stat.mean:.1f}"
    return f"{100 * stat.mean:.1f} ± {100 * stat.std:.1f}"


def _signed(value: float | None) -> str:
    # Rounded first, so that a tiny negative difference prints as +0.0 and not -0.0.
    return "-" if value is None else f"{round(100 * value, 1) + 0.0:+.1f}"


def _interval(test: PairedTest | None) -> str:
    if test is None:
        return "-"
    if test.n < 2:
        return _signed(test.mean)
    return f"{_signed(test.mean)} [{_signed(test.low)}, {_signed(test.high)}]"


def _p(p: float, approx: bool = False) -> str:
    if math.isnan(p):
        return "-"
    text = f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"
    return ("≈" if approx else "") + text


def _short(run_id: str) -> str:
    return run_id[:8]


def _teacher_name(row: Row) -> str:
    """The teacher and, when known, its run: "c3d (1a2b3c4d)", so two teacher runs never share a label."""
    return f"{row.teacher} ({_short(row.teacher_run)})" if row.teacher_run else row.teacher


def _teacher_label(row: Row) -> str:
    if row.teacher == SCRATCH:
        return "scratch"
    if row.teacher.startswith(f"{SCRATCH} ["):
        return "scratch + " + row.teacher.removeprefix(f"{SCRATCH} [").removesuffix("]")
    if not row.teacher_run:
        return row.teacher
    acc = "?" if row.teacher_acc is None else f"{100 * row.teacher_acc:.1f} %"
    # A grid names its teacher runs (two recipes of one architecture, e.g. on RGB and residual frames).
    name = row.grid_teacher + row.teacher[len(row.teacher.split(" [")[0]):] if row.grid_teacher else row.teacher
    return f"{name} ({_short(row.teacher_run)}, {acc})"


def _margin(rows: Sequence[Row]) -> float:
    return next((t.margin for r in rows for t in r.tests.values()), DEFAULT_MARGIN)


HEADERS = ["teacher", "fraction", "n", "collapsed", "reading", "final", "early", "mid", "late",
           "Δ final", "Δ early", "Δ mid", "Δ late", "transfer", "Δ transfer"]


def _stat_headers(margin: float) -> list[str]:
    return ["teacher", "fraction", "reading", "pairs", "Δ final [95 % CI]", "p sign-flip", "p Holm",
            f"p TOST ±{100 * margin:g}", "TOST Holm", "verdict", f"seeds for ±{100 * margin:g}"]


ATT_HEADER = "Δ vs scratch + attention"


def _acc_cells(row: Row, reading: str, attention: bool = False) -> list[str]:
    """One line of the accuracy table; the row's own columns only on its first (last-epoch) line.
    `attention`: with the "Δ vs scratch + attention" column (final accuracy, difference of means)."""
    acc, delta = (row.acc, row.delta) if reading == "last" else (row.best, row.best_delta)
    own = [_teacher_label(row), f"{row.fraction:g}", str(len(row.seeds)), f"{row.collapsed}/{len(row.run_ids)}"]
    transfer = [_pct(row.transfer), _signed(row.transfer_delta)]
    if reading != "last":
        own, transfer = [""] * len(own), [""] * len(transfer)
    att = [_signed(row.att_delta.get(reading))] if attention else []
    return [*own, reading, *(_pct(acc.get(c)) for c in ("final", *STAGES)),
            *(_signed(delta.get(c)) for c in ("final", *STAGES)), *transfer, *att]


def _comparison(row: Row, against: str) -> tuple[dict[str, PairedTest], str]:
    """A row's tests and verdict against scratch, "scratch + attention" or the default loss."""
    return {"scratch": (row.tests, row.verdict), "attention": (row.att_tests, row.att_verdict),
            "loss": (row.loss_tests, row.loss_verdict)}[against]


def _stat_cells(row: Row, against: str = "scratch") -> list[list[str]]:
    """Lines of the KD - scratch table for a KD row (`against` "attention": the KD - scratch +
    attention table): one per reading, or one saying why it has none."""
    tests, why = _comparison(row, against)
    if not tests:
        return [[_teacher_label(row), f"{row.fraction:g}", "-", "0", "-", "-", "-", "-", "-", why or "-", "-"]]
    lines = []
    for reading, t in tests.items():
        first = not lines
        lines.append([
            _teacher_label(row) if first else "", f"{row.fraction:g}" if first else "", reading, str(t.n),
            _interval(t), _p(t.p_perm, t.perm_method != "exact"), _p(t.p_holm), _p(t.p_tost), _p(t.p_tost_holm),
            t.verdict or "-", "-" if t.seeds_for_margin is None else str(t.seeds_for_margin),
        ])
    return lines


def _render(title: str, headers: list[str], body: list[list[str]], markdown: bool, level: str = "##") -> str:
    if markdown:
        lines = [f"{level} {title}", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in body])
    widths = [max(len(h), *(len(c[i]) for c in body)) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([title, fmt.format(*headers), "  ".join("-" * w for w in widths)] + [fmt.format(*c) for c in body])


def _family(rows: Sequence[Row]) -> int:
    return sum(len(r.tests) + len(r.att_tests) for r in rows)


def summary(rows: Sequence[Row]) -> str:
    """One sentence: the verdicts per reading, the Holm family and the margin."""
    family = _family(rows)
    if not family:
        return "No KD row has paired seeds with a scratch twin: nothing was tested."
    parts = []
    verdicts = (stats.HELPS, stats.HURTS, stats.EQUIVALENT, stats.INCONCLUSIVE)
    for kind, what in (("tests", ""), ("att_tests", "vs scratch + attention, ")):
        for reading in READINGS:
            counts = Counter(getattr(r, kind)[reading].verdict for r in rows if reading in getattr(r, kind))
            if counts:
                parts.append(f"{what}{READING_NAMES[reading]}: " + ", ".join(f"{counts[v]} {v}" for v in verdicts))
    att = sum(len(r.att_tests) for r in rows)
    tests = (f"{family} KD-vs-scratch tests" if not att
             else f"{family - att} KD-vs-scratch and {att} KD-vs-scratch + attention tests")
    return f"Verdicts ({tests} in one Holm family, margin ±{100 * _margin(rows):g} points): " + "; ".join(parts) + "."


def _note(margin: float) -> str:
    m = f"{100 * margin:g}"
    return (
        "Accuracy: test video top-1 in %, mean ± std over n seeds, collapsed runs included. reading: last = "
        "the accuracy at that epoch, best = the best test accuracy reached by then (the KD paper's reading; "
        "the best final accuracy is the best of the whole run). Teacher: one row per teacher run, with its "
        "run id and final accuracy. collapsed: stuck runs, of n: train accuracy at most 1.5x chance after "
        "half the epochs (scratch runs too), whatever the loss did. Δ: distilled minus scratch at the same fraction (difference of means). "
        "early/mid/late: after 25/75/100 % of the epochs. transfer: after fine-tuning on the transfer dataset (under PCL's fine-tuning protocol, at its epoch of lowest validation loss). "
        "KD - scratch: the final accuracy compared seed by seed over the seeds both rows ran (pairs). "
        "Δ final [95 % CI]: mean of the differences with a Student-t interval, mean ± t(0.975, n-1)·sd/√n. "
        "p sign-flip: two-sided paired permutation test, exact over all 2^n sign flips up to 16 pairs, "
        f"≈ a Monte-Carlo estimate from {stats.MC_DRAWS} seeded draws beyond; with 5 pairs or fewer it "
        "cannot go below 0.05. p Holm: Holm's step-down correction over the family of every KD-vs-scratch "
        "test in this report (every KD row, both readings). p TOST: equivalence within ±"
        f"{m} points (two one-sided paired t-tests), TOST Holm: the same correction over the same family. "
        "verdict: helps / hurts when p Holm < 0.05 (by the sign of Δ), equivalent when TOST Holm < 0.05 "
        f"instead, else inconclusive. seeds for ±{m}: pairs needed for a 95 % half-width of at most {m} "
        "points at the observed sd of the differences. KD runs that replay a different number of fixed "
        "views than their scratch runs are not compared (mismatched views), nor are rows whose recipes "
        "differ (recipes differ: the optimiser, schedule, batch, warm-up, epochs, clip or model settings "
        "that differ, each as kd vs scratch). (pcl): students trained inside "
        "PCL. [feature]: feature KD (FitNets-style hint loss), [gkd]: generative feature KD, [gkd+logit]: "
        "GKD with logit KD, [gkd, ad-only|gd-only|no-rec]: GKD with one term off, scratch + attention: "
        "GKD's attention module and CVAE without a teacher; all compared with plain scratch. "
        f"{ATT_HEADER}: a row whose student has the attention module against scratch + attention (the "
        "teacher's own contribution), difference of final means, and paired like KD - scratch, in the "
        "same Holm family."
    )


def format_table(rows: Sequence[Row], markdown: bool = False) -> str:
    """Per (dataset, student): the accuracy table (both readings) and the KD - scratch tests, then a
    summary of the verdicts and what every column means."""
    margin = _margin(rows)
    parts = []
    for (dataset, student), group in _by_student(rows).items():
        attention = any(r.att_verdict or r.att_tests for r in group)  # a column only where it applies
        body = [_acc_cells(r, reading, attention) for r in group for reading in READINGS if reading == "last" or r.best]
        headers = HEADERS + [ATT_HEADER] if attention else HEADERS
        parts.append(_render(f"Student {student} on {dataset}", headers, body, markdown))
        kd = [line for r in group if r.teacher != SCRATCH for line in _stat_cells(r)]
        if kd:
            parts.append(_render(f"KD - scratch, paired by seed: student {student} on {dataset}",
                                 _stat_headers(margin), kd, markdown, level="###"))
        att = [line for r in group if r.att_verdict or r.att_tests for line in _stat_cells(r, "attention")]
        if att:
            parts.append(_render(f"KD - scratch + attention, paired by seed: student {student} on {dataset}",
                                 _stat_headers(margin), att, markdown, level="###"))
        loss = [line for r in group if r.loss for line in _stat_cells(r, "loss")]
        if loss:
            default = next(r.loss_default for r in group if r.loss)
            parts.append(_render(f"KD under another loss - KD under {default} (the default), paired by seed: "
                                 f"student {student} on {dataset}", _stat_headers(margin), loss, markdown, level="###"))
    loss_note = [LOSS_NOTE] if any(r.loss for r in rows) else []
    return "\n\n".join(parts + [summary(rows), *_loss_summary(rows), _note(margin), *loss_note]) + "\n"


LOSS_NOTE = (f"[sum], [balanced], [mix]: KD under that loss weighting instead of the default ({KDConfig.weighting}; "
             f"{PCL_KD_WEIGHTING}, the paper's Eq. 7, for students trained inside PCL). "
             "KD under another loss - KD under the default: the same teacher run's two rows, final accuracy "
             "paired by seed, tested as above but in a Holm family of their own (both readings of every such row).")


def _loss_summary(rows: Sequence[Row]) -> list[str]:
    counts = {r: Counter(row.loss_tests[r].verdict for row in rows if r in row.loss_tests) for r in READINGS}
    family = sum(counts[r].total() for r in READINGS)
    if not family:
        return []
    verdicts = (stats.HELPS, stats.HURTS, stats.EQUIVALENT, stats.INCONCLUSIVE)
    parts = [f"{READING_NAMES[r]}: " + ", ".join(f"{counts[r][v]} {v}" for v in verdicts) for r in READINGS if counts[r]]
    tests = "1 test in its own Holm family" if family == 1 else f"{family} tests in their own Holm family"
    defaults = " or ".join(sorted({row.loss_default for row in rows if row.loss_tests}))
    return [f"Loss verdicts, another loss against {defaults} ({tests}; helps: the other loss is ahead): "
            + "; ".join(parts) + "."]


def _by_student(rows: Sequence[Row]) -> dict[tuple[str, str], list[Row]]:
    out: dict[tuple[str, str], list[Row]] = defaultdict(list)
    for r in rows:
        out[(r.dataset, r.student)].append(r)
    return out


TEST_COLUMNS = ["delta_final_paired", "delta_final_low", "delta_final_high", "pairs", "sd_diff", "p_perm",
                "perm_method", "p_holm", "p_tost", "p_tost_holm", "verdict", "seeds_for_margin", "seeds_for_power"]


def _num(v: float | None) -> str:
    return "" if v is None or math.isnan(v) else f"{v:.6g}"


def _test_values(row: Row, reading: str, against: str = "scratch") -> list[Any]:
    tests, why = _comparison(row, against)
    t = tests.get(reading)
    if t is None:
        # Why there is no test (no scratch twin, mismatched views or recipes) holds for both readings.
        return ["", "", "", 0, "", "", "", "", "", "", "" if tests else why, "", ""]
    return [_num(t.mean), _num(t.low), _num(t.high), t.n, _num(t.sd), _num(t.p_perm), t.perm_method,
            _num(t.p_holm), _num(t.p_tost), _num(t.p_tost_holm), t.verdict,
            "" if t.seeds_for_margin is None else t.seeds_for_margin,
            "" if t.seeds_for_power is None else t.seeds_for_power]


def write_csv(rows: Sequence[Row], path: Path) -> None:
    """One line per row; accuracies and their differences as fractions in [0, 1], blank where not available.

    `<col>_mean`, `_std` and `delta_<col>` are the last-epoch reading, `best_<col>_mean`, `_std` and
    `delta_best_<col>` the best-so-far one. The tests of the final accuracy (`delta_final_paired` with
    its interval `delta_final_low/high` over `pairs` seeds, `p_perm` and whether it is `exact` or
    `monte carlo`, `p_holm`, `p_tost`, `p_tost_holm`, `verdict`, `seeds_for_margin` for a 95 % half-width
    within the margin and `seeds_for_power` for 80 % power at the margin) come once per reading, the
    best-so-far ones prefixed `best_`. `margin` is the equivalence margin, `holm_family` the number of
    tests Holm's correction ran over; `collapsed` counts the row's collapsed runs. The last columns
    compare a row whose student has GKD's attention module with "scratch + attention":
    `delta_final_vs_attention` (and `best_`), and its last-epoch test as `att_<test column>`; then a
    row under another loss weighting than the default (`loss`) with the same teacher run's row under
    the default: `delta_final_vs_default_loss` (and `best_`) and `loss_<test column>`; last, the
    grid's name of the teacher run (`grid_teacher`), if any.
    """
    header = ["dataset", "student", "teacher", "teacher_run", "fraction", "n", "seeds"]
    for prefix in ("", "best_"):
        for col in ACC_METRICS:
            header += [f"{prefix}{col}_mean", f"{prefix}{col}_std", f"delta_{prefix}{col}"]
    header += TEST_COLUMNS + [f"best_{c}" for c in TEST_COLUMNS]
    header += ["margin", "holm_family", "collapsed", "views"]
    header += ["transfer_n", "transfer_mean", "transfer_std", "delta_transfer", "epochs_to_scratch_mean", "run_ids"]
    header += ["delta_final_vs_attention", "best_delta_final_vs_attention"] + [f"att_{c}" for c in TEST_COLUMNS]
    header += ["loss", "delta_final_vs_default_loss", "best_delta_final_vs_default_loss"] + [f"loss_{c}" for c in TEST_COLUMNS]
    header += ["grid_teacher"]
    family = _family(rows)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            line = [r.dataset, r.student, r.teacher, r.teacher_run, f"{r.fraction:g}", len(r.seeds),
                    " ".join(map(str, r.seeds))]
            for acc, delta in ((r.acc, r.delta), (r.best, r.best_delta)):
                for col in ACC_METRICS:
                    s = acc.get(col)
                    line += [_num(s.mean if s else None), _num(s.std if s else None), _num(delta.get(col))]
            line += _test_values(r, "last") + _test_values(r, "best")
            line += [_num(_margin(rows)), family, r.collapsed, _join(r.views)]
            t, e = r.transfer, r.epochs_to_scratch
            line += [t.n if t else 0, _num(t.mean if t else None), _num(t.std if t else None), _num(r.transfer_delta),
                     _num(e.mean if e else None), " ".join(r.run_ids)]
            line += [_num(r.att_delta.get("last")), _num(r.att_delta.get("best"))]
            line += _test_values(r, "last", against="attention")
            line += [r.loss, _num(r.loss_delta.get("last")), _num(r.loss_delta.get("best"))]
            line += _test_values(r, "last", against="loss")
            line += [r.grid_teacher]
            w.writerow(line)


# ---------------------------------------------------------------- figures

def curves_figure(student: str, dataset: str, curves: dict[tuple[float, str], list[tuple[int, float]]]) -> Figure:
    """Test accuracy per epoch, one panel per fraction, one line per teacher (scratch dashed)."""
    fractions = sorted({f for f, _ in curves}, reverse=True)
    fig, axes = plt.subplots(1, len(fractions), figsize=(4 * len(fractions), 3.5), squeeze=False)
    for ax, frac in zip(axes[0], fractions):
        for (f, teacher), curve in sorted(curves.items(), key=lambda kv: (kv[0][1] != SCRATCH, kv[0][1])):
            if f != frac or not curve:
                continue
            steps, values = zip(*curve)
            scratch = teacher == SCRATCH
            ax.plot(steps, [100 * v for v in values], "--" if scratch else "-", marker="o", markersize=3,
                    color="black" if scratch else None, label="scratch" if scratch else f"KD <- {teacher}")
        ax.set_title(f"{student}, fraction {frac:g}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{dataset} test video top-1 (%)")
        ax.set_ylim(0, 100)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def delta_heatmap(rows: Sequence[Row], dataset: str) -> Figure:
    """KD - scratch accuracy (points) per (student <- teacher, fraction), one panel per stage."""
    kd = [r for r in rows if r.dataset == dataset and r.teacher != SCRATCH]
    pairs = sorted({(r.student, _teacher_name(r)) for r in kd})
    fractions = sorted({r.fraction for r in kd}, reverse=True)
    cols = [c for c in ("final", *STAGES) if any(c in r.delta for r in kd)]
    if any(r.transfer_delta is not None for r in kd):
        cols.append("transfer")
    cols = cols or ["final"]
    grids = {c: np.full((len(pairs), len(fractions)), np.nan) for c in cols}
    for r in kd:
        i, j = pairs.index((r.student, _teacher_name(r))), fractions.index(r.fraction)
        for c in cols:
            v = r.transfer_delta if c == "transfer" else r.delta.get(c)
            if v is not None:
                grids[c][i, j] = 100 * v
    finite = [abs(v) for g in grids.values() for v in g.ravel() if not np.isnan(v)]
    lim = max(finite, default=1.0) or 1.0
    fig, axes = plt.subplots(1, len(cols), figsize=(1.2 * len(fractions) * len(cols) + 3, 0.5 * len(pairs) + 2),
                             squeeze=False)
    for k, (ax, c) in enumerate(zip(axes[0], cols)):
        im = ax.imshow(grids[c], cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
        ax.set_xticks(range(len(fractions)), [f"{f:g}" for f in fractions])
        # Panels share their rows: labelled once, on the left, so no label runs into the panel before.
        ax.set_yticks(range(len(pairs)), [f"{s} <- {t}" for s, t in pairs] if k == 0 else [])
        ax.set_xlabel("fraction")
        ax.set_title(f"Δ {c} (points)")
        for (i, j), v in np.ndenumerate(grids[c]):
            if not np.isnan(v):
                ax.text(j, i, f"{v:+.1f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=list(axes[0]), fraction=0.03)
    return fig


# ---------------------------------------------------------------- the report

def _teacher_accuracy(experiment: str, students: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Final accuracy of each teacher run the students name, among the experiment's teacher runs.

    A teacher trained in another experiment is not found here; its row shows the bare teacher name.
    """
    from kdhar import tracking

    wanted = {r["tags"]["teacher_run_id"] for r in students if r["tags"].get("teacher_run_id")}
    if not wanted:
        return {}
    metric = ACC_METRICS["final"]
    teachers = tracking.find_runs(experiment, "tags.role = 'teacher'")
    return {t["run_id"]: t["metrics"][metric] for t in teachers if t["run_id"] in wanted and metric in t["metrics"]}


def report_folder(experiment: str) -> str:
    """The folder (under --out) an experiment's report goes to: its name as one safe path
    component, so a name like ../x or /etc cannot write outside --out, and one folder per name:
    every other character is percent-encoded (a/b is a%2Fb, so it no longer shares a_b's folder,
    as when both became a_b), and so is a leading dot. Letters, digits, - _ and . stay as they are."""
    from urllib.parse import quote

    folder = quote(experiment, safe="-_.")
    dots = len(folder) - len(folder.lstrip("."))
    return "%2E" * dots + folder[dots:]


def reports_experiment(experiment: str) -> str:
    """Where the report runs of `experiment` go, so they do not pile up among its training runs."""
    return f"{experiment}-reports"


def reported_experiments() -> list[str]:
    """The experiments holding finished kdhar student runs, for `kdhar report` without --experiment.

    Raises:
        ReportError: none does; the message names the experiments that hold any kdhar runs.
    """
    from kdhar import tracking

    names = tracking.experiments_with_runs("tags.role = 'student' and attributes.status = 'FINISHED'")
    if names:
        return names
    others = [n for n in tracking.experiments_with_runs("tags.role LIKE '%'") if not n.endswith("-reports")]
    where = f"experiments with kdhar runs: {', '.join(others)}" if others else "no experiment holds kdhar runs"
    raise ReportError(f"no finished student runs in the tracking store ({tracking.tracking_uri()}; {where}); "
                      "train some with `kdhar distill` (or mlflow run . -e distill), then run the report again")


def build_report(experiment: str, out_dir: Path, margin: float = DEFAULT_MARGIN) -> Report:
    """Builds the comparison of an experiment's student and fine-tune runs and logs it as a report run.

    Writes `report.md`, `report.csv`, `curves_<dataset>_<student>.png` and `delta_<dataset>.png` into
    `out_dir` and logs them to a new run tagged role=report in `reports_experiment(experiment)`. `margin` is the
    equivalence margin of the KD-vs-scratch tests, as a fraction (0.05 = 5 points).

    Raises:
        ReportError: the experiment does not exist, or the margin is not between 0 and 1.
    """
    from kdhar import tracking

    if not 0 < margin < 1:
        raise ReportError(f"margin {100 * margin:g} points is not an accuracy difference; "
                          "give --margin between 0 and 100 (points), e.g. --margin 5")
    if not tracking.experiment_exists(experiment):
        raise ReportError(f"experiment '{experiment}' does not exist in the tracking store "
                          f"({tracking.tracking_uri()}); check --experiment or MLFLOW_TRACKING_URI")
    finished = "attributes.status = 'FINISHED'"
    # Tuning trials are students too, but with other tau/lambda and budgets: they are not grid cells.
    students = [
        r for r in tracking.find_runs(experiment, f"tags.role = 'student' and {finished}")
        if "optuna_study" not in r["tags"]
    ]
    finetunes = tracking.find_runs(experiment, f"tags.role = 'finetune' and {finished}")
    # Temporal detection students get a table of their own (mAP by method, `kdhar.detection_report`).
    detectors = [r for r in students if r["tags"].get("task") == "detection"]
    students = [r for r in students if r["tags"].get("task") != "detection"]
    rows = aggregate(students, finetunes, _teacher_accuracy(experiment, students), margin)
    det_teachers = []
    if detectors:  # the teacher runs the detection table's students name, for its teacher rows
        det_teachers = tracking.find_runs(experiment, f"tags.role = 'teacher' and tags.task = 'detection' and {finished}")
    det_rows = detection_rows(detectors, margin, det_teachers)
    if not rows and not det_rows:
        return Report(experiment, [], f"experiment '{experiment}' has no finished student runs yet; train some with "
                      "`kdhar distill` or `kdhar experiment run experiments/cpu.yaml`, then run the report again.\n")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = (format_table(rows) if rows else "") + (format_detection(det_rows, margin) if det_rows else "")
    md, csv_path = out_dir / "report.md", out_dir / "report.csv"
    md.write_text(f"# Distillation report: {experiment}\n\n" + (format_table(rows, markdown=True) if rows else "")
                  + (format_detection(det_rows, margin, markdown=True) if det_rows else ""))
    files = [md]
    if rows:
        write_csv(rows, csv_path)
        files.append(csv_path)
    if det_rows:
        write_detection_csv(det_rows, out_dir / "detection.csv")
        files.append(out_dir / "detection.csv")
    figures: dict[str, Figure] = {}
    for (dataset, student), group in _by_student(rows).items():
        curves = {(r.fraction, _teacher_name(r)): mean_curve([tracking.metric_history(rid, CURVE_METRIC) for rid in r.run_ids])
                  for r in group}
        # "r3d_18 (pcl)" -> curves_ucf101_r3d_18_pcl.png: file names without spaces or brackets
        slug = "".join(c if c.isalnum() or c in "_-." else "_" for c in student).strip("_").replace("__", "_")
        figures[f"curves_{dataset}_{slug}.png"] = curves_figure(student, dataset, curves)
    for dataset in sorted({r.dataset for r in rows}):
        if any(r.teacher != SCRATCH for r in rows if r.dataset == dataset):
            figures[f"delta_{dataset}.png"] = delta_heatmap(rows, dataset)
    for name, fig in figures.items():
        fig.savefig(out_dir / name, dpi=120, bbox_inches="tight")
        plt.close(fig)
        files.append(out_dir / name)

    description = (f"KD-vs-scratch report of experiment '{experiment}': {len(rows)} rows from {len(students)} student "
                   f"and {len(finetunes)} fine-tune runs; the table and plots are under Artifacts > report.")
    tags = {"role": "report", "source_experiment": experiment, "mlflow.note.content": description}
    with tracking.RunTracker(reports_experiment(experiment), run_name=f"report-{experiment}", tags=tags) as tracker:
        tracker.log_params({"student_runs": len(students), "finetune_runs": len(finetunes), "rows": len(rows),
                            "margin": margin, "holm_family": _family(rows),
                            **({"detection_runs": len(detectors), "detection_rows": len(det_rows)} if det_rows else {})})
        for path in files:
            tracker.log_artifact(path, "report")
        run_id = tracker.run_id
    return Report(experiment, rows, text, files, run_id)
