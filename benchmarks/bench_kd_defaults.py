"""Which KD loss weighting and warm-up to make the default: measured, seed by seed, against scratch.

Trains the teachers once (CPU preset: width 8, 12 epochs, all training videos), then the width-4
C3D student of the CPU grid (3 epochs, batch 8, lr 0.02, one thread per run) from scratch and
distilled under each condition below, for every teacher, fraction and seed. Prints, per cell, the
test video top-1 (mean ± std over seeds), how many runs were stuck (column "collapsed": train
accuracy at most 1.5x chance at the end, `kdhar.objectives.stuck`), and the paired KD - scratch difference with its 95 % t-interval.

Conditions (tau 4 everywhere):
- paper: CE + 1 * tau^2 * KL, no warm-up (the paper's Eq. 7 and recipe; kdhar's old default)
- sum+warmup: the same loss with one epoch of linear lr warm-up
- mix: 0.5 * CE + 0.5 * tau^2 * KL with one epoch of warm-up (kdhar's default)
The scratch twin uses the default warm-up (one epoch); `--scratch-warmup 0` measures it without.

Everything happens in a working folder (MLflow store, checkpoints); videos are the synthetic set.

    python benchmarks/bench_kd_defaults.py --root data/synthetic/ucf101 --workdir /tmp/kd-defaults
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

CONDITIONS = {
    "paper": dict(weighting="sum", lam=1.0, warmup=0.0),
    "sum+warmup": dict(weighting="sum", lam=1.0, warmup=1.0),
    "mix": dict(weighting="mix", alpha=0.5, warmup=1.0),
}
METRIC = "final_test_video_top1"


def student_config(root: str, arch: str, fraction: float, seed: int, epochs: int, width: int):
    from kdhar.experiments import DatasetSpec, build_run_config

    overrides = {"width": width, "epochs": epochs, "batch_size": 8, "num_workers": 0, "threads": 1, "test_clips": 1}
    return build_run_config(arch, size="cpu", overrides=overrides, dataset=DatasetSpec("ucf101", root),
                            fraction=fraction, seed=seed)


def train_teacher(root: str, arch: str, experiment: str) -> tuple[str, str, float]:
    from kdhar.experiments import DatasetSpec, build_run_config
    from kdhar.train import run_training

    cfg = build_run_config(arch, size="cpu", overrides={"num_workers": 0, "threads": 1, "test_clips": 1},
                           dataset=DatasetSpec("ucf101", root), fraction=1.0, seed=0)
    res = run_training(cfg, role="teacher", experiment=experiment, progress=False, register=False)
    return arch, f"runs:/{res.run_id}/model", res.final[METRIC]


def train_student(job: dict) -> dict:
    from kdhar.config import KDConfig
    from kdhar.distill import distill

    cfg = student_config(job["root"], job["student"], job["fraction"], job["seed"], job["epochs"], job["width"])
    cond = dict(job["condition"])
    warmup = cond.pop("warmup")
    cfg = dataclasses.replace(cfg, kd=dataclasses.replace(KDConfig(), **cond),
                              optim=dataclasses.replace(cfg.optim, warmup=warmup))
    start = time.perf_counter()
    res = distill(cfg, teacher=job["teacher_uri"], experiment=job["experiment"], progress=False, register=False)
    last = res.history[-1]
    return {**{k: v for k, v in job.items() if k != "condition"}, "acc": res.final[METRIC],
            "collapsed": bool(last.get("collapsed")), "seconds": time.perf_counter() - start}


def stored_results(experiment: str, student: str) -> tuple[dict, list[dict], float]:
    """Teachers and student results of an earlier run of this benchmark, read back from its store."""
    from kdhar import tracking
    from kdhar.objectives import is_stuck
    from kdhar.objectives.stuck import STUCK_MIN_STEPS

    runs = tracking.find_runs(experiment, "attributes.status = 'FINISHED'")
    uris = {r["tags"]["arch"]: (f"runs:/{r['run_id']}/model", r["metrics"][METRIC])
            for r in runs if r["tags"]["role"] == "teacher"}
    results = []
    for r in runs:
        tags, params, m = r["tags"], r["params"], r["metrics"]
        if tags["role"] != "student" or tags["arch"] != student:
            continue
        if tags["teacher_arch"] == "none":
            cond = "scratch"
        elif params["kd.weighting"] == "mix":
            cond = "mix"
        else:
            cond = "paper" if float(params["optim.warmup"]) == 0 else "sum+warmup"
        # the last epoch's verdict: accuracy alone decides there, for scratch runs too (every run of
        # this benchmark takes more than STUCK_MIN_STEPS steps)
        collapsed = is_stuck(m["train_acc"], int(params["num_classes"]), share_done=1.0, steps_done=STUCK_MIN_STEPS)
        results.append({"teacher": tags["teacher_arch"], "cond": cond, "fraction": float(tags["fraction"]),
                        "seed": int(tags["seed"]), "acc": m[METRIC], "collapsed": collapsed})
    wall = (max(r["end_time"] for r in runs) - min(r["start_time"] for r in runs)) / 1000
    return uris, results, wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="data/synthetic/ucf101")
    p.add_argument("--workdir", default="runs/bench-kd-defaults")
    p.add_argument("--teachers", default="c3d,r3d_18")
    p.add_argument("--student", default="c3d")
    p.add_argument("--fractions", default="1.0,0.5")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--width", type=int, default=4)
    p.add_argument("--scratch-warmup", type=float, default=1.0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--report-only", action="store_true",
                   help="print the table from the runs already in --workdir (stuck runs re-read with today's rule)")
    args = p.parse_args()

    root = str(Path(args.root).resolve())
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from kdhar import tracking

    tracking.check_server(tracking.tracking_uri())
    experiment = "bench-kd-defaults"
    from kdhar.report import mean_std, paired_interval, verdict

    teachers = args.teachers.split(",")
    fractions = [float(f) for f in args.fractions.split(",")]
    if args.report_only:
        uris, results, wall = stored_results(experiment, args.student)
    else:
        ctx = multiprocessing.get_context("spawn")
        start = time.perf_counter()
        with ProcessPoolExecutor(args.workers, mp_context=ctx) as pool:
            # One process creates the store's tables first: concurrent first use of a SQLite store races.
            uris = {}
            first, *rest = teachers
            arch, uri, acc = pool.submit(train_teacher, root, first, experiment).result()
            uris[arch] = (uri, acc)
            for arch, uri, acc in pool.map(train_teacher, [root] * len(rest), rest, [experiment] * len(rest)):
                uris[arch] = (uri, acc)
            base = dict(root=root, student=args.student, epochs=args.epochs, width=args.width, experiment=experiment)
            jobs = [dict(base, teacher="none", teacher_uri="none", cond="scratch", fraction=f, seed=s,
                         condition={"warmup": args.scratch_warmup})
                    for f in fractions for s in range(args.seeds)]
            jobs += [dict(base, teacher=t, teacher_uri=uris[t][0], cond=name, fraction=f, seed=s, condition=cond)
                     for t in teachers for name, cond in CONDITIONS.items() for f in fractions for s in range(args.seeds)]
            results = list(pool.map(train_student, jobs))
        wall = time.perf_counter() - start

    def runs(rows):
        return [{"tags": {"seed": str(r["seed"])}, "metrics": {METRIC: r["acc"]}} for r in rows]

    print(f"student {args.student} width {args.width}, {args.epochs} epochs, lr 0.02, tau 4; "
          f"{args.seeds} seeds; {len(results) + len(teachers)} runs in {wall / 60:.1f} min")
    print("teachers: " + ", ".join(f"{t} {100 * uris[t][1]:.1f} %" for t in teachers))
    print(f"{'teacher':<8} {'fraction':>8} {'condition':<11} {'test top-1 %':>13} {'collapsed':>9} "
          f"{'KD - scratch [95 % CI]':>26}  verdict")
    for f in fractions:
        scratch = [r for r in results if r["cond"] == "scratch" and r["fraction"] == f]
        s = mean_std(r["acc"] for r in scratch)
        print(f"{'-':<8} {f:>8g} {'scratch':<11} {100 * s.mean:>6.1f} ± {100 * s.std:<4.1f} "
              f"{sum(r['collapsed'] for r in scratch):>5}/{len(scratch)}")
        for t in teachers:
            for name in CONDITIONS:
                rows = [r for r in results if r["cond"] == name and r["fraction"] == f and r["teacher"] == t]
                m = mean_std(r["acc"] for r in rows)
                d = paired_interval(runs(rows), runs(scratch), METRIC)
                print(f"{t:<8} {f:>8g} {name:<11} {100 * m.mean:>6.1f} ± {100 * m.std:<4.1f} "
                      f"{sum(r['collapsed'] for r in rows):>5}/{len(rows)} "
                      f"{100 * d.mean:>+9.1f} [{100 * d.low:+.1f}, {100 * d.high:+.1f}]  {verdict(d)}")


if __name__ == "__main__":
    main()
