"""The detection table of `kdhar report`: temporal detection students (`task=detection`) by method,
compared with their scratch twins seed by seed, as the recognition tables compare KD with scratch.

Rows are (dataset, student, method, teacher run, fraction): the teacher runs the students name,
scratch, scratch + attention (GKD's attention module and CVAEs, no teacher), score KD (KL of the
per-step class scores) and GKD. Each shows mean ± sd over seeds of the test mAP averaged over tIoU
0.3-0.7 under THUMOS14's toolkit (`map_avg`), at tIoU 0.5, averaged over 0.1-0.5 as GKD's code reads
it (`gkd_map_avg`), and at 25 % and 75 % of the epochs. Every method is compared with plain scratch,
and GKD also with scratch + attention (what the teacher adds to the attention module), on both
readings (`map_avg` and `gkd_map_avg`): per-seed differences, a t-interval, the sign-flip p, Holm
over every comparison of the table, TOST against the margin, a verdict, and the seeds the margin
calls for (`kdhar.stats`). Pure functions of run dicts (run_id, tags, metrics); no torch.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdhar import stats
from kdhar.stats import PairedTest

# Method tag -> the row's label (teacher-less rows) or its prefix before the teacher.
METHODS = {"det-teacher": "teacher", "det-supervised": "scratch", "det-attention": "scratch + attention",
           "det-kd-logit": "score KD", "det-gkd": "GKD"}
ORDER = list(METHODS)
COLUMNS = {"map_avg": "final_test_map_avg", "map@0.5": "final_test_map_0.5", "gkd_map_avg": "final_test_gkd_map_avg",
           "early": "map_early", "mid": "map_mid"}
# The readings every comparison is made on: THUMOS14's toolkit at tIoU 0.3-0.7 and GKD's code at 0.1-0.5.
READINGS = {"map_avg": "final_test_map_avg", "gkd_map_avg": "final_test_gkd_map_avg"}
# Which row each method is compared with, in order: plain scratch always, GKD also its attention twin.
BASELINES = {"det-attention": ("det-supervised",), "det-kd-logit": ("det-supervised",),
             "det-gkd": ("det-supervised", "det-attention")}


@dataclass
class DetRow:
    """One (dataset, student, method, teacher run, fraction) cell over its seeds."""

    dataset: str
    student: str
    method: str
    fraction: float
    teacher: str  # teacher architecture, "none" for teacher-less rows
    teacher_run: str
    runs: dict[int, dict[str, float]]  # seed -> metrics
    collapsed: int = 0
    tests: dict[tuple[str, str], PairedTest] = field(default_factory=dict)  # (baseline method, reading) -> test

    @property
    def label(self) -> str:
        name = METHODS.get(self.method, self.method)
        if self.method == "det-teacher":
            return f"{name} {self.teacher} ({self.teacher_run[:8]})"
        return name if self.teacher == "none" else f"{name} <- {self.teacher} ({self.teacher_run[:8]})"

    def stat(self, metric: str) -> tuple[float, float, int]:
        """Mean, sample sd (NaN below 2) and count of `metric` over the row's seeds."""
        values = [m[metric] for m in self.runs.values() if metric in m]
        if not values:
            return math.nan, math.nan, 0
        mean = sum(values) / len(values)
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else math.nan
        return mean, sd, len(values)


def detection_rows(runs: Sequence[dict[str, Any]], margin: float,
                   teachers: Sequence[dict[str, Any]] = ()) -> list[DetRow]:
    """Rows of FINISHED detection student runs (newest first: a repeated seed counts once, its
    latest run), each compared with its baselines; one Holm family over all comparisons. Each of
    `teachers` (teacher run dicts) that a row's students name gets a row of its own in their table,
    so that a reader sees what the students were taught by."""
    grouped: dict[tuple, DetRow] = {}
    for run in runs:
        tags = run["tags"]
        if run.get("status", "FINISHED") != "FINISHED" or tags.get("task") != "detection":
            continue
        teacher = tags.get("teacher_arch", "none")
        key = (tags.get("dataset", "?"), tags.get("student_arch") or tags.get("arch", "?"), tags.get("method", "?"),
               float(tags.get("fraction", "1.0")), teacher, tags.get("teacher_run_id", "") if teacher != "none" else "")
        row = grouped.setdefault(key, DetRow(*key, runs={}))
        seed = _seed(tags)
        if seed not in row.runs:
            row.runs[seed] = run["metrics"]
            row.collapsed += _collapsed(tags)
    named = {r.teacher_run: r for r in grouped.values() if r.teacher_run}
    for t in teachers:
        if t["run_id"] in named and t["tags"].get("task") == "detection":
            student = named[t["run_id"]]
            key = (student.dataset, student.student, "det-teacher", student.fraction, t["tags"].get("arch", "?"),
                   t["run_id"])
            grouped[key] = DetRow(*key, runs={_seed(t["tags"]): t["metrics"]}, collapsed=_collapsed(t["tags"]))
    rows = sorted(grouped.values(), key=lambda r: (r.dataset, r.student, -r.fraction,
                                                   ORDER.index(r.method) if r.method in ORDER else 99, r.teacher_run))
    _compare(rows, margin)
    return rows


def _seed(tags: dict[str, str]) -> int:
    return int(float(tags.get("seed", 0)))


def _collapsed(tags: dict[str, str]) -> int:
    return int(tags.get("collapsed", "").lower() == "true")


