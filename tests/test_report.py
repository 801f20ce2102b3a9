"""Report maths against numbers worked out by hand, and the table/CSV/figure writers."""

from __future__ import annotations

import csv
import math

import pytest

from kdhar.report import (
    Row,
    Stat,
    aggregate,
    delta_heatmap,
    format_table,
    mean_curve,
    mean_std,
    one_run_per_seed,
    write_csv,
)


def run(run_id, teacher, seed, final, early=None, mid=None, late=None, student="r3d_18", fraction="0.5",
        status="FINISHED", dataset="ucf101", **metrics):
    m = {"final_test_video_top1": final, **metrics}
    for k, v in (("acc_early", early), ("acc_mid", mid), ("acc_late", late)):
        if v is not None:
            m[k] = v
    tags = {"role": "student", "student_arch": student, "arch": student, "teacher_arch": teacher,
            "fraction": fraction, "seed": str(seed), "dataset": dataset}
    return {"run_id": run_id, "tags": tags, "metrics": m, "params": {}, "status": status}


def finetune_run(run_id, source, acc):
    tags = {"role": "finetune", "source_run": source, "dataset": "hmdb51", "arch": "r3d_18"}
    return {"run_id": run_id, "tags": tags, "metrics": {"final_test_video_top1": acc}, "params": {}, "status": "FINISHED"}


def test_mean_std_is_the_sample_spread():
    s = mean_std([0.5, 0.6, 0.7])
    assert s.n == 3
    assert s.mean == pytest.approx(0.6)
    # deviations -0.1, 0, 0.1 -> sum of squares 0.02 / (3 - 1) = 0.01 -> std 0.1
    assert s.std == pytest.approx(0.1)
    one = mean_std([0.4])
    assert (one.mean, one.n) == (0.4, 1) and math.isnan(one.std)
    assert mean_std([]).n == 0


STUDENTS = [
    # scratch at 0.5: finals 0.50, 0.60, 0.70 ; early 0.2, 0.3, 0.4
    run("s0", "none", 0, 0.50, early=0.2, mid=0.4, late=0.50),
    run("s1", "none", 1, 0.60, early=0.3, mid=0.5, late=0.60),
    run("s2", "none", 2, 0.70, early=0.4, mid=0.6, late=0.70),
    # KD from c3d at 0.5: finals 0.65, 0.75 ; early 0.4, 0.5
    run("k0", "c3d", 0, 0.65, early=0.4, mid=0.6, late=0.65, epochs_to_scratch_acc=3.0),
    run("k1", "c3d", 1, 0.75, early=0.5, mid=0.7, late=0.75, epochs_to_scratch_acc=-1.0),
    # KD at fraction 1.0 has no scratch twin: no delta
    run("k2", "c3d", 0, 0.90, fraction="1.0"),
    # unfinished runs never count
    run("x0", "none", 3, 0.01, status="FAILED"),
]


def test_aggregate_groups_by_student_teacher_fraction_with_deltas():
    rows = aggregate(STUDENTS)
    assert [(r.teacher, r.fraction) for r in rows] == [("none", 0.5), ("c3d", 1.0), ("c3d", 0.5)]
    scratch, kd_full, kd = rows
    assert scratch.seeds == [0, 1, 2]
    assert scratch.acc["final"].mean == pytest.approx(0.6)
    assert scratch.acc["final"].std == pytest.approx(0.1)
    assert scratch.acc["early"].mean == pytest.approx(0.3)
    assert scratch.delta == {}
    # KD: mean 0.70, std sqrt(((-.05)^2 + .05^2) / 1) = 0.0707..., delta 0.70 - 0.60 = 0.10
    assert kd.acc["final"].mean == pytest.approx(0.70)
    assert kd.acc["final"].std == pytest.approx(math.sqrt(0.005))
    assert kd.delta["final"] == pytest.approx(0.10)
    assert kd.delta["early"] == pytest.approx(0.45 - 0.3)
    assert kd.delta["mid"] == pytest.approx(0.65 - 0.5)
    assert kd.delta["late"] == pytest.approx(0.70 - 0.6)
    # only the run that reached the scratch accuracy (-1 = never) gives epochs-to-scratch
    assert (kd.epochs_to_scratch.mean, kd.epochs_to_scratch.n) == (3.0, 1)
    assert kd_full.delta == {} and kd_full.acc["final"].n == 1


