"""Report maths against numbers worked out by hand, and the table/CSV/figure writers."""

from __future__ import annotations

import csv
import math

import pytest

from kdhar import report
from kdhar.report import (
    Paired,
    Row,
    Stat,
    aggregate,
    delta_heatmap,
    format_table,
    mean_curve,
    mean_std,
    one_run_per_seed,
    paired_interval,
    verdict,
    write_csv,
)


def run(run_id, teacher, seed, final, early=None, mid=None, late=None, student="r3d_18", fraction="0.5",
        status="FINISHED", dataset="ucf101", tags=None, **metrics):
    m = {"final_test_video_top1": final, **metrics}
    for k, v in (("acc_early", early), ("acc_mid", mid), ("acc_late", late)):
        if v is not None:
            m[k] = v
    all_tags = {"role": "student", "student_arch": student, "arch": student, "teacher_arch": teacher,
                "fraction": fraction, "seed": str(seed), "dataset": dataset, **(tags or {})}
    return {"run_id": run_id, "tags": all_tags, "metrics": m, "params": {}, "status": status}


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
    assert (kd_full.paired, kd_full.verdict) == (None, "no scratch runs")
    assert (scratch.paired, scratch.verdict) == (None, "")
    # Paired over seeds 0 and 1 only (scratch seed 2 has no KD twin): d = 0.65 - 0.50, 0.75 - 0.60 = 0.15,
    # 0.15, so 0.15 and not the 0.10 difference of means, which includes the unpaired scratch 0.70.
    assert kd.paired.n == 2 and kd.paired.mean == pytest.approx(0.15)


# t quantiles from a printed table, not from scipy: t(0.975, 1) = 12.7062, t(0.975, 2) = 4.3027.
T_1, T_2 = 12.7062, 4.3027


def test_pcl_students_get_rows_of_their_own_with_running_max_stages():
    pcl = {"ssl": "pcl"}
    runs = [
        run("a", "none", 0, 0.40, early=0.20, late=0.40),
        run("b", "c3d", 0, 0.50, early=0.30, late=0.50),
        run("p", "none", 0, 0.30, early=0.10, late=0.30, tags=pcl, best_acc_early=0.25, best_acc_late=0.45),
        run("q", "c3d", 0, 0.35, early=0.20, late=0.35, tags=pcl, best_acc_early=0.30, best_acc_late=0.50),
    ]
    rows = {(r.student, r.teacher): r for r in aggregate(runs)}
    assert set(rows) == {("r3d_18", "none"), ("r3d_18", "c3d"), ("r3d_18 (pcl)", "none"), ("r3d_18 (pcl)", "c3d")}
    # Each KD row is compared with the scratch row of its own regime.
    assert rows[("r3d_18", "c3d")].delta["final"] == pytest.approx(0.10)
    assert rows[("r3d_18 (pcl)", "c3d")].delta["final"] == pytest.approx(0.05)
    # PCL stages are the best accuracy reached so far (the paper's reading), supervised ones the value then.
    assert rows[("r3d_18 (pcl)", "none")].acc["early"].mean == pytest.approx(0.25)
    assert rows[("r3d_18 (pcl)", "c3d")].delta["late"] == pytest.approx(0.05)
    assert rows[("r3d_18", "none")].acc["early"].mean == pytest.approx(0.20)


