import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from kdhar.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from kdhar.engine import make_scheduler, rng_state, set_rng_state, train_one_epoch
from kdhar.models import build_model
from kdhar.objectives import SupervisedStep


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this")


def leftovers(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_round_trip_of_plain_state(tmp_path):
    path = tmp_path / "sub" / "last.pt"
    state = {"epoch": 3, "history": [{"acc": 0.5}], "w": torch.arange(4.0), "name": "c3d", "rng": rng_state()}
    save_checkpoint(path, state)
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 3 and loaded["history"] == [{"acc": 0.5}] and loaded["name"] == "c3d"
    torch.testing.assert_close(loaded["w"], torch.arange(4.0))
    assert leftovers(path.parent) == []


def test_failed_serialisation_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 1})
    with pytest.raises(RuntimeError, match="cannot pickle"):
        save_checkpoint(path, {"epoch": 2, "big": torch.zeros(100_000), "bad": Unpicklable()})
    assert load_checkpoint(path) == {"epoch": 1}
    assert leftovers(tmp_path) == []


def test_non_plain_state_is_refused_before_replacing(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 1})
    with pytest.raises(CheckpointError, match=r"last\.pt.*pathlib"):
        save_checkpoint(path, {"epoch": 2, "root": tmp_path})
    assert load_checkpoint(path) == {"epoch": 1}
    assert leftovers(tmp_path) == []


WRITER = textwrap.dedent(
    """
    import resource, signal, sys, torch
    from kdhar.checkpoint import save_checkpoint
    path, kill = sys.argv[1], sys.argv[2] == "kill"
    save_checkpoint(path, {"epoch": 1, "w": torch.ones(10)})
    # Python ignores SIGXFSZ, so an oversized write fails with EFBIG; the default action kills instead.
    if kill:
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    # Files may now grow to 64 KiB only: the 4 MB checkpoint below dies part-way through.
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
    save_checkpoint(path, {"epoch": 2, "w": torch.ones(1_000_000)})
    """
)


