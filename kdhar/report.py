"""Paper-style comparison tables and plots, built from the runs of one MLflow experiment alone.

Runs are found by their tags: students (`role=student`, `student_arch`, `teacher_arch` = "none" for
scratch, `fraction`, `seed`, `dataset`, optionally `views`, `collapsed` and `teacher_run_id`) and
fine-tunes (`role=finetune`, `source_run`). For every student, dataset and fraction there is one row per
teacher (and one for scratch) with the final and early/mid/late accuracy as mean ± std over seeds, the
number of collapsed runs, the KD - scratch differences and the accuracy after transfer. The final
accuracy is also compared seed by seed: a paired 95 % t-interval of KD - scratch and a verdict read from
it. Rows are only compared when both were trained on the same number of fixed views. The maths
(`mean_std`, `paired_interval`, `verdict`, `aggregate`, `mean_curve`) are pure functions of run dicts.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from scipy import stats  # noqa: E402

from kdhar.methods import REPORT_MARKS  # noqa: E402

# Table column -> the metric it is read from. The stages are logged by kdhar.train at 25/75/100 % of
# the epochs, the paper's 50/150/200 of 200.
ACC_METRICS = {
    "final": "final_test_video_top1",
    "early": "acc_early",
    "mid": "acc_mid",
    "late": "acc_late",
}
STAGES = ("early", "mid", "late")
CURVE_METRIC = "test_video_top1"
SCRATCH = "none"
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (NaN for fewer than two values) of n values."""

    mean: float
    std: float
    n: int


@dataclass(frozen=True)
class Paired:
    """Mean of the per-seed differences KD - scratch over n paired seeds, with its 95 % t-interval.

    `low` and `high` are NaN when fewer than two seeds pair up (no spread to estimate).
    """

    mean: float
    low: float
    high: float
    n: int


@dataclass
class Row:
    """One (dataset, student, teacher, fraction) cell of the comparison; teacher "none" is scratch.

    `delta` and `transfer_delta` are differences of means; `paired` and `verdict` compare the final
    accuracy seed by seed. A KD row whose views differ from its scratch twin's has neither, and its
    verdict says so.
    """

    dataset: str
    student: str
    teacher: str
    fraction: float
    seeds: list[int]
    run_ids: list[str]
    acc: dict[str, Stat]  # keys of ACC_METRICS present in the runs
    delta: dict[str, float] = field(default_factory=dict)  # KD mean - scratch mean, per ACC_METRICS key
    transfer: Stat | None = None
    transfer_delta: float | None = None
    epochs_to_scratch: Stat | None = None
    collapsed: int = 0  # runs whose training collapsed; they stay in `acc`
    views: list[int] = field(default_factory=list)  # distinct `views` tags of the runs (0 = fresh views)
    teacher_runs: list[str] = field(default_factory=list)  # `teacher_run_id` tags of the KD runs
    teacher_acc: dict[str, float] = field(default_factory=dict)  # teacher run id -> its final accuracy
    paired: Paired | None = None  # final accuracy, KD - scratch, paired by seed
    verdict: str = ""  # read from `paired`; empty for scratch rows


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
    kd_runs: Sequence[dict[str, Any]], scratch_runs: Sequence[dict[str, Any]], metric: str = ACC_METRICS["final"]
) -> Paired | None:
    """Per-seed differences d_s = kd_s - scratch_s over the seeds both lists have, with a t-interval.

    Pairing by seed removes the part of the spread the two runs of a seed share (same data order and
    initialisation), so the interval is narrower than one from two independent means. The interval is
    mean(d) ± t(0.975, n - 1) * sd(d) / sqrt(n).

    Args:
        kd_runs: run dicts of the distilled row; the first run of a seed counts (the newest, as listed
            by `tracking.find_runs`).
        scratch_runs: run dicts of the scratch row, likewise.
        metric: the metric compared; a seed whose run lacks it is not paired.

    Returns:
        The paired mean and interval (bounds NaN for one pair), or None when no seed pairs up.
    """
    kd, scratch = _by_seed(kd_runs, metric), _by_seed(scratch_runs, metric)
    diffs = [kd[seed] - scratch[seed] for seed in sorted(kd.keys() & scratch.keys())]
    if not diffs:
        return None
    d = mean_std(diffs)
    if d.n < 2:
        return Paired(d.mean, math.nan, math.nan, d.n)
    half = stats.t.ppf(1 - (1 - CONFIDENCE) / 2, d.n - 1) * d.std / math.sqrt(d.n)
    return Paired(d.mean, d.mean - half, d.mean + half, d.n)


