"""Training throughput per architecture, how close a step gets to this machine's matmul FLOP/s,
and what per-step tracking to a real local MLflow server costs.

    python benchmarks/bench_train.py                  # CPU size (width 8, 8x56x56 clips, batch 16)
    python benchmarks/bench_train.py --device cuda --width 64 --clip-len 16 --crop 112

Everything is measured in one run, interleaved, and reported as medians: the machine is shared.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from kdhar.engine import train_one_epoch, train_step
from kdhar.models import MODELS, build_model
from kdhar.objectives import SupervisedStep


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_flops(device: torch.device, n: int, repeats: int = 5) -> float:
    """FLOP/s of a large square matmul: the practical ceiling for dense work on this device."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


def batch(args, device: torch.device, classes: int) -> dict:
    return {
        "clip": torch.randn(args.batch, 3, args.clip_len, args.crop, args.crop, device=device),
        "label": torch.randint(0, classes, (args.batch,), device=device),
    }


def step_flops(arch: str, args, classes: int) -> int:
    model = build_model(arch, classes, width=args.width)
    step = SupervisedStep(model)
    b = batch(args, torch.device("cpu"), classes)
    with FlopCounterMode(display=False) as counter:
        step(b["clip"], b["label"])["loss"].backward()
    return counter.get_total_flops()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(workdir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen(
        [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{workdir / 'bench.db'}", "--serve-artifacts",
         "--artifacts-destination", str(workdir / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    import requests

    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if requests.get(f"{uri}/health", timeout=1).ok:
                return proc, uri
        except requests.RequestException:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("mlflow server did not start within 180 s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--archs", default=",".join(MODELS))
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--clip-len", type=int, default=8)
    p.add_argument("--crop", type=int, default=56)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=6, help="timed steps per architecture and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epoch-steps", type=int, default=40, help="steps of the tracked/untracked epoch")
    p.add_argument("--matmul", type=int, default=2048)
    p.add_argument("--log-every", type=int, default=10, help="steps between metric calls (training runs use 10)")
    args = p.parse_args()
    device = torch.device(args.device)
    classes = 10
    print(f"device {device}, threads {torch.get_num_threads()}, batch {args.batch}x3x{args.clip_len}x{args.crop}x{args.crop}, width {args.width}")

    archs = args.archs.split(",")
    steps = {}
    for arch in archs:
        model = build_model(arch, classes, width=args.width).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        steps[arch] = (SupervisedStep(model), opt)
        train_step(steps[arch][0], batch(args, device, classes), opt, device)  # warm-up
    times: dict[str, list[float]] = {a: [] for a in archs}
    peak = []
    for _ in range(args.rounds):  # interleaved rounds: load changes hit every architecture alike
        peak.append(matmul_flops(device, args.matmul))
        for arch in archs:
            step, opt = steps[arch]
            b = batch(args, device, classes)
            sync(device)
            t = time.perf_counter()
            for _ in range(args.steps):
                train_step(step, b, opt, device)
            sync(device)
            times[arch].append((time.perf_counter() - t) / args.steps)
    ceiling = statistics.median(peak)
    print(f"matmul {args.matmul}^2: {ceiling / 1e9:.1f} GFLOP/s")
    print(f"{'arch':<13}{'clips/s':>9}{'GFLOP/step':>12}{'GFLOP/s':>9}{'of matmul':>11}")
    for arch in archs:
        sec = statistics.median(times[arch])
        flops = step_flops(arch, args, classes)
        print(f"{arch:<13}{args.batch / sec:>9.1f}{flops / 1e9:>12.2f}{flops / sec / 1e9:>9.1f}{flops / sec / ceiling:>10.1%}")

    # Tracking overhead: the same epoch with per-step metrics sent to a real local server, or not.
    arch = archs[0]
    data = [batch(args, device, classes) for _ in range(4)]
    loader = [data[i % 4] for i in range(args.epoch_steps)]
    with tempfile.TemporaryDirectory() as tmp:
        proc, uri = start_server(Path(tmp))
        os.environ["MLFLOW_TRACKING_URI"] = uri
        from kdhar import tracking

        try:
            plain, tracked = [], []
            with tracking.RunTracker("bench-train", run_name="overhead") as tracker:
                for _ in range(args.rounds):
                    step, opt = steps[arch]
                    t = time.perf_counter()
                    train_one_epoch(step, loader, opt, device, progress=False, log_every=args.log_every)
                    plain.append(time.perf_counter() - t)
                    t = time.perf_counter()
                    train_one_epoch(step, loader, opt, device, progress=False, log_every=args.log_every,
                                    log=lambda m, s: tracker.log_metrics(m, step=s))
                    tracked.append(time.perf_counter() - t)
                t = time.perf_counter()
                tracker.flush()
                flush = time.perf_counter() - t
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    a, b = statistics.median(plain), statistics.median(tracked)
    print(f"epoch of {args.epoch_steps} {arch} steps, metrics every {args.log_every} steps: untracked {a:.2f} s, "
          f"tracked to local mlflow server {b:.2f} s, overhead {(b - a) / a:+.1%} (final flush {flush:.2f} s)")


if __name__ == "__main__":
    main()
