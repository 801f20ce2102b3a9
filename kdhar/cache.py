"""Teacher-logit cache: the teacher's outputs for a fixed set of replayable training views.

Tuning runs dozens of students against one teacher on the same data. Each training item's view
(clip start, crop box, flip, colour draw) is a pure function of (seed, view, index), so the teacher
can score every (view, index) once; a student trained with `num_views=V` then replays exactly those
views and looks its teacher logits up instead of running the teacher.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from torch.utils.data import DataLoader

from kdhar.checkpoint import load_checkpoint, save_checkpoint
from kdhar.config import RunConfig
from kdhar.data.dataset import EpochSampler, VideoClipDataset, collate_clips
from kdhar.data.splits import load_splits
from kdhar.engine import pick_device
from kdhar.models import Teacher


@dataclass
class TeacherLogitCache:
    key: str
    logits: torch.Tensor  # (views, videos, classes), float32 on the CPU

    def lookup(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.logits[batch["view"], batch["index"]]

    @classmethod
    def build(
        cls, teacher: Teacher, cfg: RunConfig, views: int, device: str | None = None, cache_dir: str | Path = "runs/cache"
    ) -> "TeacherLogitCache":
        """Loads the cache for this teacher/data/view set, computing and saving it on first use."""
        splits = load_splits(cfg)
        ident = {
            "teacher": teacher.uri,
            "teacher_run": teacher.run_id,
            # A checkpoint rewritten at the same path (or a re-registered alias) is another teacher.
            "teacher_weights": weights_digest(teacher.model),
            "videos": [str(s.path) for s in splits.train.samples],
            "clip": cfg.params(kd=False),
            "views": views,
        }
        ident["clip"] = {k: v for k, v in ident["clip"].items() if k.startswith(("clip.", "optim.seed", "data."))}
        ident["clip"].pop("data.num_workers", None)  # how many loader processes changes no logit
        key = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:20]
        path = Path(cache_dir) / f"teacher-logits-{key}.pt"
        if path.exists():
            return cls(key=key, logits=load_checkpoint(path)["logits"])
        logits = compute_logits(teacher.model, splits.train, cfg, views, pick_device(device))
        save_checkpoint(path, {"logits": logits, "key": key})
        return cls(key=key, logits=logits)


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 over a model's parameters and buffers (names, shapes, dtypes and bytes)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@torch.inference_mode()
def compute_logits(model: torch.nn.Module, index, cfg: RunConfig, views: int, device: torch.device) -> torch.Tensor:
    ds = VideoClipDataset(index, cfg.clip, train=True, seed=cfg.optim.seed, on_bad=cfg.data.on_bad, num_views=views)
    model = model.to(device).eval()
    out: torch.Tensor | None = None
    for view in range(views):
        ds.set_epoch(view)
        # Every item, the last partial batch included (training loaders drop it).
        loader = DataLoader(
            ds, cfg.optim.batch_size, sampler=EpochSampler(ds, False, cfg.optim.seed),
            num_workers=cfg.data.num_workers, collate_fn=collate_clips,
        )
        for batch in loader:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(batch["clip"].to(device)).float().cpu()
            if out is None:
                out = torch.zeros(views, len(ds), logits.shape[1])
            out[batch["view"], batch["index"]] = logits
    assert out is not None, "empty training set"
    return out
