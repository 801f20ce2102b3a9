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