def verdict(paired: Paired | None) -> str:
    """Reads a paired interval: "helps" / "hurts" when it lies above / below 0, else "no evidence"."""
    if paired is None:
        return "no paired seeds"
    if paired.n < 2:
        return f"no evidence (n={paired.n})"
    if paired.low > 0:
        return "helps"
    if paired.high < 0:
        return "hurts"
    return "no evidence"


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
    # Training sets both the tag and the metric; either is enough, older runs carry neither.
    return run["tags"].get("collapsed", "").lower() == "true" or run["metrics"].get("collapsed") == 1.0


def _running_max(run: dict[str, Any]) -> bool:
    """PCL runs read their stages as the paper does: the best test accuracy reached by then."""
    return run["tags"].get("ssl", "none") != "none"


def _views(run: dict[str, Any]) -> int:
    # Runs from before the teacher-logit cache have no tag: they drew a fresh view every epoch.
    return int(run["tags"].get("views", "0"))


def _key(run: dict[str, Any]) -> tuple[str, str, str, float]:
    tags = run["tags"]
    student = tags.get("student_arch") or tags.get("arch", "?")
    if tags.get("ssl", "none") != "none":
        # Students trained inside PCL get tables of their own, beside the supervised ones, and pair
        # with the scratch runs of their own regime.
        student = f"{student} ({tags['ssl']})"
    teacher = tags.get("teacher_arch", SCRATCH)
    method = REPORT_MARKS.get(tags.get("method", ""), "")
    if method:
        # Methods beyond logit KD (GKD's) get rows of their own, e.g. "c3d [gkd]"; the scratch run with
        # GKD's attention module is "none [attention]", compared with plain scratch like a KD row.
        teacher = f"{teacher} [{method}]"
    return tags.get("dataset", "?"), student, teacher, float(tags.get("fraction", "1.0"))



