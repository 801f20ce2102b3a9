"""Report maths against numbers worked out by hand, the table/CSV/figure writers, and a whole report
built from runs in a real MLflow store."""

from __future__ import annotations

import csv
import math

import pytest

from kdhar import report
from kdhar.report import (
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
from kdhar.stats import compare


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
    assert (kd_full.tests, kd_full.verdict) == ({}, "no scratch runs")
    assert (scratch.tests, scratch.verdict) == ({}, "")
    # Paired over seeds 0 and 1 only (scratch seed 2 has no KD twin): d = 0.65 - 0.50, 0.75 - 0.60 = 0.15,
    # 0.15, so 0.15 and not the 0.10 difference of means, which includes the unpaired scratch 0.70.
    assert kd.tests["last"].n == 2 and kd.tests["last"].mean == pytest.approx(0.15)
    assert "best" not in kd.tests  # these runs log no best-so-far accuracy


# t quantiles from a printed table, not from scipy: t(0.975, 1) = 12.7062, t(0.975, 2) = 4.3027.
T_1, T_2 = 12.7062, 4.3027


def test_pcl_students_get_rows_of_their_own_and_both_readings_of_their_stages():
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
    # Every stage in both readings: the value at that epoch, and the best reached so far (the paper's).
    assert rows[("r3d_18 (pcl)", "none")].acc["early"].mean == pytest.approx(0.10)
    assert rows[("r3d_18 (pcl)", "none")].best["early"].mean == pytest.approx(0.25)
    assert rows[("r3d_18 (pcl)", "c3d")].delta["late"] == pytest.approx(0.05)
    assert rows[("r3d_18 (pcl)", "c3d")].best_delta["late"] == pytest.approx(0.05)
    assert rows[("r3d_18 (pcl)", "c3d")].best_delta["final"] == pytest.approx(0.05)  # best of the run = best late
    assert rows[("r3d_18", "none")].acc["early"].mean == pytest.approx(0.20) and rows[("r3d_18", "none")].best == {}


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


@pytest.mark.parametrize(("diffs", "expected"), [
    ([0.10, 0.12, 0.14, 0.11, 0.13, 0.12, 0.10], "helps"),  # 7 of 7 positive: sign-flip p = 2/128 = 0.016
    ([-0.10, -0.12, -0.14, -0.11, -0.13, -0.12, -0.10], "hurts"),
    ([0.10, 0.12, 0.14], "inconclusive"),  # 3 pairs: p = 0.25 at best, and 0.12 is outside ±5 points
    ([0.01, -0.01, 0.0, 0.01], "equivalent"),  # centred on 0, sd 0.0096: well within ±5 points
    ([0.2], "inconclusive"),
])
def test_verdict_of_one_comparison(diffs, expected):
    assert verdict(compare(diffs, 0.05)) == expected
    assert verdict(None) == "no paired seeds"


# Ten seeds of scratch and four KD rows whose differences are worked out by hand; every run also logs
# its best-so-far final accuracy (2 points above its last), so both readings give the same differences.
SCRATCH_10 = [0.50 + 0.02 * i for i in range(10)]
JITTER = [0.01 * (-1) ** i for i in range(10)]  # +0.01, -0.01, ...: mean 0, sd sqrt(10·0.0001/9) = 0.010541


def ten_seeds(teacher, shift, jitter=JITTER):
    scratch_or_kd = SCRATCH_10 if teacher == "none" else [s + shift + j for s, j in zip(SCRATCH_10, jitter)]
    return [run(f"{teacher}{i}", teacher, i, v, best_acc_late=v + 0.02) for i, v in enumerate(scratch_or_kd)]


def test_aggregate_tests_every_kd_row_in_one_holm_family():
    runs = (ten_seeds("none", 0) + ten_seeds("c3d", 0.12) + ten_seeds("r3d_18", -0.10) + ten_seeds("x3d", 0.0)
            + ten_seeds("r2plus1d_18", 0.03, jitter=[0.2 * (-1) ** i for i in range(10)]))
    rows = {r.teacher: r for r in aggregate(runs)}
    helps, hurts, flat, noisy = rows["c3d"], rows["r3d_18"], rows["x3d"], rows["r2plus1d_18"]
    for row in (helps, hurts, flat, noisy):
        assert set(row.tests) == {"last", "best"} and row.tests["best"].mean == pytest.approx(row.tests["last"].mean)
    t = helps.tests["last"]
    # d = 0.12 ± 0.01: sd 0.010541, se 0.0033333, t(0.975, 9) = 2.2622 -> half width 0.0075407
    assert (t.n, t.mean, t.sd) == (10, pytest.approx(0.12), pytest.approx(0.010541, abs=1e-6))
    assert (t.low, t.high) == (pytest.approx(0.12 - 0.0075407, abs=1e-6), pytest.approx(0.12 + 0.0075407, abs=1e-6))
    # All 10 positive: exact sign-flip p = 2/1024. Family of 8 (4 rows, 2 readings); the four such
    # p-values come first in Holm's order: 8, 7, 6, 5 times 2/1024 -> running max 8·2/1024 = 0.015625.
    assert (t.p_perm, t.perm_method) == (pytest.approx(2 / 1024), "exact")
    assert t.p_holm == pytest.approx(8 * 2 / 1024)
    assert hurts.tests["best"].p_holm == pytest.approx(8 * 2 / 1024)
    # sd 0.010541 and margin 0.05: 2 pairs give 12.706·0.010541/√2 = 0.0947, 3 pairs 4.303·0.010541/√3 = 0.0262
    assert t.seeds_for_margin == 3
    assert [r.tests[reading].verdict for r in (helps, hurts, flat, noisy) for reading in ("last", "best")] == [
        "helps", "helps", "hurts", "hurts", "equivalent", "equivalent", "inconclusive", "inconclusive"]
    assert [r.verdict for r in (helps, hurts, flat, noisy)] == ["helps", "hurts", "equivalent", "inconclusive"]
    # Flat: Σd = 0, so every sign assignment is as extreme (p = 1); TOST: t = (0 ± 0.05)/0.0033333 = ±15.0
    assert flat.tests["last"].p_perm == pytest.approx(1.0) and flat.tests["last"].p_tost < 1e-6
    # The same three helps/hurts/equivalent rows with only 3 seeds cannot decide anything.
    few = [r for r in runs if _seed_of(r) < 3]
    assert {r.verdict for r in aggregate(few) if r.teacher != "none"} == {"inconclusive"}

    text = format_table(list(rows.values()))
    line = next(line for line in text.splitlines() if line.startswith("c3d") and "[" in line)
    assert "+12.0 [+11.2, +12.8]" in line and "0.002" in line and "0.016" in line and "helps" in line
    assert line.split()[-1] == "3"  # seeds for ±5
    assert "KD - scratch, paired by seed: student r3d_18 on ucf101" in text
    assert ("Verdicts (8 KD-vs-scratch tests in one Holm family, margin ±5 points): last epoch: 1 helps, 1 hurts, "
            "1 equivalent, 1 inconclusive; best so far: 1 helps, 1 hurts, 1 equivalent, 1 inconclusive.") in text
    assert "Holm's step-down correction over the family of every KD-vs-scratch test in this report" in text
    md = format_table(list(rows.values()), markdown=True)
    assert ("| teacher | fraction | reading | pairs | Δ final [95 % CI] | p sign-flip | p Holm | p TOST ±5 | TOST Holm "
            "| verdict | seeds for ±5 |") in md
    assert "| c3d | 0.5 | last | 10 | +12.0 [+11.2, +12.8] | 0.002 | 0.016 |" in md
    assert "|  |  | best | 10 | +12.0 [+11.2, +12.8] | 0.002 | 0.016 |" in md
    # A wider margin changes the equivalence test and the seeds needed, nothing else.
    wide = {r.teacher: r for r in aggregate(runs, margin=0.15)}
    assert wide["c3d"].verdict == "helps" and wide["r2plus1d_18"].tests["last"].seeds_for_margin < 20
    assert "margin ±15 points" in format_table(list(wide.values()))


def _seed_of(run_dict):
    return int(run_dict["tags"]["seed"])


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
    assert kd_line.split()[3:8] == ["2/3", "last", "28.3", "±", "44.7"]
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
    assert kd.delta == {} and kd.transfer_delta is None and kd.tests == {}
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


def test_each_teacher_run_is_a_row_of_its_own_labelled_with_its_accuracy():
    runs = [run("s0", "none", 0, 0.5), run("s1", "none", 1, 0.6),
            run("k0", "c3d", 0, 0.7, tags={"teacher_run_id": "t1aaaaaaaaaa"}),
            run("k1", "c3d", 1, 0.8, tags={"teacher_run_id": "t1aaaaaaaaaa"})]
    plain = aggregate(runs)[1]
    assert (plain.teacher_run, plain.teacher_acc) == ("t1aaaaaaaaaa", None)
    assert format_table([plain]).splitlines()[3].startswith("c3d (t1aaaaaa, ?)  ")
    labelled = aggregate(runs, teacher_acc={"t1aaaaaaaaaa": 0.839, "other": 0.5})[1]
    assert labelled.teacher_acc == pytest.approx(0.839)
    assert format_table([labelled]).splitlines()[3].startswith("c3d (t1aaaaaa, 83.9 %)")
    # Two teacher runs of one recipe: two rows, each compared with the same scratch twin, never merged.
    runs[3]["tags"]["teacher_run_id"] = "t2bbbbbbbbbb"
    runs.append(run("k2", "c3d", 0, 0.4, tags={"teacher_run_id": "t2bbbbbbbbbb"}))
    scratch, first, second = aggregate(runs, teacher_acc={"t1aaaaaaaaaa": 0.839})
    assert (first.teacher_run, first.run_ids, first.teacher_acc) == ("t1aaaaaaaaaa", ["k0"], pytest.approx(0.839))
    assert (second.teacher_run, second.run_ids, second.teacher_acc) == ("t2bbbbbbbbbb", ["k1", "k2"], None)
    assert first.delta["final"] == pytest.approx(0.7 - 0.55) and second.delta["final"] == pytest.approx(0.6 - 0.55)
    # paired: t1 over seed 0 (0.7 - 0.5); t2 over seeds 0 and 1 (0.4 - 0.5, 0.8 - 0.6)
    assert (first.tests["last"].n, first.tests["last"].mean) == (1, pytest.approx(0.2))
    assert (second.tests["last"].n, second.tests["last"].mean) == (2, pytest.approx(0.05))
    text = format_table([scratch, first, second])
    assert "c3d (t1aaaaaa, 83.9 %)" in text and "c3d (t2bbbbbb, ?)" in text
    # A grid's teacher runs are labelled with the grid's name for them (two recipes of one architecture).
    for r in runs[2:]:
        r["tags"]["grid_teacher"] = "c3d-res-s1" if r["tags"]["teacher_run_id"] == "t2bbbbbbbbbb" else "c3d-rgb-s0"
    for r in runs[2:]:
        r["params"]["kd.weighting"] = "sum" if report.KDConfig.weighting != "sum" else "mix"
    labels = [report._teacher_label(r) for r in aggregate(runs)[1:]]
    mark = runs[2]["params"]["kd.weighting"]
    assert labels == [f"c3d-rgb-s0 [{mark}] (t1aaaaaa, ?)", f"c3d-res-s1 [{mark}] (t2bbbbbb, ?)"]


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


def test_a_pcl_protocol_fine_tune_transfers_at_its_lowest_validation_loss_epoch():
    # PCL's code tests the checkpoint of lowest validation loss: under its protocol that epoch's test
    # accuracy (sel_acc_late) is the transfer accuracy, not the last epoch's.
    pcl = finetune_run("f0", "s0", 0.30)
    pcl["tags"]["finetune_protocol"] = "pcl"
    pcl["metrics"]["sel_acc_late"] = 0.42
    plain = finetune_run("f1", "s1", 0.40)
    plain["metrics"]["sel_acc_late"] = 0.10  # a plain fine-tune reports its last epoch, whatever else it logged
    rows = {(r.teacher, r.fraction): r for r in aggregate(STUDENTS, [pcl, plain])}
    assert rows[("none", 0.5)].transfer.mean == pytest.approx((0.42 + 0.40) / 2)


def test_table_shows_percent_mean_std_and_signed_delta():
    rows = aggregate(STUDENTS)
    text = format_table(rows)
    assert "Student r3d_18 on ucf101" in text
    scratch_line = next(line for line in text.splitlines() if line.startswith("scratch"))
    assert "60.0 ± 10.0" in scratch_line and scratch_line.split()[2] == "3"
    kd_line = next(line for line in text.splitlines() if line.startswith("c3d") and " 0.5 " in line)
    assert "70.0 ± 7.1" in kd_line and "+10.0" in kd_line and "+15.0" in kd_line  # Δ final, Δ early
    md = format_table(rows, markdown=True)
    assert "## Student r3d_18 on ucf101" in md and "| scratch | 0.5 | 3 | 0/3 | last | 60.0 ± 10.0 |" in md
    assert "| teacher | fraction | n | collapsed | reading | final | early | mid | late | Δ final |" in md


def test_csv_holds_raw_fractions(tmp_path):
    path = tmp_path / "r.csv"
    write_csv(aggregate(STUDENTS), path)
    lines = list(csv.DictReader(path.open()))
    kd = next(r for r in lines if r["teacher"] == "c3d" and r["fraction"] == "0.5")
    assert float(kd["final_mean"]) == pytest.approx(0.7)
    assert float(kd["delta_final"]) == pytest.approx(0.1)
    assert kd["seeds"] == "0 1" and kd["run_ids"] == "k0 k1"
    # paired over seeds 0 and 1: d = 0.15, 0.15, no spread -> [0.15, 0.15]; of the 4 sign flips, ++ and --
    # reach |0.30|: p = 0.5, the only test of the report (Holm leaves it as it is); 0.15 is outside ±0.05.
    assert float(kd["delta_final_paired"]) == pytest.approx(0.15)
    assert float(kd["delta_final_low"]) == pytest.approx(0.15) == float(kd["delta_final_high"])
    assert (kd["pairs"], kd["verdict"], kd["collapsed"], kd["views"]) == ("2", "inconclusive", "0", "0")
    assert (kd["p_perm"], kd["perm_method"], kd["p_holm"], kd["p_tost"]) == ("0.5", "exact", "0.5", "1")
    assert (kd["seeds_for_margin"], kd["margin"], kd["holm_family"]) == ("2", "0.05", "1")  # sd 0: 2 pairs do
    assert kd["best_pairs"] == "0" and kd["best_verdict"] == ""  # no best-so-far metrics logged
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
    assert line.split()[:6] == ["scratch", "1", "1", "0/1", "last", "50.0"] and line.split().count("-") >= 6


@pytest.mark.parametrize("name, folder", [("kdhar-cpu", "kdhar-cpu"), ("../evil", "%2E%2E%2Fevil"),
                                          ("/etc/x", "%2Fetc%2Fx"), ("..", "%2E%2E"), ("a b", "a%20b")])
def test_report_folder_stays_inside_out(name, folder):
    from kdhar.report import report_folder

    assert report_folder(name) == folder


def test_experiments_whose_names_differ_get_report_folders_that_differ():
    from kdhar.report import report_folder

    names = ["a/b", "a_b", "a b", "a%2Fb", "a.b", ".a", "%2Ea", "ab", "a\\b", "é", "e"]
    folders = [report_folder(n) for n in names]
    assert len(set(folders)) == len(names)  # a/b and a_b once shared one folder, one report over the other
    assert all("/" not in f and not f.startswith(".") for f in folders)


def _log_student(client, exp, teacher, seed, final, best, teacher_run=""):
    tags = {"role": "student", "student_arch": "tiny3d", "arch": "tiny3d", "teacher_arch": teacher,
            "fraction": "0.25", "seed": str(seed), "dataset": "ucf101",
            **({"teacher_run_id": teacher_run} if teacher_run else {})}
    run_id = client.create_run(exp, tags=tags).info.run_id
    # a two-epoch curve whose best (first epoch) is above its last, as the best-so-far reading sees it
    client.log_metric(run_id, "test_video_top1", best, step=1)
    client.log_metric(run_id, "test_video_top1", final, step=2)
    for name, value in (("final_test_video_top1", final), ("acc_late", final), ("best_acc_late", best)):
        client.log_metric(run_id, name, value, step=2)
    client.set_terminated(run_id)
    return run_id


def test_report_from_a_real_store_tests_each_teacher_run_in_both_readings(local_tracking, tmp_path):
    from click.testing import CliRunner
    from mlflow import MlflowClient

    from kdhar import tracking
    from kdhar.cli import cli
    from kdhar.report import ReportError, build_report

    client = MlflowClient(local_tracking)
    exp = client.create_experiment("kd-stats")
    teachers = {}
    for name, acc in (("strong", 0.99), ("weak", 0.90)):
        teachers[name] = client.create_run(exp, tags={"role": "teacher"}).info.run_id
        client.log_metric(teachers[name], "final_test_video_top1", acc)
        client.set_terminated(teachers[name])
    scratch = [0.40, 0.45, 0.50, 0.42, 0.48, 0.44]
    for seed, acc in enumerate(scratch):
        _log_student(client, exp, "none", seed, acc, acc + 0.05)
        # the strong teacher's students gain 20 points at the last epoch (±1), 15 at their best
        jitter = 0.01 * (-1) ** seed
        _log_student(client, exp, "c3d", seed, acc + 0.20 + jitter, acc + 0.20 + jitter, teachers["strong"])
        # the weak teacher's students end level with scratch (±1 point), and their best is level too
        _log_student(client, exp, "c3d", seed, acc + jitter, acc + 0.05 + jitter, teachers["weak"])

    report = build_report("kd-stats", tmp_path / "out", margin=0.05)
    scratch_row, *kd_rows = report.rows
    assert [(r.teacher, r.teacher_run) for r in report.rows] == [
        ("none", ""), *sorted(("c3d", t) for t in teachers.values())]
    strong = next(r for r in kd_rows if r.teacher_run == teachers["strong"])
    weak = next(r for r in kd_rows if r.teacher_run == teachers["weak"])
    # 6 pairs all positive: exact p = 2/64 = 0.03125; Holm over 4 tests (2 rows x 2 readings): the two
    # smallest p-values are the strong teacher's, 4·0.03125 = 0.125, so even a 20-point gain on every
    # seed is not "helps" with 6 seeds in a family of 4.
    assert (strong.tests["last"].p_perm, strong.tests["last"].p_holm) == (pytest.approx(2 / 64), pytest.approx(0.125))
    assert strong.verdict == "inconclusive" and strong.tests["last"].mean == pytest.approx(0.20)
    assert strong.tests["best"].mean == pytest.approx(0.15)
    assert weak.verdict == "equivalent" and weak.tests["best"].verdict == "equivalent"
    assert (strong.teacher_acc, weak.teacher_acc) == (pytest.approx(0.99), pytest.approx(0.90))

    md = (tmp_path / "out" / "report.md").read_text()
    assert "### KD - scratch, paired by seed: student tiny3d on ucf101" in md
    assert f"| c3d ({teachers['strong'][:8]}, 99.0 %) | 0.25 | last | 6 | +20.0 [" in md
    assert "Verdicts (4 KD-vs-scratch tests in one Holm family, margin ±5 points)" in md
    lines = {r["teacher_run"]: r for r in csv.DictReader((tmp_path / "out" / "report.csv").open())}
    assert set(lines) == {"", *teachers.values()}
    row = lines[teachers["strong"]]
    assert (row["pairs"], row["perm_method"], row["verdict"], row["holm_family"]) == ("6", "exact", "inconclusive", "4")
    assert float(row["p_holm"]) == pytest.approx(0.125) and float(row["best_delta_final_paired"]) == pytest.approx(0.15)
    assert float(row["best_final_mean"]) == pytest.approx(sum(scratch) / 6 + 0.20)
    # sd of ±0.01 over 6 pairs = 0.010954: 2 pairs give 12.706·0.010954/√2 = 0.098, 3 give 4.303·0.010954/√3 = 0.027
    assert int(row["seeds_for_margin"]) == 3 and row["best_verdict"] == "inconclusive"
    (logged,) = tracking.find_runs("kd-stats-reports", "tags.role = 'report'")
    assert (logged["params"]["margin"], logged["params"]["holm_family"]) == ("0.05", "4")

    # The CLI takes the margin in points; a wider one changes the equivalence tests only.
    result = CliRunner().invoke(cli, ["report", "--experiment", "kd-stats", "--out", str(tmp_path / "cli"),
                                      "--margin", "2"], catch_exceptions=False)
    assert result.exit_code == 0 and "margin ±2 points" in result.output and "p TOST ±2" in result.output
    bad = CliRunner().invoke(cli, ["report", "--experiment", "kd-stats", "--margin", "0"])
    assert bad.exit_code == 2 and "Invalid value for '--margin'" in bad.output and "Traceback" not in bad.output
    with pytest.raises(ReportError, match="give --margin between 0 and 100"):
        build_report("kd-stats", tmp_path / "nan", margin=float("nan"))
    assert len(tracking.find_runs("kd-stats-reports", "tags.role = 'report'")) == 2  # the refused ones logged nothing


def test_report_and_stats_import_without_torch():
    import subprocess
    import sys

    code = ("import sys, kdhar.stats; assert 'mlflow' not in sys.modules; import kdhar.report; "
            "print(sorted(m for m in ('torch', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"  # the report loads torch (or MLflow) only when it reads a store


def test_kd_runs_of_another_loss_weighting_get_a_row_of_their_own_paired_with_the_same_scratch_twins():
    runs = [run("s0", "none", 0, 0.5), run("s1", "none", 1, 0.6),
            run("m0", "c3d", 0, 0.6), run("m1", "c3d", 1, 0.7),
            run("p0", "c3d", 0, 0.8), run("p1", "c3d", 1, 0.9)]
    for r in runs[2:4]:
        r["params"]["kd.weighting"] = "mix"
    for r in runs[4:]:
        r["params"]["kd.weighting"] = "sum"
    rows = {r.teacher: r for r in aggregate(runs)}
    default = report.KDConfig.weighting
    other = "sum" if default == "mix" else "mix"
    assert set(rows) == {"none", "c3d", f"c3d [{other}]"}
    plain, marked = rows["c3d"], rows[f"c3d [{other}]"]
    assert sorted(plain.run_ids + marked.run_ids) == ["m0", "m1", "p0", "p1"] and len(plain.run_ids) == 2
    gain = {"mix": 0.1, "sum": 0.3}  # each KD run against its seed's scratch run
    assert plain.tests["last"].mean == pytest.approx(gain[default])
    assert marked.tests["last"].mean == pytest.approx(gain[other])
    # Which loss: the marked row against the default one, seed by seed (0.8 - 0.6, 0.9 - 0.7), in a
    # Holm family of its own; the KD-vs-scratch family keeps its 2 tests (one reading: no best_ metrics).
    assert marked.loss == other and plain.loss == "" and plain.loss_tests == {}
    assert marked.loss_delta["last"] == pytest.approx(gain[other] - gain[default])
    assert (marked.loss_tests["last"].n, marked.loss_tests["last"].mean) == (2, pytest.approx(gain[other] - gain[default]))
    assert report._family(list(rows.values())) == 2 and report.adjust_loss_family(list(rows.values())) == 1
    text = format_table(list(rows.values()))
    assert f"KD under another loss - KD under {default} (the default), paired by seed" in text
    assert "Loss verdicts, another loss against" in text and "(1 test in its own Holm family;" in text


def test_a_loss_row_without_a_default_twin_says_so_and_the_csv_carries_the_loss_columns(tmp_path):
    other = "sum" if report.KDConfig.weighting == "mix" else "mix"
    runs = [run("s0", "none", 0, 0.5), run("s1", "none", 1, 0.6), run("p0", "c3d", 0, 0.8), run("p1", "c3d", 1, 0.9)]
    for r in runs[2:]:
        r["params"]["kd.weighting"] = other
    _scratch, marked = aggregate(runs)
    assert marked.loss_verdict == f"no {report.KDConfig.weighting} runs of this teacher run"
    write_csv([_scratch, marked], tmp_path / "r.csv")
    with (tmp_path / "r.csv").open() as f:
        line = list(csv.DictReader(f))[1]
    assert (line["loss"], line["loss_verdict"]) == (other, marked.loss_verdict)



def test_inside_pcl_the_papers_sum_is_the_default_loss_and_mix_is_the_marked_one():
    # A PCL student distils under Eq. 7 (sum) unless told: its sum runs are the plain row, with no
    # loss comparison to ask for; a mix run inside PCL is the marked one, compared with sum.
    pcl = {"ssl": "pcl"}
    runs = [run("s0", "none", 0, 0.5, tags=pcl), run("s1", "none", 1, 0.6, tags=pcl),
            run("p0", "c3d", 0, 0.8, tags=pcl), run("p1", "c3d", 1, 0.9, tags=pcl)]
    for r in runs[2:]:
        r["params"]["kd.weighting"] = "sum"
    rows = aggregate(runs)
    assert [(r.teacher, r.loss, r.loss_verdict) for r in rows] == [("none", "", ""), ("c3d", "", "")]
    assert "KD under another loss" not in format_table(rows)
    mixed = [run("m0", "c3d", 0, 0.7, tags=pcl), run("m1", "c3d", 1, 0.7, tags=pcl)]
    for r in mixed:
        r["params"]["kd.weighting"] = "mix"
    marked = {r.teacher: r for r in aggregate(runs + mixed)}["c3d [mix]"]
    assert (marked.loss, marked.loss_default, marked.loss_tests["last"].mean) == ("mix", "sum", pytest.approx(-0.15))
    assert "KD under another loss - KD under sum (the default)" in format_table(list(aggregate(runs + mixed)))
    # A kd_stage: after_ssl student distils supervised, where mix is the default.
    after = {"ssl": "pcl", "kd_stage": "after_ssl"}
    assert report.default_weighting({"tags": after}) == report.KDConfig.weighting

def test_kd_after_pcl_rows_hold_every_seed_apart_from_kd_inside_pcl_and_pair_with_their_own_scratch_runs():
    # Reading B: each seed starts from its own pretraining run (its own --init), the same recipe
    # (`init_key`) for every seed; reading A's rows of the same student stay rows of their own.
    def after(run_id, teacher, seed, final):
        tags = {"kd_stage": "after_ssl", "init": f"runs:/pre{seed}", "init_key": "pretrain-k", "pair_key": "p"}
        r = run(run_id, teacher, seed, final, tags=tags)
        r["params"]["init"] = tags["init"]
        return r

    runs = [run("a0", "none", 0, 0.30, tags={"ssl": "pcl"}), run("b0", "c3d", 0, 0.40, tags={"ssl": "pcl"}),
            after("s0", "none", 0, 0.5), after("k1", "c3d", 1, 0.8), after("s1", "none", 1, 0.6), after("k0", "c3d", 0, 0.7)]
    rows = {(r.student, r.teacher): r for r in aggregate(runs)}
    assert set(rows) == {("r3d_18 (pcl)", "none"), ("r3d_18 (pcl)", "c3d"), ("r3d_18 (pcl)", "none [after pcl]"),
                         ("r3d_18 (pcl)", "c3d [after pcl]")}
    after_kd = rows[("r3d_18 (pcl)", "c3d [after pcl]")]
    assert sorted(after_kd.run_ids) == ["k0", "k1"] and not after_kd.verdict.startswith(("no ", "recipes differ"))
    assert after_kd.delta["final"] == pytest.approx(0.2) and after_kd.tests["last"].mean == pytest.approx(0.2)
    assert rows[("r3d_18 (pcl)", "c3d")].delta["final"] == pytest.approx(0.1)