def _compare(rows: list[DetRow], margin: float) -> None:
    """Each row against its baselines' rows (same dataset, student and fraction), paired by seed,
    on each reading."""
    members = []
    for row in rows:
        for base in BASELINES.get(row.method, ()):
            twin = next((r for r in rows if r.method == base and (r.dataset, r.student, r.fraction)
                         == (row.dataset, row.student, row.fraction)), None)
            if twin is None:
                continue
            for reading, metric in READINGS.items():
                seeds = sorted(s for s in row.runs.keys() & twin.runs.keys()
                               if metric in row.runs[s] and metric in twin.runs[s])
                if seeds:
                    diffs = [row.runs[s][metric] - twin.runs[s][metric] for s in seeds]
                    row.tests[(base, reading)] = stats.compare(diffs, margin)
                    members.append((row, (base, reading)))
    for (row, key), test in zip(members, stats.adjust([row.tests[k] for row, k in members])):
        row.tests[key] = test


def _pct(mean: float, sd: float) -> str:
    if math.isnan(mean):
        return "-"
    return f"{100 * mean:.1f}" if math.isnan(sd) else f"{100 * mean:.1f} ± {100 * sd:.1f}"


def _signed(v: float) -> str:
    return "-" if math.isnan(v) else f"{round(100 * v, 1) + 0.0:+.1f}"


def _p(p: float) -> str:
    return "-" if math.isnan(p) else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")


def _render(title: str, headers: list[str], body: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = [f"## {title}", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in body])
    widths = [max(len(h), *(len(c[i]) for c in body)) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([title, fmt.format(*headers), "  ".join("-" * w for w in widths)] + [fmt.format(*c) for c in body])


def format_detection(rows: Sequence[DetRow], margin: float, markdown: bool = False) -> str:
    """Per (dataset, student): the mAP table, then the paired comparisons and a note on the columns."""
    parts = []
    groups: dict[tuple[str, str], list[DetRow]] = defaultdict(list)
    for r in rows:
        groups[(r.dataset, r.student)].append(r)
    m = f"{100 * margin:g}"
    for (dataset, student), group in groups.items():
        body = [[r.label, f"{r.fraction:g}", str(len(r.runs)), f"{r.collapsed}/{len(r.runs)}",
                 *(_pct(*r.stat(metric)[:2]) for metric in COLUMNS.values())] for r in group]
        parts.append(_render(f"Detection: student {student} on {dataset} (test mAP, %)",
                             ["method", "fraction", "n", "collapsed", *COLUMNS], body, markdown))
        tests = [[r.label, f"{r.fraction:g}", METHODS.get(base, base), reading, str(t.n),
                  f"{_signed(t.mean)} [{_signed(t.low)}, {_signed(t.high)}]" if t.n > 1 else _signed(t.mean),
                  _p(t.p_perm), _p(t.p_holm), _p(t.p_tost_holm), t.verdict or "-",
                  "-" if t.seeds_for_margin is None else str(t.seeds_for_margin)]
                 for r in group for (base, reading), t in r.tests.items()]
        if tests:
            parts.append(_render(f"Detection, paired by seed: test mAP minus the baseline's, student {student} on {dataset}",
                                 ["method", "fraction", "baseline", "reading", "pairs", "Δ mAP [95 % CI]", "p sign-flip",
                                  "p Holm", f"TOST ±{m} Holm", "verdict", f"seeds for ±{m}"], tests, markdown))
    parts.append(
        "mAP: test mAP in %, mean ± sd over n seeds. map_avg: THUMOS14's toolkit averaged over tIoU 0.3-0.7; "
        "map@0.5: at tIoU 0.5; gkd_map_avg: the ActivityNet code GKD's eval.py uses, averaged over tIoU 0.1-0.5; "
        "early/mid: map_avg after 25/75 % of the epochs. teacher: the teacher run the rows below it name (its own "
        "seed). scratch + attention: GKD's attention module and CVAEs without a teacher; score KD: KL of the per-step "
        "class scores to the teacher's. Every method is compared with plain scratch and GKD also with scratch + "
        "attention, seed by seed on both readings (map_avg and gkd_map_avg); Holm runs over every comparison "
        f"of this table, both readings; TOST: equivalence within ±{m} points; verdict: helps / hurts when p Holm < 0.05, "
        "equivalent when TOST Holm < 0.05, else inconclusive. The detector is kdhar's anchor-free 1-D head on "
        "two taps of a registry trunk, not AFSD: these numbers are not comparable with the GKD paper's.")
    return "\n\n".join(parts) + "\n"


def write_detection_csv(rows: Sequence[DetRow], path: Path) -> None:
    """One line per row and baseline comparison (mAPs as fractions in [0, 1])."""
    header = ["dataset", "student", "method", "teacher", "teacher_run", "fraction", "n", "seeds", "collapsed"]
    for name in COLUMNS:
        header += [f"{name}_mean", f"{name}_sd"]
    header += ["baseline", "reading", "pairs", "delta_map", "delta_low", "delta_high", "p_perm", "p_holm", "p_tost_holm",
               "verdict", "seeds_for_margin"]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            own = [r.dataset, r.student, r.method, r.teacher, r.teacher_run, f"{r.fraction:g}", len(r.runs),
                   " ".join(map(str, sorted(r.runs))), r.collapsed]
            for metric in COLUMNS.values():
                mean, sd, _ = r.stat(metric)
                own += [_num(mean), _num(sd)]
            for (base, reading), t in (r.tests.items() or [(("", ""), None)]):
                tail = ([base, reading, t.n, _num(t.mean), _num(t.low), _num(t.high), _num(t.p_perm), _num(t.p_holm),
                         _num(t.p_tost_holm), t.verdict, t.seeds_for_margin or ""] if t else [""] * 11)
                w.writerow(own + tail)


def _num(v: float | None) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.6g}"
