"""Everything a run needs before its first epoch: the objective, device and processes, the checkpoint
it continues, data views and loaders, model and step, optimisers and schedule."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdhar import distributed
from kdhar.config import OptimConfig, RunConfig, check_run_config
from kdhar.data.dataset import ReplayLoader, VideoClipDataset, make_loader
from kdhar.engine import Plateau, make_scheduler, pick_device, set_determinism, set_rng_state
from kdhar.models import build_model
from kdhar.objectives import Objective, build_objective
from kdhar.training.resume import checkpoint_to_resume, load_init_weights, run_identity
from kdhar.training.scoring import ClipEvaluation
from kdhar.training.splits import Splits, check_same_classes, load_splits

# Decoded evaluation clips kept in memory between epochs, per split (the CPU preset's test split is
# ~100 MB; a paper-size one does not fit and is decoded every epoch as before).
EVAL_REPLAY_BYTES = 512 * 2**20
# Decoded training videos kept in memory per process (uint8 at the decoder's size): the synthetic
# UCF101 train split is ~370 MB at the CPU preset, so its epochs after the first decode nothing;
# UCF101 itself does not fit and is decoded as before once the budget is spent.
TRAIN_FRAME_CACHE_BYTES = 1024 * 2**20


@dataclass
class TrainingView:
    """What a run trains on (its objective's view of the training videos) and the fixed set its
    step validates on each epoch, if the objective has one."""

    train: Any
    validation: Any = None
    too_short: int = 0  # training videos the view left out

    @classmethod
    def build(cls, objective: Objective, cfg: RunConfig, splits: Splits) -> TrainingView:
        """Raises ValueError when no training video can give the view a sample."""
        seed = cfg.optim.seed
        if objective.make_data is None:
            return cls(VideoClipDataset(splits.train, cfg.clip, train=True, seed=seed, on_bad=cfg.data.on_bad,
                                        num_views=cfg.data.views or None, cache_bytes=TRAIN_FRAME_CACHE_BYTES))
        train = objective.make_data(splits.train, seed, TRAIN_FRAME_CACHE_BYTES)
        validation = objective.make_validation(splits.test, seed) if objective.make_validation else None
        return cls(train, validation, getattr(train, "too_short", 0))


@dataclass
class Optimisers:
    """The "net" pass's SGD, schedule and plateau, and the optimisers of a step's other passes."""

    net: torch.optim.Optimizer
    side: dict[str, torch.optim.Optimizer]
    scheduler: torch.optim.lr_scheduler.LRScheduler
    plateau: Plateau | None

    @classmethod
    def build(cls, step: nn.Module, optim: OptimConfig, steps_per_epoch: int, kind: str = "sgd") -> Optimisers:
        """A step may train in several passes per epoch, each over the whole training set with its
        own parameters (see the step's `passes`); "net" is the pass the configured optimiser (`kind`:
        SGD with momentum, or Adam with betas (0.9, 0.999) as GKD's detection code), schedule and
        warm-up drive, the others bring their optimiser."""
        passes = getattr(step, "passes", ("net",))
        net_params = step.pass_parameters("net") if len(passes) > 1 else step.parameters()
        # Over the step's parameters: the model's and any heads of the method's own.
        if kind == "adam":
            net = torch.optim.Adam(net_params, lr=optim.lr, betas=(0.9, 0.999), weight_decay=optim.weight_decay)
        else:
            net = torch.optim.SGD(net_params, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
        side = {name: step.pass_optimizer(name) for name in passes if name != "net"}
        plateau = (Plateau(optim.lr, patience=optim.plateau_patience, threshold=optim.plateau_threshold)
                   if optim.schedule == "plateau" else None)
        scheduler = make_scheduler(net, optim.schedule, optim.epochs * steps_per_epoch,
                                   round(optim.warmup * steps_per_epoch), plateau)
        return cls(net, side, scheduler, plateau)

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.net.state_dict(),
            "side_optimizers": {name: side.state_dict() for name, side in self.side.items()},
            "scheduler": self.scheduler.state_dict(),
            **({"plateau": self.plateau.state_dict()} if self.plateau is not None else {}),
        }

    def follow_schedule(self) -> None:
        """Sets the "net" pass's lr to what the schedule gives at the step reached. A resume that
        changed the number of epochs built the schedule for the new total, but the restored
        optimiser holds the old schedule's last lr (0 at the end of a finished cosine run), which
        the first resumed step would otherwise use."""
        at = self.scheduler.last_epoch
        for group, base, factor in zip(self.net.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas):
            group["lr"] = base * factor(at)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["optimizer"])
        for name, side in self.side.items():
            side.load_state_dict(state["side_optimizers"][name])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.plateau is not None and "plateau" in state:
            self.plateau.load_state_dict(state["plateau"])


@dataclass
class Prepared:
    """What the loop and its listeners need, built once before the run is opened."""

    cfg: RunConfig
    role: str
    objective: Objective
    splits: Splits
    view: TrainingView
    device: torch.device
    ddp: distributed.Distributed | None
    step: nn.Module  # what trains: the model with the objective's parts
    model: nn.Module  # the network as trained and logged
    optimisers: Optimisers
    train_loader: Any
    evaluation: Any  # how the model is scored (kdhar.training.scoring)
    eval_loaders: dict[str, ReplayLoader]  # scored each epoch as <name>_*: "test", "val"
    val_loader: ReplayLoader | None  # the objective's own validation set
    resume: str | None  # the checkpoint continued, if any
    changed: dict[str, tuple]  # configuration changes accepted on resume
    det_note: str  # what remains non-deterministic
    progress: bool
    start_epoch: int = 0
    history: list[dict[str, float]] | None = None
    run_id: str | None = None  # the run re-opened on resume
    init: str | None = None  # where the initial weights came from (--init), if anywhere

    @property
    def main(self) -> bool:
        """Whether this process scores, checkpoints and records (rank 0, or the only process)."""
        return self.ddp is None or self.ddp.main

    @property
    def num_classes(self) -> int:
        return len(self.splits.classes)


def prepare(cfg: RunConfig, *, role: str, objective: Objective | None = None,
            init_state: dict[str, torch.Tensor] | None = None, init: str | None = None, resume: str | None = None,
            allow_config_change: bool = False, workdir: str | Path = "runs", device: str | None = None,
            progress: bool = True) -> Prepared:
    """Checks and builds everything a run needs; see `kdhar.train.run_training` for the arguments.

    Raises:
        ValueError: a bad configuration, device, dataset, teacher or checkpoint (one line each).
    """
    check_run_config(cfg)
    objective = objective or build_objective(cfg)
    dev = pick_device(device)
    ddp = distributed.setup(dev)
    if ddp is not None:
        dev = ddp.device(dev)
        progress = progress and ddp.main
    resume, state, changed = checkpoint_to_resume(cfg, f"{role} {cfg.model.arch}", run_identity(role, objective),
                                                  ddp, resume, workdir, allow_config_change)
    torch.set_num_threads(cfg.optim.threads)
    det_note = set_determinism(cfg.optim.seed, cfg.optim.deterministic)
    splits = load_splits(cfg)
    if objective.teacher is not None:
        check_same_classes(f"teacher {objective.teacher.uri}", objective.teacher.classes, splits.classes)
    view = TrainingView.build(objective, cfg, splits)
    evaluation = objective.evaluation or ClipEvaluation(cfg, splits.classes)
    train_loader, eval_loaders, val_loader = _loaders(cfg, objective, evaluation, splits, view, dev, ddp)
    if objective.make_model is not None:
        model = objective.make_model(len(splits.classes))
    else:
        model = build_model(cfg.model.arch, len(splits.classes), width=cfg.model.width, dropout=cfg.model.dropout,
                            modality=cfg.model.modality, keep_time=cfg.model.keep_time)
    step = objective.make_step(model, len(view.train)).to(dev)  # moves a step's frozen teacher too
    model = step.model  # the network as trained and logged (a step may wrap the plain one with its own parts)
    if init_state is not None:  # after the wrapping, so the wrapper's own weights load too
        load_init_weights(model, init_state, init or "the initial weights")
    if ddp is not None and cfg.optim.sync_bn:
        distributed.sync_batchnorm(step, dev)
    optimisers = Optimisers.build(step, cfg.optim, max(1, len(train_loader)), objective.optimizer)
    prep = Prepared(cfg, role, objective, splits, view, dev, ddp, step, model, optimisers, train_loader, evaluation,
                    eval_loaders, val_loader, resume, changed, det_note, progress, history=[], init=init)
    if state is not None:
        _restore(prep, state)
    if ddp is not None:
        ddp.broadcast_module(step)  # every rank starts from rank 0's weights
    return prep


def _loaders(cfg: RunConfig, objective: Objective, evaluation: Any, splits: Splits, view: TrainingView,
             dev: torch.device, ddp: distributed.Distributed | None
             ) -> tuple[Any, dict[str, ReplayLoader], ReplayLoader | None]:
    """The training loader (this rank's share of each global batch), the evaluation loaders and the
    objective's validation loader; evaluation clips are decoded once and replayed from memory."""
    optim, workers, pin = cfg.optim, cfg.data.num_workers, dev.type == "cuda"
    # label-free pretraining has no classifier to score
    eval_sets = evaluation.datasets(splits) if objective.labels else {}
    train_batch = ddp.per_rank_batch(optim.batch_size) if ddp else optim.batch_size
    train_loader = make_loader(view.train, train_batch, shuffle=True, num_workers=workers, seed=optim.seed,
                               pin_memory=pin, shard=(ddp.rank, ddp.world) if ddp else None,
                               collate_fn=objective.collate)

    def replay(ds, collate=None) -> ReplayLoader:
        return ReplayLoader(make_loader(ds, optim.batch_size, shuffle=False, num_workers=workers, seed=optim.seed,
                                        pin_memory=pin, collate_fn=collate), EVAL_REPLAY_BYTES)

    eval_loaders = {name: replay(ds, evaluation.collate) for name, ds in eval_sets.items()}
    return train_loader, eval_loaders, replay(view.validation) if view.validation is not None else None


def _restore(prep: Prepared, state: dict[str, Any]) -> None:
    """Continues from a checkpoint: weights, a method's heads, optimisers, schedule, history, RNG."""
    prep.model.load_state_dict(state["model"])
    prep.step.load_state_dict(state.get("heads", {}), strict=False)
    prep.optimisers.load_state_dict(state)
    if "optim.epochs" in prep.changed:  # the schedule runs over the new total from here on
        prep.optimisers.follow_schedule()
    prep.start_epoch, prep.history, prep.run_id = state["epoch"], state["history"], state["run_id"]
    set_rng_state(state["rng"])