def one_run_per_seed(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keeps the first run of each (dataset, student, teacher, fraction, seed).

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


def aggregate(
    student_runs: Sequence[dict[str, Any]],
    finetune_runs: Sequence[dict[str, Any]] = (),
    teacher_acc: Mapping[str, float] | None = None,
) -> list[Row]:
    """Groups FINISHED student runs into rows, with KD - scratch deltas, verdicts and transfer accuracy.

    A KD row is compared with the scratch row of the same dataset, student and fraction only when all
    runs of both share one `views` value; otherwise it gets no deltas and a "mismatched views" verdict.

    Args:
        student_runs: run dicts (run_id, tags, metrics, status) with role=student.
        finetune_runs: run dicts with role=finetune; each joins the row of its `source_run` tag.
        teacher_acc: final accuracy per teacher run id, shown beside the teacher; optional.

    Returns:
        Rows sorted by dataset, student, teacher (scratch first) and fraction (largest first).
    """
    runs = one_run_per_seed([r for r in student_runs if r.get("status", "FINISHED") == "FINISHED"])
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        groups[_key(run)].append(run)
    transfer_by_source: dict[str, list[float]] = defaultdict(list)
    for ft in finetune_runs:
        value = ft["metrics"].get(ACC_METRICS["final"])
        if ft.get("status", "FINISHED") == "FINISHED" and value is not None and ft["tags"].get("source_run"):
            transfer_by_source[ft["tags"]["source_run"]].append(float(value))

    rows: dict[tuple, Row] = {}
    teacher_acc = teacher_acc or {}
    for key, members in groups.items():
        acc = {}
        for col, metric in ACC_METRICS.items():
            vals = [m["metrics"].get(f"best_{metric}", m["metrics"][metric]) if col in STAGES and _running_max(m)
                    else m["metrics"][metric] for m in members if metric in m["metrics"]]
            if vals:
                acc[col] = mean_std(vals)
        # A source fine-tuned twice counts once (its latest fine-tune), like a repeated seed.
        transfers = [transfer_by_source[m["run_id"]][0] for m in members if transfer_by_source.get(m["run_id"])]
        ets = [m["metrics"]["epochs_to_scratch_acc"] for m in members
               if m["metrics"].get("epochs_to_scratch_acc", -1) >= 0]
        teacher_runs = sorted({m["tags"]["teacher_run_id"] for m in members if m["tags"].get("teacher_run_id")})
        rows[key] = Row(
            dataset=key[0], student=key[1], teacher=key[2], fraction=key[3],
            seeds=sorted(_seed(m) for m in members),
            run_ids=[m["run_id"] for m in members],
            acc=acc,
            transfer=mean_std(transfers) if transfers else None,
            epochs_to_scratch=mean_std(ets) if ets else None,
            collapsed=sum(_collapsed(m) for m in members),
            views=sorted({_views(m) for m in members}),
            teacher_runs=teacher_runs,
            teacher_acc={t: float(teacher_acc[t]) for t in teacher_runs if t in teacher_acc},
        )
    for key, row in rows.items():
        if row.teacher == SCRATCH:
            continue
        scratch = rows.get((key[0], key[1], SCRATCH, key[3]))
        if scratch is None:
            row.verdict = "no scratch runs"
            continue
        if len(set(row.views) | set(scratch.views)) > 1:
            # A cached-views run sees less augmentation than a fresh-view run: comparing them would
            # credit (or blame) distillation for the data pipeline.
            row.verdict = f"mismatched views (kd {_join(row.views)} vs scratch {_join(scratch.views)})"
            continue
        row.delta = {col: row.acc[col].mean - scratch.acc[col].mean for col in row.acc if col in scratch.acc}
        if row.transfer is not None and scratch.transfer is not None:
            row.transfer_delta = row.transfer.mean - scratch.transfer.mean
        row.paired = paired_interval(groups[key], groups[(key[0], key[1], SCRATCH, key[3])])
        row.verdict = verdict(row.paired)
    return sorted(rows.values(), key=lambda r: (r.dataset, r.student, r.teacher != SCRATCH, r.teacher, -r.fraction))


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
    return "-" if value is None else f"{100 * value:+.1f}"


def _interval(paired: Paired | None) -> str:
    if paired is None:
        return "-"
    if paired.n < 2:
        return _signed(paired.mean)
    return f"{_signed(paired.mean)} [{_signed(paired.low)}, {_signed(paired.high)}]"


def _teacher_label(row: Row) -> str:
    if row.teacher == SCRATCH:
        return "scratch"
    if row.teacher.startswith(f"{SCRATCH} ["):
        return "scratch + " + row.teacher.removeprefix(f"{SCRATCH} [").removesuffix("]")
    if not row.teacher_acc:
        return row.teacher
    # One accuracy per teacher run, "?" where it is unknown, so two teachers are never read as one.
    accs = [f"{100 * row.teacher_acc[t]:.1f} %" if t in row.teacher_acc else "?" for t in row.teacher_runs]
    return f"{row.teacher} ({', '.join(accs)})"


HEADERS = ["teacher", "fraction", "n", "final", "collapsed", "Δ final", "Δ final 95 % CI", "verdict",
           "transfer", "Δ transfer", "early", "mid", "late", "Δ early", "Δ mid", "Δ late"]


def _cells(row: Row) -> list[str]:
    return [
        _teacher_label(row),
        f"{row.fraction:g}",
        str(len(row.seeds)),
        _pct(row.acc.get("final")),
        f"{row.collapsed}/{len(row.run_ids)}",
        _signed(row.delta.get("final")),
        _interval(row.paired),
        row.verdict or "-",
        _pct(row.transfer),
        _signed(row.transfer_delta),
        *(_pct(row.acc.get(s)) for s in STAGES),
        *(_signed(row.delta.get(s)) for s in STAGES),
    ]


def format_table(rows: Sequence[Row], markdown: bool = False) -> str:
    """One table per (dataset, student): accuracy in %, mean ± std over n seeds, Δ = KD - scratch, verdicts."""
    parts = []
    for (dataset, student), group in _by_student(rows).items():
        title = f"Student {student} on {dataset}"
        body = [_cells(r) for r in group]
        if markdown:
            lines = [f"## {title}", "", "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
            lines += ["| " + " | ".join(c) + " |" for c in body]
        else:
            widths = [max(len(h), *(len(c[i]) for c in body)) for i, h in enumerate(HEADERS)]
            fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
            lines = [title, fmt.format(*HEADERS), "  ".join("-" * w for w in widths)]
            lines += [fmt.format(*c) for c in body]
        parts.append("\n".join(lines))
    note = ("Accuracy: test video top-1 in %, mean ± std over n seeds, collapsed runs included. Teacher in "
            "parentheses: final accuracy of each teacher run distilled from. collapsed: runs whose train "
            "accuracy stayed at chance while the KD loss did not come down, of n. Δ: distilled minus scratch at the same "
            "fraction (difference of means). Δ final 95 % CI: mean of the per-seed differences KD - scratch "
            "over the seeds both rows ran (paired by seed) with a two-sided Student-t interval, mean ± "
            "t(0.975, n-1)·sd/√n. verdict: helps when the whole interval is above 0, hurts when below 0, no "
            "evidence when it contains 0 or fewer than two seeds pair up. KD runs that replay a different "
            "number of fixed views than their scratch runs are not compared (mismatched views). "
            "early/mid/late: after 25/75/100 % of the epochs; for students trained inside PCL (tables marked "
            "(pcl)) the best test accuracy reached by then, as the KD paper reads its stages. transfer: after "
            "fine-tuning on the transfer dataset. [gkd]: generative feature KD, [gkd+logit]: GKD with logit KD, "
            "scratch + attention: GKD's attention module and CVAE without a teacher; all compared with plain scratch.")
    return "\n\n".join(parts + [note]) + "\n"


def _by_student(rows: Sequence[Row]) -> dict[tuple[str, str], list[Row]]:
    out: dict[tuple[str, str], list[Row]] = defaultdict(list)
    for r in rows:
        out[(r.dataset, r.student)].append(r)
    return out


def write_csv(rows: Sequence[Row], path: Path) -> None:
    """One line per row; accuracies and their differences as fractions in [0, 1], blank where not available.

    `delta_final_paired`, `delta_final_low` and `delta_final_high` are the paired mean and 95 % interval
    of `paired_interval` over `pairs` seeds; `collapsed` counts the row's collapsed runs.
    """

    def num(v: float | None) -> str:
        return "" if v is None or math.isnan(v) else f"{v:.6g}"

    header = ["dataset", "student", "teacher", "fraction", "n", "seeds"]
    for col in ACC_METRICS:
        header += [f"{col}_mean", f"{col}_std", f"delta_{col}"]
    header += ["delta_final_paired", "delta_final_low", "delta_final_high", "pairs", "verdict", "collapsed",
               "views", "teacher_runs"]
    header += ["transfer_n", "transfer_mean", "transfer_std", "delta_transfer", "epochs_to_scratch_mean", "run_ids"]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            line = [r.dataset, r.student, r.teacher, f"{r.fraction:g}", len(r.seeds), " ".join(map(str, r.seeds))]
            for col in ACC_METRICS:
                s = r.acc.get(col)
                line += [num(s.mean if s else None), num(s.std if s else None), num(r.delta.get(col))]
            p = r.paired
            line += [num(p.mean if p else None), num(p.low if p else None), num(p.high if p else None),
                     p.n if p else 0, r.verdict, r.collapsed, _join(r.views), " ".join(r.teacher_runs)]
            t, e = r.transfer, r.epochs_to_scratch
            line += [t.n if t else 0, num(t.mean if t else None), num(t.std if t else None), num(r.transfer_delta),
                     num(e.mean if e else None), " ".join(r.run_ids)]
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
    pairs = sorted({(r.student, r.teacher) for r in kd})
    fractions = sorted({r.fraction for r in kd}, reverse=True)
    cols = [c for c in ("final", *STAGES) if any(c in r.delta for r in kd)]
    if any(r.transfer_delta is not None for r in kd):
        cols.append("transfer")
    cols = cols or ["final"]
    grids = {c: np.full((len(pairs), len(fractions)), np.nan) for c in cols}
    for r in kd:
        i, j = pairs.index((r.student, r.teacher)), fractions.index(r.fraction)
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
    component, so a name like ../x or /etc cannot write outside --out."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in experiment).lstrip(".") or "experiment"


def build_report(experiment: str, out_dir: Path) -> Report:
    """Builds the comparison of an experiment's student and fine-tune runs and logs it as a report run.

    Writes `report.md`, `report.csv`, `curves_<dataset>_<student>.png` and `delta_<dataset>.png` into
    `out_dir` and logs them to a new run tagged role=report in the same experiment.

    Raises:
        ReportError: the experiment does not exist.
    """
    from kdhar import tracking

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
    rows = aggregate(students, finetunes, _teacher_accuracy(experiment, students))
    if not rows:
        return Report(experiment, [], f"experiment '{experiment}' has no finished student runs yet; train some with "
                      "`kdhar distill` or `kdhar experiment run experiments/cpu.yaml`, then run the report again.\n")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = format_table(rows)
    md, csv_path = out_dir / "report.md", out_dir / "report.csv"
    md.write_text(f"# Distillation report: {experiment}\n\n" + format_table(rows, markdown=True))
    write_csv(rows, csv_path)
    figures: dict[str, Figure] = {}
    for (dataset, student), group in _by_student(rows).items():
        curves = {(r.fraction, r.teacher): mean_curve([tracking.metric_history(rid, CURVE_METRIC) for rid in r.run_ids])
                  for r in group}
        # "r3d_18 (pcl)" -> curves_ucf101_r3d_18_pcl.png: file names without spaces or brackets
        slug = "".join(c if c.isalnum() or c in "_-." else "_" for c in student).strip("_").replace("__", "_")
        figures[f"curves_{dataset}_{slug}.png"] = curves_figure(student, dataset, curves)
    for dataset in sorted({r.dataset for r in rows}):
        if any(r.teacher != SCRATCH for r in rows if r.dataset == dataset):
            figures[f"delta_{dataset}.png"] = delta_heatmap(rows, dataset)
    files = [md, csv_path]
    for name, fig in figures.items():
        fig.savefig(out_dir / name, dpi=120, bbox_inches="tight")
        plt.close(fig)
        files.append(out_dir / name)

    with tracking.RunTracker(experiment, run_name="report", tags={"role": "report"}) as tracker:
        tracker.log_params({"student_runs": len(students), "finetune_runs": len(finetunes), "rows": len(rows)})
        for path in files:
            tracker.log_artifact(path, "report")
        run_id = tracker.run_id
    return Report(experiment, rows, text, files, run_id)
