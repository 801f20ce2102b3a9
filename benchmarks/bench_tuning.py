"""What pruning and a second worker buy a tau/lam study, measured with the product's own `tune`.

1. The same budgeted study (same trials, epochs and sampler seed) without pruning and with it:
   total training epochs consumed, wall time, best validation accuracy found.
2. Trials per hour with one worker and with two worker processes sharing a PostgreSQL study;
   each worker gets its share of the cores (torch.set_num_threads).

Everything happens in a temporary folder (synthetic videos, a short-trained teacher, MLflow and
Optuna databases). Usage:

    python benchmarks/bench_tuning.py                 # ~10 minutes on 2 CPU cores
    python benchmarks/bench_tuning.py --trials 6 --epochs 4 --worker-trials 2   # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from kdhar.config import ClipConfig, DataConfig, ModelConfig, OptimConfig, RunConfig

PG_ADMIN = dict(host="127.0.0.1", port=5432, user="postgres", dbname="postgres")


def bench_config(root: str, epochs: int, arch: str = "tiny3d", width: int = 4) -> RunConfig:
    return RunConfig(
        data=DataConfig(root=root, num_workers=0, val_fraction=0.2),
        clip=ClipConfig(clip_len=8, frame_interval=1, test_clips=2, resize=(40, 53), crop=32),
        model=ModelConfig(arch=arch, width=width, dropout=0.0),
        optim=OptimConfig(batch_size=8, epochs=epochs, lr=0.05, deterministic=False),
    )


WORKER = """
import json, sys, torch
sys.path.insert(0, sys.argv[2])
from bench_tuning import bench_config
from kdhar.tuning import tune
a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"])
print(json.dumps(tune(bench_config(a["root"], a["epochs"]), teacher=a["teacher"], n_trials=a["n_trials"],
    study_name="workers", storage=a["storage"], pruner="none", experiment="bench-workers", seed=0,
    cache_teacher=True, device="cpu")))
