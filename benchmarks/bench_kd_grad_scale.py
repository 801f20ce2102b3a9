"""How large the soft (KD) term's gradient is next to the label (CE) term's, under each weighting.

Trains a teacher at the CPU preset (or takes --teacher), then trains the demo's student (tiny3d,
25 % of the training videos) with the default loss, and on every --every-th batch measures, on that
batch, the L2 norm of the gradient over the student's parameters of

- CE alone and tau^2 * KL alone (the raw terms), and their ratio;
- the weighted label part and the weighted soft part under "mix" (alpha 0.5) and "sum" (lam 1);
- the whole loss's gradient under each weighting, over plain CE's (how much further a distilled
  student steps at the same lr than its scratch twin), "balanced" (alpha 0.5) included: it equalises
  the two terms' gradients at the logits, and this shows what is left of that over the parameters.

Printed per epoch as medians over the measured batches. Everything runs in --workdir (its own
MLflow store); the videos are the synthetic set.

    python benchmarks/bench_kd_grad_scale.py --root data/synthetic/ucf101 --epochs 6
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F


def grad_norm(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None))


def measure(student, teacher, x, y, tau: float) -> dict[str, float]:
    """The gradient norms on one batch (see the module docstring)."""
    from kdhar.objectives.kd import balance_scale, kd_term

    params = [p for p in student.parameters() if p.requires_grad]
    logits = student(x)
    with torch.no_grad():
        t_logits = teacher(x)
    ce, soft = F.cross_entropy(logits.float(), y), kd_term(logits, t_logits, tau)
    g_ce, g_soft = grad_norm(ce, params), grad_norm(soft, params)
    g_mix = grad_norm(0.5 * ce + 0.5 * soft, params)
    g_sum = grad_norm(ce + soft, params)
    g_bal = grad_norm(0.5 * ce + 0.5 * balance_scale(logits, t_logits, y, tau) * soft, params)
    return {"soft/ce": float(g_soft / g_ce), "mix/ce": float(g_mix / g_ce), "sum/ce": float(g_sum / g_ce),
            "balanced/ce": float(g_bal / g_ce),
            "ce": float(g_ce), "soft": float(g_soft)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="data/synthetic/ucf101")
    p.add_argument("--workdir", default="runs/bench-kd-grad-scale")
    p.add_argument("--teacher", default=None, help="models:/ or runs:/ URI; default: train a C3D at the CPU preset")
    p.add_argument("--student", default="tiny3d")
    p.add_argument("--fraction", type=float, default=0.25)
    p.add_argument("--epochs", type=int, default=6, help="student epochs (measured at each)")
    p.add_argument("--every", type=int, default=2, help="measure every n-th batch")
    p.add_argument("--tau", type=float, default=4.0)
    args = p.parse_args()

    root = str(Path(args.root).resolve())
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    from kdhar import tracking
    from kdhar.data.dataset import VideoClipDataset, make_loader
    from kdhar.data.splits import load_splits
    from kdhar.experiments import DatasetSpec, build_run_config
    from kdhar.models import build_model
    from kdhar.train import run_training

    torch.manual_seed(0)
    dataset = DatasetSpec("ucf101", root)
    teacher_uri = args.teacher
    if teacher_uri is None:
        cfg = build_run_config("c3d", size="cpu", overrides={"num_workers": 0}, dataset=dataset, fraction=1.0, seed=0)
        res = run_training(cfg, role="teacher", experiment="bench-kd-grad-scale", progress=False, register=False)
        teacher_uri = res.model_uri or f"runs:/{res.run_id}"
        print(f"teacher c3d: test video top-1 {100 * res.final['final_test_video_top1']:.1f} %")
    teacher = tracking.load_model(teacher_uri).eval()

    cfg = build_run_config(args.student, size="cpu", overrides={"num_workers": 0}, dataset=dataset,
                           fraction=args.fraction, seed=0)
    splits = load_splits(cfg)
    student = build_model(args.student, len(splits.classes), width=cfg.model.width, dropout=cfg.model.dropout)
    data = VideoClipDataset(splits.train, cfg.clip, train=True, seed=0)
    loader = make_loader(data, cfg.optim.batch_size, shuffle=True, num_workers=0, seed=0)
    # Trained with the default loss (mix, alpha 0.5) at the preset's lr, without warm-up or schedule:
    # the measurement is of the terms' scales along a distilled student's path, not of its recipe.
    opt = torch.optim.SGD(student.parameters(), lr=cfg.optim.lr, momentum=0.9, weight_decay=cfg.optim.weight_decay)
    print(f"student {args.student} width {cfg.model.width}, {len(splits.train.samples)} training videos, "
          f"tau {args.tau:g}; medians over one batch in {args.every}")
    print(f"{'epoch':>5} {'|g soft| / |g CE|':>18} {'mix / CE':>9} {'sum / CE':>9} {'balanced / CE':>14} {'|g CE|':>8} "
          f"{'batches':>8}")
    for epoch in range(args.epochs + 1):
        data.set_epoch(epoch)
        rows = []
        for i, batch in enumerate(loader):
            x, y = batch["clip"], batch["label"]
            student.train()
            if i % args.every == 0:
                rows.append(measure(student, teacher, x, y, args.tau))
            if epoch == 0:
                continue  # epoch 0 measures the untrained student only
            logits = student(x)
            with torch.no_grad():
                t_logits = teacher(x)
            from kdhar.objectives.kd import kd_term

            loss = 0.5 * F.cross_entropy(logits.float(), y) + 0.5 * kd_term(logits, t_logits, args.tau)
            opt.zero_grad()
            loss.backward()
            opt.step()
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        label = "init" if epoch == 0 else str(epoch)
        print(f"{label:>5} {med['soft/ce']:>18.2f} {med['mix/ce']:>9.2f} {med['sum/ce']:>9.2f} "
              f"{med['balanced/ce']:>14.2f} {med['ce']:>8.3f} {len(rows):>8}")


if __name__ == "__main__":
    main()
