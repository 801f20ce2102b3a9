"""Data-parallel training under torchrun: one process per device, gradients averaged every step.

`setup()` returns None outside torchrun (or with one process), so a plain run never touches
`torch.distributed`. Under `torchrun --nproc-per-node N -m kdhar ...` every rank builds the same
model from the same seed; rank 0 broadcasts its weights and buffers so all ranks start equal, each
rank trains on its share of every global batch (`shard` of the single-process order, so the global
batches are the single-process ones), and the gradients are all-reduced (averaged) in one flat
buffer after each backward pass, before clipping and the optimiser step. That works for any step
module, including GKD's two passes whose trained parameters change between passes, which
DistributedDataParallel's fixed gradient hooks would not. BatchNorm statistics are per rank (over
the rank's part of the batch) unless `--sync-bn` converts them to SyncBatchNorm, which needs CUDA;
rank 0's running statistics are broadcast after each epoch so every rank holds one model.

Only rank 0 talks to MLflow, writes checkpoints and registers models; it evaluates and broadcasts
the epoch's metrics. Backend: nccl on CUDA, gloo on CPU.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Distributed:
    """This process's place in a torchrun job."""

    rank: int
    world: int
    local_rank: int
    restarts: int = 0  # how often torchrun has restarted this job (see `setup`)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """The rank's own GPU on CUDA (cuda:LOCAL_RANK); the CPU otherwise."""
        if device.type == "cuda":
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return device

    def per_rank_batch(self, batch: int) -> int:
        """The rank's share of the configured (global) batch.

        Raises:
            ValueError: the batch does not divide by the number of processes.
        """
        if batch % self.world:
            raise ValueError(f"--batch-size {batch} does not divide by the {self.world} processes: the global batch "
                             f"stays the configured one, so give a multiple of {self.world} (e.g. "
                             f"{max(self.world, batch - batch % self.world)})")
        return batch // self.world

    def broadcast_module(self, module: nn.Module, buffers_only: bool = False) -> None:
        """Rank 0's parameters (unless `buffers_only`) and buffers, copied to every rank."""
        with torch.no_grad():
            tensors = list(module.buffers()) if buffers_only else [*module.parameters(), *module.buffers()]
            for t in tensors:
                dist.broadcast(t.data, src=0)

    def sync_grads(self, params: Iterable[nn.Parameter]) -> None:
        """Averages the gradients over the ranks, in one flat buffer (one collective per step)."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset:offset + n].view_as(g))
            offset += n

    def reduce_stats(self, stats: dict[str, Any]) -> dict[str, Any]:
        """An epoch's training statistics over all ranks: losses and accuracies weighted by each
        rank's clips, clips and skipped videos summed, the slowest rank's seconds."""
        clips = float(stats["clips"])
        keys = sorted(k for k, v in stats.items() if isinstance(v, (int, float)))
        local = torch.tensor([float(stats[k]) * (clips if _weighted(k) else 1.0) for k in keys] + [clips],
                             dtype=torch.float64)
        total = local.clone()
        dist.all_reduce(total)
        slowest = torch.tensor([float(stats.get("seconds", 0.0))], dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        n = total[-1].item()
        out = dict(stats)
        for k, value in zip(keys, total[:-1].tolist()):
            # per-clip means weighted by clips; each rank's first-batch loss averaged; counts summed
            out[k] = value / n if _weighted(k) else value / self.world if k.startswith("first_") else value
        out["clips"] = int(n)
        out["seconds"] = slowest.item()
        out["clips_per_s"] = n / out["seconds"] if out["seconds"] > 0 else math.nan
        return out

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (metrics, a run id)."""
        box = [value if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def gather_rows(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every rank's rows of `tensors` (one batch's worth each, the same number of rows per tensor
    within a rank), concatenated in rank order; the tensors themselves outside a job of several
    processes.

    What a step keeps per training video beyond the weights (PCL's memory banks) must see every
    rank's samples, or each rank's copy drifts from the single-process one. Ranks may hold different
    numbers of rows (a last, shorter batch): each pads to the largest and the padding is dropped.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensors
    world = dist.get_world_size()
    count = torch.tensor([tensors[0].shape[0]], dtype=torch.int64, device=tensors[0].device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    gathered = []
    for t in tensors:
        padded = t.new_zeros((max(sizes), *t.shape[1:]))
        padded[:t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        gathered.append(torch.cat([part[:n] for part, n in zip(parts, sizes)]))
    return tuple(gathered)


def _weighted(key: str) -> bool:
    """Statistics that are per-clip means (weighted by clips when combined); the rest are counts."""
    return key.endswith(("loss", "acc")) and not key.startswith("first_")


def setup(device: torch.device) -> Distributed | None:
    """Joins the torchrun job this process belongs to (WORLD_SIZE > 1), or returns None.

    The job's restart count is the largest over the ranks: each node's torchrun counts only the
    restarts it caused, and one whose processes were restarted because another node's died counts
    none, yet every rank must agree on whether the job continues a checkpoint.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    ctx = Distributed(rank=int(os.environ["RANK"]), world=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    if ctx.main and _restart_count() == 0 and shared_store_breaks_restarts():
        print(f"kdhar: warning: {SHARED_STORE_WARNING}", file=sys.stderr, flush=True)
    device = ctx.device(device)  # before joining: nccl binds each rank to its own GPU
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    count = torch.tensor([_restart_count()], dtype=torch.int64, device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    ctx.restarts = int(count.item())
    return ctx


# torchrun's c10d rendezvous hands its own key-value store to the ranks (unless
# TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1) and keeps it across restarts, so the restarted ranks find
# the dead ranks' addresses still there: gloo or nccl then connects to a port nobody listens on
# ("connectFullMesh failed ... Connection refused") or waits on keys of the last attempt, and the
# restart fails or hangs (pytorch/pytorch#135712). With the variable set, every attempt's rank 0
# serves a fresh store.
SHARE_STORE_VAR = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"
SHARED_STORE_WARNING = (f"torchrun shares its rendezvous store with the processes and keeps it across restarts, so a "
                        f"restart after a process dies can fail to reconnect; start torchrun with {SHARE_STORE_VAR}=1 "
                        f"in its environment (kdhar --nproc does) for --max-restarts to work")


def launcher_env(env: dict[str, str]) -> dict[str, str]:
    """The environment `kdhar ... --nproc N` starts torchrun with: restarts get a fresh store."""
    return {**env, SHARE_STORE_VAR: env.get(SHARE_STORE_VAR, "1")}


def shared_store_breaks_restarts() -> bool:
    """Whether this job may be restarted (--max-restarts > 0) while its torchrun shares its store."""
    return (os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0)


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm layers synchronised over the ranks (`--sync-bn`); SyncBatchNorm runs on CUDA only.

    Raises:
        ValueError: asked for on a CPU run.
    """
    if device.type != "cuda":
        raise ValueError("--sync-bn needs CUDA (torch's SyncBatchNorm has no CPU kernel); leave it out on CPU, "
                         "where each rank's BatchNorm sees its share of the batch")
    return nn.SyncBatchNorm.convert_sync_batchnorm(module)


# -- elastic restarts --------------------------------------------------------------------------
# torchrun restarts every rank after one fails (--max-restarts). The job's rank 0 records its
# checkpoint under the job's rendezvous id; rank 0 of a restarted job (`Distributed.restarts` > 0)
# loads it and hands the state to the other ranks, so its MLflow run continues rather than
# starting again, and every rank continues from the same epoch, weights and optimiser state.


def _session_path(workdir: str | Path) -> Path:
    job = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in job)[:80]
    return Path(workdir) / "elastic" / f"{safe}.json"


def _restart_count() -> int:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def record_checkpoint(workdir: str | Path, checkpoint: Path) -> None:
    """Rank 0: where this job's checkpoint is, for a restart of the job."""
    path = _session_path(workdir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"checkpoint": str(checkpoint)}))
    os.replace(tmp, path)


def forget_job(workdir: str | Path) -> None:
    """A job's first start: an earlier job's record under the same rendezvous id is not ours."""
    _session_path(workdir).unlink(missing_ok=True)


def job_checkpoint(workdir: str | Path) -> str | None:
    """Rank 0 of a restarted job: the checkpoint its earlier attempts wrote last, if any."""
    path = _session_path(workdir)
    if not path.exists():
        return None
    checkpoint = json.loads(path.read_text())["checkpoint"]
    return checkpoint if Path(checkpoint).exists() else None


class NullTracker:
    """What ranks other than 0 use in place of a `RunTracker`: every call does nothing."""

    def __init__(self, run_id: str, run_name: str | None = None) -> None:
        self.run_id, self.run_name = run_id, run_name

    def __enter__(self) -> NullTracker:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None
