"""Data-parallel training under torchrun (gloo on CPU): the sharded global batches and averaged
gradients reproduce single-process training, a `--nproc 2` run is one FINISHED MLflow run, and a
job whose rank dies is restarted (--max-restarts) and finishes from its checkpoint."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from kdhar.data.synthetic import SynthSpec, generate
from tests.conftest import SEVERAL_PROCESSES, _free_port

pytestmark = SEVERAL_PROCESSES  # two ranks or a torchrun job each, and a restart waited on with a deadline

CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                               "MASTER_PORT", "TORCHELASTIC_RUN_ID")}


class _Items(torch.utils.data.Dataset):
    """12 fixed clips with labels; `view` and `train` as the sampler expects of a kdhar dataset."""

    view, train = 0, True

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(12, 3, 4, 8, 8, generator=g)
        self.y = torch.arange(12) % 3

    def __len__(self) -> int:
        return 12

    def __getitem__(self, key):
        i, _view = key
        return self.x[i], self.y[i]


def _net() -> nn.Module:
    torch.manual_seed(0)  # no BatchNorm: its per-process statistics are the one thing ranks may not share
    return nn.Sequential(nn.Conv3d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(2), nn.Flatten(1), nn.Linear(4 * 256, 3))


def _train(rank: int, world: int, port: int, out: str) -> None:
    from kdhar.data.dataset import EpochSampler
    from kdhar.distributed import Distributed

    torch.set_num_threads(1)
    ddp = None
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
        ddp = Distributed(rank=rank, world=world, local_rank=rank)
    data, net = _Items(), _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    batch = 6 // world  # global batch 6
    sampler = EpochSampler(data, shuffle=True, seed=3, shard=(rank, world, batch) if ddp else None)
    for _epoch in range(2):
        idx = list(sampler)
        for start in range(0, len(idx) - len(idx) % batch, batch):
            keys = [i for i, _ in idx[start:start + batch]]
            loss = nn.functional.cross_entropy(net(data.x[keys]), data.y[keys])
            opt.zero_grad()
            loss.backward()
            if ddp:
                ddp.sync_grads(list(net.parameters()))
            opt.step()
    if rank == 0:
        torch.save(net.state_dict(), out)
    if ddp:
        ddp.close()


def test_two_ranks_on_shards_of_each_global_batch_reproduce_single_process_training(tmp_path):
    single, double = tmp_path / "one.pt", tmp_path / "two.pt"
    _train(0, 1, 0, str(single))
    port = _free_port()  # a fixed or pid-derived port can be taken by a parallel test worker
    mp.start_processes(_train, args=(2, port, str(double)), nprocs=2, start_method="spawn")
    a, b = torch.load(single), torch.load(double)
    for k in a:  # the same weights after 4 steps of 2 epochs, up to float summation order
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def _restarts(rank: int, port: int, counts: tuple[int, int], out: str) -> None:
    from kdhar.distributed import setup

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      TORCHELASTIC_RESTART_COUNT=str(counts[rank]))
    ctx = setup(torch.device("cpu"))
    Path(out, f"rank{rank}").write_text(str(ctx.restarts))
    ctx.close()


def test_the_ranks_agree_the_job_restarted_when_only_one_nodes_torchrun_counted_the_restart(tmp_path):
    # torchrun counts only the restarts it caused: the node whose process died says 1, a node whose
    # processes were restarted to rejoin says 0. Each rank deciding alone would resume on one rank
    # and start afresh on the other.
    port = _free_port()
    mp.start_processes(_restarts, args=(port, (0, 1), str(tmp_path)), nprocs=2, start_method="spawn")
    assert [(tmp_path / f"rank{r}").read_text() for r in range(2)] == ["1", "1"]


def _bank_updates(rank: int, world: int, port: int, out: str) -> None:
    """Three global batches of 5 samples through PCL's memory banks; with two ranks, rank 0 scores
    the first 3 samples of each and rank 1 the last 2."""
    import torch.nn.functional as F

    from kdhar.objectives.contrast import MemoryBankNCE

    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)  # every rank starts from the same banks, as prepare's broadcast leaves them
    nce = MemoryBankNCE(10, dim=4, negatives=3)
    g = torch.Generator().manual_seed(1)
    part = slice(0, 5) if world == 1 else (slice(0, 3) if rank == 0 else slice(3, 5))
    for _ in range(3):
        index = torch.randperm(10, generator=g)[:5]
        z0, z2 = (F.normalize(torch.randn(5, 4, generator=g), dim=1) for _ in range(2))
        nce(z0[part], z2[part], index[part])
    torch.save({"bank0": nce.bank0, "bank2": nce.bank2}, Path(out) / f"bank{world}-{rank}.pt")
    if world > 1:
        torch.distributed.destroy_process_group()


def test_two_ranks_update_the_memory_banks_with_the_whole_global_batch_as_one_process_does(tmp_path):
    _bank_updates(0, 1, 0, str(tmp_path))
    mp.start_processes(_bank_updates, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    single = torch.load(tmp_path / "bank1-0.pt")
    for rank in range(2):  # each rank holds every rank's updates, uneven shares included
        banks = torch.load(tmp_path / f"bank2-{rank}.pt")
        for name in ("bank0", "bank2"):
            torch.testing.assert_close(banks[name], single[name], rtol=0, atol=1e-6)


def test_each_rank_gets_its_part_of_every_global_batch():
    from kdhar.data.dataset import EpochSampler

    data = _Items()
    whole = [i for i, _ in EpochSampler(data, True, 5)]
    parts = [[i for i, _ in EpochSampler(data, True, 5, shard=(r, 2, 2))] for r in range(2)]
    assert all(len(p) == len(EpochSampler(data, True, 5, shard=(0, 2, 2))) == 6 for p in parts)  # 3 global batches of 4
    for k in range(3):  # global batch k of 4 = rank 0's k-th pair + rank 1's k-th pair
        assert sorted(parts[0][2 * k:2 * k + 2] + parts[1][2 * k:2 * k + 2]) == sorted(whole[4 * k:4 * k + 4])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    generate(root / "ucf101", layout="ucf101", spec=SynthSpec(num_classes=3, groups=8, clips_per_group=2, frames=8,
                                                              size=(32, 48), seed=4))
    return root


def _distill(root: Path, workdir: Path, *extra: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**CLEAN_ENV, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}", "PYTHONPATH": str(Path(__file__).parents[1])}
    argv = [sys.executable, "-m", "kdhar", "distill", "--teacher", "none", "--student", "tiny3d", "--width", "4",
            "--clip-len", "4", "--crop", "32", "--batch-size", "8", "--num-workers", "0", "--threads", "1",
            "--root", str(root / "ucf101"), "--experiment", "ddp", *extra]
    return subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)


def _runs(workdir: Path):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("ddp")
    return client, client.search_runs([exp.experiment_id])


def test_nproc_0_and_negative_restarts_are_refused_in_one_line(tiny, tmp_path):
    for extra, bad in ((("--nproc", "0"), "--nproc 0"), (("--max-restarts", "-1"), "--max-restarts -1")):
        done = _distill(tiny, tmp_path, "--epochs", "1", *extra)
        assert done.returncode == 2, done.stderr[-2000:]
        [line] = done.stderr.strip().splitlines()
        assert line.startswith("Error: ") and bad in line and "--nproc >= 1" in line


@pytest.mark.slow
def test_nproc_2_is_one_finished_run_close_to_the_single_process_one(tiny, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    single = _distill(tiny, one, "--epochs", "2")
    assert single.returncode == 0, single.stderr[-3000:]
    double = _distill(tiny, two, "--epochs", "2", "--nproc", "2")
    assert double.returncode == 0, double.stderr[-3000:]
    (_, [a]), (_, runs) = _runs(one), _runs(two)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # rank 1 logged nothing of its own
    b = runs[0]
    assert b.data.tags["world_size"] == "2" and b.data.params["optim.batch_size"] == "8"  # the global batch
    # Each process normalises BatchNorm over its half of the batch (SyncBatchNorm is CUDA-only), so
    # the two runs are close, not equal: the same test-loss to within 0.05 nats and video accuracy
    # to within 2 of the test videos.
    tests = int(a.data.params["test_videos"])
    assert abs(a.data.metrics["final_test_loss"] - b.data.metrics["final_test_loss"]) < 0.05
    assert abs(a.data.metrics["final_test_video_top1"] - b.data.metrics["final_test_video_top1"]) <= 2 / tests + 1e-9
    odd = _distill(tiny, two, "--epochs", "1", "--nproc", "2", "--batch-size", "7")
    # refused by the launcher, before torchrun starts: one line, no traceback of torchrun's
    assert odd.returncode != 0 and "does not divide by the 2 processes" in odd.stderr and "Traceback" not in odd.stderr


def _rank_pid(rank: int, cwd: Path) -> int | None:
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
            if f"RANK={rank}".encode() in env and os.readlink(proc / "cwd") == str(cwd):
                if b"kdhar" in (proc / "cmdline").read_bytes():
                    return int(proc.name)
        except OSError:
            continue
    return None


def _kill_rank_1_mid_run(root: Path, workdir: Path, max_restarts: int) -> tuple[int, str]:
    """Starts an 8-epoch `distill --nproc 2` job, SIGKILLs its rank 1 once the first checkpoint is
    written, and returns the job's exit status and output."""
    env = {**CLEAN_ENV, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}", "PYTHONPATH": str(Path(__file__).parents[1])}
    argv = [sys.executable, "-m", "kdhar", "distill", "--teacher", "none", "--student", "tiny3d", "--width", "4",
            "--clip-len", "4", "--crop", "32", "--batch-size", "8", "--num-workers", "0", "--threads", "1",
            "--root", str(root / "ucf101"), "--experiment", "ddp", "--epochs", "8", "--nproc", "2",
            "--max-restarts", str(max_restarts)]
    job = subprocess.Popen(argv, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)  # torchrun and its ranks in one group, to end them all below
    try:
        deadline = time.time() + 240
        while not list(workdir.glob("runs/checkpoints/*/last.pt")) and time.time() < deadline and job.poll() is None:
            time.sleep(0.2)
        assert list(workdir.glob("runs/checkpoints/*/last.pt")), "no checkpoint was written"
        pid = _rank_pid(1, workdir)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)  # mid-run: one rank dies outright
        out, _ = job.communicate(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)  # nothing of a failed job left to load the machine
    return job.returncode, out