"""


def run_workers(n_workers: int, args: argparse.Namespace, root: str, teacher: str, cwd: Path) -> float:
    """Wall seconds for `n_workers` processes to finish a fresh PostgreSQL study."""
    import psycopg2

    name = f"kdhar_bench_{uuid.uuid4().hex[:8]}"
    admin = psycopg2.connect(**PG_ADMIN)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    try:
        spec = dict(root=root, teacher=teacher, epochs=args.epochs, n_trials=args.worker_trials,
                    storage=f"postgresql://postgres@127.0.0.1:5432/{name}",
                    threads=max(1, args.threads // n_workers))
        start = time.perf_counter()
        procs = [
            subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(spec), str(Path(__file__).parent)],
                             cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(n_workers)
        ]
        for p in procs:
            out, err = p.communicate()
            if p.returncode != 0:
                raise RuntimeError(f"worker failed:\n{err[-2000:]}")
        return time.perf_counter() - start
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=8, help="trials per study in the pruning comparison")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per (unpruned) trial")
    parser.add_argument("--pruner", default="asha", help="pruners to compare with the unpruned study, comma-separated "
                        "(median, asha, hyperband)")
    parser.add_argument("--worker-trials", type=int, default=4, help="trials per study in the worker comparison")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads shared by the workers")
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--teacher-epochs", type=int, default=4)
    parser.add_argument("--skip-workers", action="store_true", help="no PostgreSQL part")
    parser.add_argument("--root", default=None, help="an existing UCF101-layout dataset instead of a tiny generated one")
    parser.add_argument("--teacher", default=None, help="a teacher checkpoint for --root (skips training one)")
    parser.add_argument("--fraction", type=float, default=1.0, help="students' share of the training videos (--root)")
    args = parser.parse_args()
    from kdhar.tuning import PRUNERS

    pruning = [p for p in PRUNERS if p != "none"]
    pruners = [p.strip() for p in args.pruner.split(",") if p.strip()]
    if not pruners or set(pruners) - set(pruning):
        parser.error(f"--pruner {args.pruner!r}: use one or more of {', '.join(pruning)}")

    import torch

    from kdhar.data.synthetic import SynthSpec, generate
    from kdhar.train import run_training
    from kdhar.tuning import study_trials, tune

    if args.root:
        if not args.teacher:
            parser.error("--root needs --teacher (a checkpoint)")
        args.root, args.teacher = str(Path(args.root).resolve()), str(Path(args.teacher).resolve())
    work = Path(tempfile.mkdtemp(prefix="kdhar-bench-tuning-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    os.chdir(work)
    torch.set_num_threads(args.threads)
    if args.root:
        # A real calibrated set and an already trained teacher, at the CPU preset the demo uses.
        from kdhar.experiments import DatasetSpec, build_run_config

        root, teacher = args.root, args.teacher
        cfg = build_run_config("tiny3d", size="cpu", overrides={"epochs": args.epochs, "num_workers": 0},
                               dataset=DatasetSpec(name="ucf101", root=root), fraction=args.fraction, seed=0)
        print(f"data: {root} (fraction {args.fraction}); teacher {teacher}")
    else:
        spec = SynthSpec(num_classes=args.classes, groups=8, clips_per_group=2, frames=16, size=(48, 64), difficulty=0.3)
        root = str(generate(work / "ucf101", layout="ucf101", spec=spec, workers=args.threads).root)
        t0 = time.perf_counter()
        teacher_cfg = bench_config(root, args.teacher_epochs, arch="c3d", width=8)
        res = run_training(teacher_cfg, role="teacher", experiment="bench-teacher", register=False, progress=False)
        teacher = str(work / "runs" / "checkpoints" / res.run_id / "last.pt")
        print(f"data: {args.classes} classes in {work}; teacher c3d w8 {args.teacher_epochs} epochs "
              f"val_video_top1 {res.final.get('best_val_video_top1', float('nan')):.3f} ({time.perf_counter() - t0:.0f} s)")
        cfg = bench_config(root, args.epochs)
    rows = []
    for pruner in ["none", *pruners]:
        start = time.perf_counter()
        summary = tune(cfg, teacher=teacher, n_trials=args.trials, study_name=f"prune-{pruner}",
                       storage=f"sqlite:///{work / 'optuna.db'}", pruner=pruner, experiment="bench-pruning",
                       seed=0, cache_teacher=True, device="cpu")
        rows.append((pruner, summary, time.perf_counter() - start))
    print(f"\nstudy of {args.trials} trials x {args.epochs} epochs, tiny3d w{cfg.model.width}, "
          f"clip {cfg.clip.clip_len}x{cfg.clip.crop}x{cfg.clip.crop}, seed 0")
    print(f"{'pruner':<10}{'epochs':>8}{'pruned':>8}{'wall s':>9}{'best val':>10}")
    for pruner, s, wall in rows:
        print(f"{pruner:<10}{s['epochs']:>8}{s['pruned']:>8}{wall:>9.0f}{s['best_value']:>10.3f}")
    (_, base, base_wall), *pruned = rows
    for pruner, pr, pr_wall in pruned:
        saved = 1 - pr["epochs"] / base["epochs"]
        gap = 100 * (base["best_value"] - pr["best_value"])
        print(f"{pruner}: saved {saved:.0%} of epochs (target >= 50%) and {1 - pr_wall / base_wall:.0%} of wall "
              f"time; best value {gap:+.1f} points below unpruned (target <= 1)")
        trials = study_trials(f"sqlite:///{work / 'optuna.db'}", f"prune-{pruner}")
        print(f"  epochs per trial: {[t['user_attrs'].get('epochs') for t in trials]}")

    if args.skip_workers:
        return
    print(f"\nworkers on PostgreSQL: {args.worker_trials} trials x {args.epochs} epochs, {args.threads} threads shared")
    rates = {}
    for n in (1, 2):
        wall = run_workers(n, args, root, teacher, work)
        rates[n] = args.worker_trials / wall * 3600
        print(f"{n} worker(s): {wall:6.0f} s  {rates[n]:6.0f} trials/hour")
    print(f"speed-up with 2 workers: {rates[2] / rates[1]:.2f}x")


if __name__ == "__main__":
    main()
