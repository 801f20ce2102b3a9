"""Does a label-free PCL encoder, used as --init, beat random initialisation when labels are scarce?

For each seed: `kdhar pretrain` (label-free PCL on every training video, no labels read), then the
same supervised student trained on `--fraction` of the labelled videos twice, from that encoder
(`--init runs:/<pretrain run>`) and from random weights. Everything uses PCL's input pipeline at the
CPU size: residual frames of 8 consecutive frames, 3 test clips per video. Prints per arm the test
video top-1 (mean ± std over seeds), the paired init - random difference with its 95 % t-interval,
and the clip-retrieval top-1 of the pretrained encoders against untrained ones (a label-free check
that pretraining changed the features).

Everything happens in a working folder (MLflow store, checkpoints); videos are the synthetic set.

    python benchmarks/bench_pcl_init.py --root data/synthetic/ucf101 --workdir /tmp/pcl-init
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

METRIC = "final_test_video_top1"


def config(root: str, arch: str, width: int, epochs: int, fraction: float, seed: int, ssl: str):
    from kdhar.experiments import DatasetSpec, build_run_config

    overrides = {"width": width, "epochs": epochs, "batch_size": 8, "num_workers": 0, "threads": 1,
                 "modality": "res", "frame_interval": 1, "test_clips": 3, "ssl": ssl}
    return build_run_config(arch, size="cpu", overrides=overrides, dataset=DatasetSpec("ucf101", root),
                            fraction=fraction, seed=seed)


def pretrain(job: dict) -> dict:
    from kdhar.models import build_model
    from kdhar.objectives import build_objective
    from kdhar.train import load_splits, run_training

    from kdhar import tracking
    from kdhar.train import config_hash

    cfg = config(job["root"], job["arch"], job["width"], job["pretrain_epochs"], 1.0, job["seed"], "pcl")
    # A pretraining this folder already finished is reused, so an interrupted benchmark picks up.
    done = tracking.find_runs(job["experiment"], f"tags.config_hash = '{config_hash(cfg, None, None)}' and "
                                                 "tags.role = 'pretrain' and attributes.status = 'FINISHED'")
    if done:
        res = type("Done", (), {"run_id": done[0]["run_id"], "final": done[0]["metrics"]})
    else:
        res = run_training(cfg, role="pretrain", experiment=job["experiment"],
                           objective=build_objective(cfg, labels=False), progress=False, register=False)
    # The same retrieval on an untrained encoder of this seed: what pretraining is measured against.
    splits = load_splits(cfg)
    untrained = build_model(cfg.model.arch, len(splits.classes), width=cfg.model.width, modality=cfg.model.modality)
    baseline = build_objective(cfg, labels=False).final_metrics(untrained, cfg, splits, "cpu")
    return {"seed": job["seed"], "run": res.run_id, "retrieval": res.final["retrieval_top1"],
            "untrained_retrieval": baseline["retrieval_top1"]}


def supervised(job: dict) -> dict:
    from kdhar.distill import distill

    cfg = config(job["root"], job["arch"], job["width"], job["epochs"], job["fraction"], job["seed"], "none")
    res = distill(cfg, teacher="none", init=job["init"], experiment=job["experiment"], progress=False, register=False,
                  extra_tags={"bench_arm": job["arm"]})
    return {"seed": job["seed"], "arm": job["arm"], "acc": res.final[METRIC]}


def _init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="data/synthetic/ucf101")
    p.add_argument("--workdir", default="bench-pcl-init", help="MLflow store and checkpoints go here")
    p.add_argument("--arch", default="c3d")
    p.add_argument("--width", type=int, default=4)
    p.add_argument("--pretrain-epochs", type=int, default=15)
    p.add_argument("--epochs", type=int, default=12, help="epochs of each supervised run")
    p.add_argument("--fraction", type=float, default=0.1, help="share of the labelled videos")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    root = str(Path(args.root).resolve())
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    common = dict(root=root, arch=args.arch, width=args.width, experiment="bench-pcl-init")
    from mlflow import MlflowClient

    MlflowClient().search_experiments()  # creates the store here, not in two workers at once
    start = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.workers, mp_context=ctx, initializer=_init, initargs=(1,)) as pool:
        pre = list(pool.map(pretrain, [dict(common, seed=s, pretrain_epochs=args.pretrain_epochs) for s in args.seeds]))
        jobs = [dict(common, seed=r["seed"], epochs=args.epochs, fraction=args.fraction, arm=arm,
                     init=f"runs:/{r['run']}" if arm == "pcl-init" else None)
                for r in pre for arm in ("pcl-init", "random")]
        results = list(pool.map(supervised, jobs))
    from kdhar.report import mean_std, paired_interval, verdict
    from kdhar.stats import PairedTest

    def fmt(values):
        s = mean_std(values)
        return f"{100 * s.mean:.1f} ± {100 * s.std:.1f}"

    runs = {arm: [{"tags": {"seed": str(r["seed"])}, "metrics": {METRIC: r["acc"]}} for r in results if r["arm"] == arm]
            for arm in ("pcl-init", "random")}
    paired: PairedTest | None = paired_interval(runs["pcl-init"], runs["random"])
    print(f"{args.arch} width {args.width}, res frames, {args.pretrain_epochs} label-free PCL epochs on all training "
          f"videos, then {args.epochs} supervised epochs on {args.fraction:g} of them; seeds {args.seeds}; "
          f"{(time.perf_counter() - start) / 60:.1f} min")
    for arm in ("pcl-init", "random"):
        accs = [r["acc"] for r in results if r["arm"] == arm]
        print(f"  {arm:>8}: test video top-1 {fmt(accs)} %  ({', '.join(f'{100 * a:.1f}' for a in accs)})")
    if paired is not None:
        print(f"  pcl-init - random: {100 * paired.mean:+.1f} [{100 * paired.low:+.1f}, {100 * paired.high:+.1f}] "
              f"(paired by seed, 95 % t-interval): {verdict(paired)}")
    print(f"  retrieval top-1 of the encoder: pretrained {fmt([r['retrieval'] for r in pre])} %, "
          f"untrained {fmt([r['untrained_retrieval'] for r in pre])} %")


if __name__ == "__main__":
    main()