@pytest.mark.slow
def test_a_killed_rank_restarts_the_job_which_finishes_the_run_from_its_checkpoint(tiny, tmp_path):
    # Before the launcher gave torchrun TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, about half of these
    # restarts failed or hung: the restarted ranks read the dead ranks' addresses from the store
    # torchrun kept across attempts.
    code, out = _kill_rank_1_mid_run(tiny, tmp_path, max_restarts=1)
    assert code == 0, out[-3000:]
    assert "shares its rendezvous store" not in out  # the launcher's torchrun gives each attempt a fresh store
    assert "restarted job: resuming from" in out
    client, runs = _runs(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", [(r.info.run_name, r.info.status) for r in runs]
    run = runs[0]
    assert run.data.tags.get("elastic_restarts") == "1"
    epochs = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
    # Every epoch in the end, the first attempt's kept; the epoch the kill interrupted may have
    # been logged before its checkpoint was written, and is then logged again.
    assert sorted(set(epochs)) == list(range(1, 9)) and len(epochs) <= 9


@pytest.mark.slow
def test_a_killed_rank_without_restarts_fails_the_job_and_ends_its_run(tiny, tmp_path):
    code, out = _kill_rank_1_mid_run(tiny, tmp_path, max_restarts=0)
    assert code != 0
    _, runs = _runs(tmp_path)
    assert [r.info.status for r in runs] in (["FAILED"], ["KILLED"]), out[-3000:]  # never left RUNNING