def test_paired_interval_by_hand():
    kd = [run("k0", "c3d", 0, 0.60), run("k1", "c3d", 1, 0.72), run("k2", "c3d", 2, 0.84),
          run("k3", "c3d", 3, 0.99)]  # seed 3 has no scratch twin
    scratch = [run("s0", "none", 0, 0.50), run("s1", "none", 1, 0.60), run("s2", "none", 2, 0.70),
               run("s4", "none", 4, 0.01)]  # seed 4 has no KD twin
    # d = 0.10, 0.12, 0.14 over seeds 0-2; mean 0.12; deviations -0.02, 0, 0.02 -> sum of squares 0.0008
    # / 2 = 0.0004 -> sd 0.02; half width 4.3027 * 0.02 / sqrt(3) = 0.049683 -> [0.070317, 0.169683]
    p = paired_interval(kd, scratch, "final_test_video_top1")
    assert p.n == 3
    assert p.mean == pytest.approx(0.12)
    assert (p.low, p.high) == (pytest.approx(0.070317, abs=1e-5), pytest.approx(0.169683, abs=1e-5))
    assert 0.12 - p.low == pytest.approx(T_2 * 0.02 / math.sqrt(3), abs=1e-5)
    # Swapped, every difference changes sign: -0.12 [-0.169683, -0.070317].
    q = paired_interval(scratch, kd)
    assert (q.mean, q.low, q.high) == (pytest.approx(-0.12), pytest.approx(-p.high), pytest.approx(-p.low))
    # Two pairs, d = 0.10, 0.20: mean 0.15, sd sqrt((0.05^2 + 0.05^2) / 1) = 0.070711, se 0.070711 / sqrt(2)
    # = 0.05; with one degree of freedom the half width is 12.7062 * 0.05 = 0.63531 -> [-0.48531, 0.78531]
    two = paired_interval([run("a", "c3d", 0, 0.6), run("b", "c3d", 1, 0.8)],
                          [run("c", "none", 0, 0.5), run("d", "none", 1, 0.6)])
    assert (two.n, two.mean) == (2, pytest.approx(0.15))
    assert (two.low, two.high) == (pytest.approx(0.15 - T_1 * 0.05, abs=1e-4), pytest.approx(0.15 + T_1 * 0.05, abs=1e-4))


def test_paired_interval_pairs_only_shared_seeds_and_the_first_run_of_a_seed():
    # Seed 1 is in the KD list only and seed 2 in the scratch list only: one pair, seed 0 (0.7 - 0.5).
    one = paired_interval([run("k0", "c3d", 0, 0.7), run("k1", "c3d", 1, 0.9)],
                          [run("s0", "none", 0, 0.5), run("s2", "none", 2, 0.1)])
    assert (one.n, one.mean) == (1, pytest.approx(0.2))
    assert math.isnan(one.low) and math.isnan(one.high)
    assert paired_interval([run("k1", "c3d", 1, 0.9)], [run("s2", "none", 2, 0.1)]) is None
    # The newest run of a repeated seed counts (find_runs lists newest first): 0.7 - 0.5, not 0.1 - 0.5.
    newest = paired_interval([run("new", "c3d", 0, 0.7), run("old", "c3d", 0, 0.1)], [run("s0", "none", 0, 0.5)])
    assert newest.mean == pytest.approx(0.2)


@pytest.mark.parametrize(("paired", "expected"), [
    (Paired(0.12, 0.07, 0.17, 3), "helps"),
    (Paired(-0.12, -0.17, -0.07, 3), "hurts"),
    (Paired(0.03, -0.02, 0.08, 3), "no evidence"),
    (Paired(0.05, 0.0, 0.10, 3), "no evidence"),  # touching 0 is not above 0
    (Paired(0.2, math.nan, math.nan, 1), "no evidence (n=1)"),
    (None, "no paired seeds"),
])
def test_verdict_reads_the_interval(paired, expected):
    assert verdict(paired) == expected