def test_repeated_seed_counts_once_with_the_newest_run():
    runs = [run("new", "none", 0, 0.8), run("old", "none", 0, 0.2), run("other", "none", 1, 0.6)]
    assert [r["run_id"] for r in one_run_per_seed(runs)] == ["new", "other"]
    (row,) = aggregate(runs)
    assert row.acc["final"].mean == pytest.approx(0.7)
    assert row.run_ids == ["new", "other"]


def test_transfer_column_joins_finetunes_by_source_run():
    fts = [finetune_run("f0", "s0", 0.30), finetune_run("f1", "s1", 0.40), finetune_run("f2", "k0", 0.45),
           finetune_run("f3", "k1", 0.55)]
    rows = {(r.teacher, r.fraction): r for r in aggregate(STUDENTS, fts)}
    scratch, kd = rows[("none", 0.5)], rows[("c3d", 0.5)]
    assert (scratch.transfer.mean, scratch.transfer.n) == (pytest.approx(0.35), 2)
    assert kd.transfer.mean == pytest.approx(0.50)
    assert kd.transfer_delta == pytest.approx(0.15)
    assert rows[("c3d", 1.0)].transfer is None


def test_table_shows_percent_mean_std_and_signed_delta():
    rows = aggregate(STUDENTS)
    text = format_table(rows)
    assert "Student r3d_18 on ucf101" in text
    scratch_line = next(line for line in text.splitlines() if line.startswith("scratch"))
    assert "60.0 ± 10.0" in scratch_line and scratch_line.split()[2] == "3"
    kd_line = next(line for line in text.splitlines() if line.startswith("c3d") and " 0.5 " in line)
    assert "70.0 ± 7.1" in kd_line and "+10.0" in kd_line and "+15.0" in kd_line
    md = format_table(rows, markdown=True)
    assert "## Student r3d_18 on ucf101" in md and "| scratch | 0.5 | 3 | 60.0 ± 10.0 |" in md


def test_csv_holds_raw_fractions(tmp_path):
    path = tmp_path / "r.csv"
    write_csv(aggregate(STUDENTS), path)
    lines = list(csv.DictReader(path.open()))
    kd = next(r for r in lines if r["teacher"] == "c3d" and r["fraction"] == "0.5")
    assert float(kd["final_mean"]) == pytest.approx(0.7)
    assert float(kd["delta_final"]) == pytest.approx(0.1)
    assert kd["seeds"] == "0 1" and kd["run_ids"] == "k0 k1"
    assert lines[0]["delta_final"] == ""  # scratch row


def test_mean_curve_averages_common_steps():
    assert mean_curve([[(1, 0.2), (2, 0.4), (3, 0.9)], [(1, 0.4), (2, 0.6)]]) == [
        (1, pytest.approx(0.3)), (2, pytest.approx(0.5))]
    assert mean_curve([]) == []


def test_delta_heatmap_places_each_pair_and_fraction(tmp_path):
    rows = aggregate(STUDENTS + [run("c0", "r3d_18", 0, 0.4, student="c3d"), run("c1", "none", 0, 0.5, student="c3d")])
    fig = delta_heatmap(rows, "ucf101")
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["c3d <- r3d_18", "r3d_18 <- c3d"]
    annotated = sorted(t.get_text() for t in ax.texts)
    assert annotated == ["+10.0", "-10.0"]
    fig.savefig(tmp_path / "h.png")
    assert (tmp_path / "h.png").stat().st_size > 0


def test_row_without_stage_metrics_prints_dashes():
    row = Row("ucf101", "c3d", "none", 1.0, [0], ["a"], {"final": Stat(0.5, math.nan, 1)})
    line = format_table([row]).splitlines()[3]
    assert line.split()[:4] == ["scratch", "1", "1", "50.0"] and line.split().count("-") >= 6