@pytest.mark.parametrize("mode", ["kill", "error"], ids=["killed-mid-write", "write-error"])
def test_interrupted_write_leaves_the_previous_checkpoint_loadable(tmp_path, mode):
    path = tmp_path / "last.pt"
    proc = subprocess.run(
        [sys.executable, "-c", WRITER, str(path), mode],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    state = load_checkpoint(path)
    assert state["epoch"] == 1 and state["w"].shape == (10,)
    if mode == "error":
        assert "File too large" in proc.stderr
        assert leftovers(tmp_path) == []  # the error path removed its partial temp file
    else:
        assert proc.returncode == -signal.SIGXFSZ
        # The crash really happened mid-write: a partial temp file is all it left behind.
        partial = leftovers(tmp_path)
        assert len(partial) == 1 and (tmp_path / partial[0]).stat().st_size == 64 * 1024


SIGNALLED = textwrap.dedent(
    """
    import os, signal, sys, torch
    from mlflow import MlflowClient
    from kdhar.checkpoint import load_checkpoint, save_checkpoint
    from kdhar.tracking import RunTracker

    class SignalWhilePickled:
        # SIGTERM arrives while torch.save is writing the archive (deterministically, from pickling).
        def __reduce_ex__(self, protocol):
            os.kill(os.getpid(), signal.SIGTERM)
            return torch.full((1,), 7).__reduce_ex__(protocol)  # pickled as a plain tensor

    path = sys.argv[1]
    try:
        with RunTracker("signals", run_name="write") as run:
            run_id = run.run_id
            save_checkpoint(path, {"epoch": 1, "w": torch.ones(1000), "mark": SignalWhilePickled()})
            print("not reached: the signal must stop the run after the write")
    except SystemExit as exc:
        state = load_checkpoint(path)
        status = MlflowClient().get_run(run_id).info.status
        print(f"exit {exc.code} status {status} epoch {state['epoch']} mark {int(state['mark'])}")
    """
)


def test_sigterm_during_a_checkpoint_write_waits_for_it_and_ends_the_run_killed(tmp_path):
    # Raised inside torch.save, the signal used to break the archive writer: a RuntimeError and a
    # FAILED run.
    env = {**__import__("os").environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    proc = subprocess.run([sys.executable, "-c", SIGNALLED, str(tmp_path / "last.pt")], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == f"exit {128 + signal.SIGTERM} status KILLED epoch 1 mark 7"
    assert leftovers(tmp_path) == []


def test_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    # A real full disk: a 1 MiB tmpfs (needs root; skipped where mounting is not allowed).
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        path = mnt / "run" / "last.pt"
        save_checkpoint(path, {"epoch": 1, "w": torch.ones(10)})
        with pytest.raises(CheckpointError) as info:
            save_checkpoint(path, {"epoch": 2, "w": torch.zeros(600_000)})  # 2.4 MB
        assert str(info.value).startswith(f"disk full at {path.parent}: checkpoint not written, the previous one")
        assert load_checkpoint(path)["epoch"] == 1 and leftovers(path.parent) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_missing_checkpoint_names_the_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"nothere\.pt: checkpoint file not found"):
        load_checkpoint(tmp_path / "nothere.pt")


def test_corrupt_and_truncated_checkpoints_name_the_file(tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint(good, {"w": torch.ones(1000)})
    data = good.read_bytes()
    (tmp_path / "half.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    (tmp_path / "empty.pt").write_bytes(b"")
    for name in ("half.pt", "junk.pt", "empty.pt"):
        with pytest.raises(CheckpointError, match=rf"{name}: unreadable checkpoint"):
            load_checkpoint(tmp_path / name)


def test_resume_from_checkpoint_continues_identically(tmp_path):
    def batches(seed):
        g = torch.Generator().manual_seed(seed)
        return [{"clip": torch.randn(4, 3, 4, 16, 16, generator=g), "label": torch.randint(0, 3, (4,), generator=g)}]

    def make():
        model = build_model("tiny3d", num_classes=3, width=4, dropout=0.5)  # dropout consumes the torch RNG
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        return model, optimizer, make_scheduler(optimizer, "cosine", total_steps=4)

    torch.manual_seed(0)
    model, optimizer, scheduler = make()
    train_one_epoch(SupervisedStep(model), batches(1), optimizer, "cpu", scheduler=scheduler)
    save_checkpoint(
        tmp_path / "last.pt",
        {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
         "rng": rng_state()},
    )
    train_one_epoch(SupervisedStep(model), batches(2), optimizer, "cpu", scheduler=scheduler)

    torch.manual_seed(99)  # a different process state that the checkpoint must override
    resumed, optimizer2, scheduler2 = make()
    state = load_checkpoint(tmp_path / "last.pt")
    resumed.load_state_dict(state["model"])
    optimizer2.load_state_dict(state["optimizer"])
    scheduler2.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    train_one_epoch(SupervisedStep(resumed), batches(2), optimizer2, "cpu", scheduler=scheduler2)

    for a, b in zip(model.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert optimizer2.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]


def write_two_bests_killed_at(path, kill_at: int) -> None:
    """Checkpoints two epochs, each a new validation best, as the checkpoint listener does, and
    SIGKILLs this process from inside torch.save while best.pt of epoch `kill_at` is being written."""
    from kdhar.training.listeners.checkpoints import save_epoch

    epoch = 0

    class KillWhileWritingBest:
        def __reduce_ex__(self, protocol):
            if epoch == kill_at and any(path.parent.glob(".best.pt.*.tmp")):
                os.kill(os.getpid(), signal.SIGKILL)
            return torch.zeros(1).__reduce_ex__(protocol)  # pickled as a plain tensor

    history = []
    for epoch, val in ((1, 0.5), (2, 0.8)):
        history.append({"epoch": epoch, "val_video_top1": val})
        state = {"model": {"w": torch.full((4,), float(epoch)), "mark": KillWhileWritingBest()}, "epoch": epoch,
                 "history": list(history), "run_id": "r", "classes": ["a"], "arch": "tiny3d", "config": {},
                 "identity": {"role": "teacher", "method": "supervised", "teacher_uri": "", "teacher_run_id": ""}}
        save_epoch(path, state, history, None)


@pytest.mark.parametrize("kill_at", [1, 2], ids=["first-best", "later-best"])
def test_sigkill_while_writing_best_leaves_a_pair_that_resumes_and_the_next_start_clears_the_partial_file(
        tmp_path, kill_at):
    # best.pt used to be written after last.pt: killed in between, last.pt had the new best epoch
    # and best.pt the one before it (or nothing), and a resume never wrote the missing best again.
    from kdhar.training.listeners.checkpoints import Checkpointer
    from kdhar.training.loop import RunState

    run_dir = tmp_path / "checkpoints" / "r"
    pid = os.fork()  # a real process, killed for real; forked, so it needs no second torch import
    if pid == 0:
        try:
            write_two_bests_killed_at(run_dir / "last.pt", kill_at)
        finally:
            os._exit(3)  # never reached when the kill happens
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    partial = [p for p in leftovers(run_dir) if p.startswith(".best.pt.")]
    assert len(partial) == 1  # killed in the middle of best.pt's write
    # What a resume continues from: the epoch after last.pt's, with best.pt the best of last.pt's history.
    if (run_dir / "last.pt").exists():
        last = load_checkpoint(run_dir / "last.pt")
        best_epoch = max(last["history"], key=lambda h: h["val_video_top1"])["epoch"]
        assert load_checkpoint(run_dir / "best.pt")["epoch"] == best_epoch
        assert last["epoch"] == kill_at - 1  # the killed epoch trains again and finds its best again
    else:
        assert kill_at == 1 and not (run_dir / "best.pt").exists()  # nothing kept: the run starts afresh

    # The resumed run's checkpointer clears what the killed write left.
    Checkpointer(tmp_path).on_run_start(RunState(prep=None, tracker=None, run_id="r", history=[]))
    assert leftovers(run_dir) == []