def test_aggregate_gives_each_kd_row_its_interval_and_verdict():
    scratch = [run(f"s{i}", "none", i, v) for i, v in enumerate((0.50, 0.60, 0.70))]
    helps = [run(f"h{i}", "c3d", i, v) for i, v in enumerate((0.60, 0.72, 0.84))]  # d 0.10, 0.12, 0.14
    flat = [run(f"f{i}", "x3d", i, v) for i, v in enumerate((0.51, 0.63, 0.75))]  # d 0.01, 0.03, 0.05
    rows = {r.teacher: r for r in aggregate(scratch + helps + flat)}
    assert rows["c3d"].verdict == "helps"
    assert rows["c3d"].paired.low == pytest.approx(0.070317, abs=1e-5)
    # d 0.01, 0.03, 0.05: mean 0.03, sd 0.02, half width 0.049683 -> [-0.019683, 0.079683] contains 0
    assert rows["x3d"].verdict == "no evidence"
    assert rows["x3d"].paired.low == pytest.approx(-0.019683, abs=1e-5)
    text = format_table(list(rows.values()))
    c3d_line = next(line for line in text.splitlines() if line.startswith("c3d"))
    assert "+12.0 [+7.0, +17.0]" in c3d_line and c3d_line.split()[-9] == "helps"  # 8 columns follow
    assert "paired by seed" in text and "helps when" in text
    md = format_table(list(rows.values()), markdown=True)
    assert "| +3.0 [-2.0, +8.0] | no evidence |" in md


def test_collapsed_runs_are_counted_and_stay_in_the_mean(tmp_path):
    runs = [
        run("s0", "none", 0, 0.5), run("s1", "none", 1, 0.6),
        # collapsed by its tag, by its metric, and not at all (tag "false", metric 0.0)
        run("k0", "c3d", 0, 0.02, tags={"collapsed": "true"}, collapsed=1.0),
        run("k1", "c3d", 1, 0.03, collapsed=1.0),
        run("k2", "c3d", 2, 0.80, tags={"collapsed": "false"}, collapsed=0.0),
    ]
    scratch, kd = aggregate(runs)
    assert (scratch.collapsed, kd.collapsed) == (0, 2)
    # (0.02 + 0.03 + 0.80) / 3 = 0.283333: collapsed runs are real outcomes, not dropped
    assert kd.acc["final"].mean == pytest.approx(0.85 / 3)
    kd_line = next(line for line in format_table([scratch, kd]).splitlines() if line.startswith("c3d"))
    # std: deviations -0.263, -0.253, 0.517 -> squares sum 0.4005 / 2 = 0.2002 -> 0.447; 2 of 3 collapsed
    assert kd_line.split()[3:7] == ["28.3", "±", "44.7", "2/3"]
    path = tmp_path / "r.csv"
    write_csv([scratch, kd], path)
    lines = list(csv.DictReader(path.open()))
    assert [r["collapsed"] for r in lines] == ["0", "2"]


def test_mismatched_views_refuse_the_comparison(tmp_path):
    # scratch runs without the tag are older fresh-view runs ("0"); the KD runs replay 4 cached views
    scratch = [run("s0", "none", 0, 0.5), run("s1", "none", 1, 0.6, tags={"views": "0"})]
    cached = [run("k0", "c3d", 0, 0.7, early=0.3, tags={"views": "4"}),
              run("k1", "c3d", 1, 0.8, early=0.4, tags={"views": "4"})]
    fts = [finetune_run("f0", "s0", 0.3), finetune_run("f1", "k0", 0.5)]
    _, kd = aggregate(scratch + cached, fts)
    assert kd.delta == {} and kd.transfer_delta is None and kd.paired is None
    assert kd.verdict == "mismatched views (kd 4 vs scratch 0)"
    text = format_table(aggregate(scratch + cached, fts))
    assert "mismatched views (kd 4 vs scratch 0)" in text
    path = tmp_path / "r.csv"
    write_csv([kd], path)
    (line,) = csv.DictReader(path.open())
    assert (line["delta_final"], line["delta_final_low"], line["pairs"], line["views"]) == ("", "", "0", "4")
    # KD runs that mix view counts are not one condition either
    mixed = [run("k0", "c3d", 0, 0.7), run("k1", "c3d", 1, 0.8, tags={"views": "4"})]
    assert aggregate(scratch + mixed)[1].verdict == "mismatched views (kd 0,4 vs scratch 0)"
    # the same cached views on both sides compare as usual
    same = [{**r, "tags": {**r["tags"], "views": "4"}} for r in scratch] + cached
    assert aggregate(same)[1].delta["final"] == pytest.approx(0.2)


