"""What a study searches: the ranges of the KD settings and the learning rate, a trial's values
applied to a run configuration, and what every trial of a study must share."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import optuna

from kdhar.config import GKD_METHODS, RunConfig


OBJECTIVE = "val_video_top1"  # per-epoch metric logged by kdhar.train for the held-out groups
# Knobs that say how a trial runs, not what it measures: workers may differ in them.
OPERATIONAL = {"data.num_workers", "data.on_missing", "data.on_bad", "optim.threads"}


@dataclass(frozen=True)
class ParamRange:
    low: float
    high: float
    log: bool = False

    def __str__(self) -> str:
        return f"{self.low:g}:{self.high:g}" + (":log" if self.log else "")


TUNABLE = ("tau", "alpha", "lam", "lr", "beta", "ramp", "rec_weight", "gd_weight")
# The logit-KD knobs and GKD's, by the `--kd` methods they act in.
LOGIT_KNOBS, GKD_KNOBS = ("tau", "alpha", "lam"), ("beta", "ramp", "rec_weight", "gd_weight")
# Where each searched knob lives in a run's params.
SEARCHED_KEYS = {"tau": "kd.tau", "alpha": "kd.alpha", "lam": "kd.lam", "lr": "optim.lr", "beta": "gkd.beta",
                 "ramp": "gkd.ramp", "rec_weight": "gkd.rec_weight", "gd_weight": "gkd.gd_weight"}


@dataclass(frozen=True)
class SearchSpace:
    """Ranges of the KD settings and the learning rate; a field left None is not searched.

    The student loss is (1 - alpha) * CE + alpha * tau^2 * KL under the default "mix" weighting, or
    CE + lam * tau^2 * KL under "sum" (the paper's). The tau^2 factor equalises the soft term's
    gradient across temperatures only at high tau; at tau 1-4 it is of the order of CE's or larger,
    so the soft weight and the learning rate interact: under "sum" at the CE-tuned lr a width-4
    student collapsed (README). Hence lr is searched too, on a log scale around the CPU preset's.
    - tau in [1, 8], log scale: 1 is the teacher's raw softmax; with 10-101 classes the softened
      targets are nearly uniform well before 20, and tau 2-4 is where the measurements sit.
    - alpha in [0.1, 0.9]: below 0.1 the run is its scratch twin in disguise, above 0.9 the labels
      hardly count.
    - lam in [0.1, 2] (weighting "sum"): the paper's 1 sits inside.
    - lr in [0.005, 0.05], log scale: a factor 2.5 either side of the CPU preset's 0.02.
    - Without a teacher (`--teacher none`, the scratch twin) only lr is searched, over the same range,
      so a scratch run can be tuned on the same budget as its distilled twin.
    - GKD (`--kd gkd`, `gkd+logit`): beta, the attention-distillation weight, in [0.01, 1], log scale
      around the paper's 0.1; ramp, the share of the epochs over which the regeneration weight
      ramps up, in [0.05, 1] (the paper's 0.1 inside). rec_weight (regeneration, the paper's 0.5)
      and gd_weight (generative distillation, 0.01) are searched only when asked for, e.g.
      `rec_weight=0.05:1:log,gd_weight=0.001:0.1:log`.
    """

    tau: ParamRange | None = ParamRange(1.0, 8.0, log=True)
    alpha: ParamRange | None = ParamRange(0.1, 0.9)
    lam: ParamRange | None = None
    lr: ParamRange | None = ParamRange(0.005, 0.05, log=True)
    beta: ParamRange | None = None
    ramp: ParamRange | None = None
    rec_weight: ParamRange | None = None
    gd_weight: ParamRange | None = None

    def __str__(self) -> str:
        return ",".join(f"{name}={getattr(self, name)}" for name in TUNABLE if getattr(self, name) is not None)

    def names(self) -> list[str]:
        return [name for name in TUNABLE if getattr(self, name) is not None]

    @classmethod
    def default(cls, weighting: str = "mix", method: str = "logit", scratch: bool = False) -> SearchSpace:
        """The default ranges for a KD weighting (alpha under "mix" and "balanced", lam under "sum")
        and `--kd` method: GKD's beta and ramp for gkd and gkd+logit, no logit-KD knob for gkd or
        feature KD alone; lr alone for a run without a teacher (`scratch`)."""
        if scratch:
            return cls(tau=None, alpha=None)
        space = cls(alpha=None, lam=ParamRange(0.1, 2.0)) if weighting == "sum" else cls()
        if method in GKD_METHODS:
            space = dataclasses.replace(space, beta=ParamRange(0.01, 1.0, log=True), ramp=ParamRange(0.05, 1.0))
        if method in ("gkd", "feature"):
            space = dataclasses.replace(space, tau=None, alpha=None, lam=None)
        return space

    @classmethod
    def parse(cls, text: str | None, weighting: str = "mix", method: str = "logit", scratch: bool = False) -> SearchSpace:
        """Parses "tau=1:8:log,alpha=0.2:0.8,lr=none"; parameters left out keep their defaults for
        the weighting and method, and `none` leaves a parameter out of the search (fixed at the run's value).

        Raises:
            ValueError: naming the part that is an unknown parameter, bad syntax, an empty range, or
                a weight that does not act under `weighting`.
        """
        space = cls.default(weighting, method, scratch)
        if text is None or not text.strip():
            return space
        seen: set[str] = set()
        for part in text.split(","):
            name, sep, rng = part.strip().partition("=")
            name = name.strip()
            if not sep:
                raise ValueError(f"search space part '{part}' is not name=low:high[:log] (e.g. tau=1:8:log)")
            if name not in TUNABLE:
                raise ValueError(f"search space part '{part}': unknown parameter '{name}'; tunable: {', '.join(TUNABLE)}")
            if name in seen:
                raise ValueError(f"search space part '{part}': {name} is given twice")
            unused = {"mix": "lam", "balanced": "lam", "sum": "alpha"}.get(weighting)
            if name == unused:
                raise ValueError(f"search space part '{part}': {name} does not act under --kd-weighting {weighting}")
            if scratch and name != "lr":
                raise ValueError(f"search space part '{part}': {name} does not act without a teacher "
                                 "(--teacher none tunes the lr of scratch runs)")
            if (name in GKD_KNOBS and method not in GKD_METHODS) or (name in LOGIT_KNOBS and method in ("gkd", "feature")):
                raise ValueError(f"search space part '{part}': {name} does not act under --kd {method}")
            seen.add(name)
            value = None if rng.strip() == "none" else _parse_range(name, rng.strip(), part)
            space = dataclasses.replace(space, **{name: value})
        return space


def _parse_range(name: str, text: str, part: str) -> ParamRange:
    fields = text.split(":")
    if len(fields) not in (2, 3) or (len(fields) == 3 and fields[2] not in ("log", "linear")):
        raise ValueError(f"search space part '{part}' is not {name}=low:high[:log|linear] (e.g. {name}=1:20:log)")
    try:
        low, high = float(fields[0]), float(fields[1])
    except ValueError:
        raise ValueError(f"search space part '{part}': bounds must be numbers") from None
    log = len(fields) == 3 and fields[2] == "log"
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise ValueError(f"search space part '{part}' is an empty range: low must be below high")
    if name in ("tau", "lr") and low <= 0:
        raise ValueError(f"search space part '{part}': {name} must stay above 0")
    if name in ("lam", "alpha", "beta", "rec_weight", "gd_weight") and low < 0:
        raise ValueError(f"search space part '{part}': the KD weight cannot be negative")
    if name == "ramp" and (low <= 0 or high > 1):
        raise ValueError(f"search space part '{part}': ramp is a share of the epochs in (0, 1]")
    if name == "alpha" and high > 1:
        raise ValueError(f"search space part '{part}': alpha is a share in [0, 1]")
    if log and low <= 0:
        raise ValueError(f"search space part '{part}': a log range needs low > 0")
    return ParamRange(low, high, log)


def suggest(trial: optuna.Trial, space: SearchSpace) -> dict[str, float]:
    """The trial's draw of every searched parameter."""
    return {
        name: trial.suggest_float(name, rng.low, rng.high, log=rng.log)
        for name in space.names()
        for rng in [getattr(space, name)]
    }


def trial_config(cfg: RunConfig, values: dict[str, float]) -> RunConfig:
    """`cfg` with a trial's (or a study's best) values applied: KD knobs to cfg.kd, GKD's to cfg.gkd,
    lr to cfg.optim."""
    kd = dataclasses.replace(cfg.kd, **{k: v for k, v in values.items() if k in LOGIT_KNOBS})
    gkd = dataclasses.replace(cfg.gkd, **{k: v for k, v in values.items() if k in GKD_KNOBS})
    optim = dataclasses.replace(cfg.optim, lr=values["lr"]) if "lr" in values else cfg.optim
    return dataclasses.replace(cfg, kd=kd, gkd=gkd, optim=optim)


def study_config(cfg, space: SearchSpace | list[str], teacher: str, fingerprint: str, val_seeds: int = 1) -> dict[str, Any]:
    """Everything that changes what a trial's score measures except the searched knobs (`space`, or
    their names): the run configuration (student, epochs, fraction, widths, clips, PCL, ...; the KD
    knobs only with a teacher), the teacher, the data's fingerprint and the seeds a trial averages.

    A study records it when it is created: workers joining it must match it, and a grid's `tuned:`
    applies the study only to cells it describes (`StudyRecord.differences`)."""
    names = space.names() if isinstance(space, SearchSpace) else list(space)
    skip = OPERATIONAL | {SEARCHED_KEYS[n] for n in names}
    params = cfg.params(kd=teacher.lower() != "none")
    shared = {k: list(v) if isinstance(v, tuple) else v for k, v in params.items() if k not in skip}
    # Recorded only when above 1, so the records of studies made before it existed still match.
    seeds = {"val_seeds": val_seeds} if val_seeds != 1 else {}
    return {**shared, "teacher": teacher, "dataset_fingerprint": fingerprint, **seeds}