def test_teacher_runs_and_their_accuracy_label_the_row():
    runs = [run("s0", "none", 0, 0.5),
            run("k0", "c3d", 0, 0.7, tags={"teacher_run_id": "t1"}),
            run("k1", "c3d", 1, 0.8, tags={"teacher_run_id": "t1"})]
    plain = aggregate(runs)[1]
    assert plain.teacher_runs == ["t1"] and plain.teacher_acc == {}
    assert format_table([plain]).splitlines()[3].startswith("c3d  ")
    labelled = aggregate(runs, teacher_acc={"t1": 0.839, "other": 0.5})[1]
    assert labelled.teacher_acc == {"t1": 0.839}
    assert format_table([labelled]).splitlines()[3].startswith("c3d (83.9 %)")
    # two teacher runs in one row, one of unknown accuracy: both shown, never merged into one number
    runs[2]["tags"]["teacher_run_id"] = "t2"
    assert format_table(aggregate(runs, teacher_acc={"t1": 0.839})[1:]).splitlines()[3].startswith("c3d (83.9 %, ?)")


def test_teacher_accuracy_is_read_for_the_named_teacher_runs_only(local_tracking):
    from mlflow import MlflowClient

    client = MlflowClient(local_tracking)
    exp = client.create_experiment("exp")
    ids = {}
    for name, acc in (("t1", 0.839), ("t9", 0.5), ("t2", None)):  # t2 failed before its test
        r = client.create_run(exp, tags={"role": "teacher"})
        if acc is not None:
            client.log_metric(r.info.run_id, "final_test_video_top1", acc)
        ids[name] = r.info.run_id
    students = [run("k0", "c3d", 0, 0.7, tags={"teacher_run_id": ids["t1"]}), run("k1", "c3d", 1, 0.7,
                tags={"teacher_run_id": ids["t2"]}), run("s0", "none", 0, 0.5)]
    assert report._teacher_accuracy("exp", students) == {ids["t1"]: pytest.approx(0.839)}
    assert report._teacher_accuracy("exp", students[2:]) == {}  # no teacher named: nothing to show


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
    assert "## Student r3d_18 on ucf101" in md and "| scratch | 0.5 | 3 | 60.0 ± 10.0 | 0/3 |" in md
    assert "| final | collapsed | Δ final | Δ final 95 % CI | verdict |" in md


def test_csv_holds_raw_fractions(tmp_path):
    path = tmp_path / "r.csv"
    write_csv(aggregate(STUDENTS), path)
    lines = list(csv.DictReader(path.open()))
    kd = next(r for r in lines if r["teacher"] == "c3d" and r["fraction"] == "0.5")
    assert float(kd["final_mean"]) == pytest.approx(0.7)
    assert float(kd["delta_final"]) == pytest.approx(0.1)
    assert kd["seeds"] == "0 1" and kd["run_ids"] == "k0 k1"
    # paired over seeds 0 and 1: d = 0.15, 0.15, no spread -> [0.15, 0.15]
    assert float(kd["delta_final_paired"]) == pytest.approx(0.15)
    assert float(kd["delta_final_low"]) == pytest.approx(0.15) == float(kd["delta_final_high"])
    assert (kd["pairs"], kd["verdict"], kd["collapsed"], kd["views"]) == ("2", "helps", "0", "0")
    assert lines[0]["delta_final"] == "" and lines[0]["verdict"] == ""  # scratch row


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


@pytest.mark.parametrize("name, folder", [("kdhar-cpu", "kdhar-cpu"), ("../evil", "_evil"), ("/etc/x", "_etc_x"),
                                          ("..", "experiment"), ("a b", "a_b")])
def test_report_folder_stays_inside_out(name, folder):
    from kdhar.report import report_folder

    assert report_folder(name) == folder
