"""Experiment grids: a YAML spec of teachers x students x fractions x seeds, run and resumed cell by cell.

A spec is plain data (see experiments/*.yaml). `plan` turns it into an ordered list of cells:
teachers, then scratch students, then distilled students, then fine-tunes on the transfer dataset.
`run_grid` trains them in that order and skips every cell whose configuration already has a
FINISHED run in the experiment (looked up by the `config_hash` tag), so an interrupted grid picks up
where it stopped.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Hashable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

from kdhar import config as C

SIZES = ("cpu", "paper")

# Spec key -> (RunConfig section, field). Only these knobs may be overridden from a spec, so a typo
# is an error rather than a silently ignored setting.
OVERRIDES: dict[str, tuple[str, str]] = {
    "epochs": ("optim", "epochs"),
    "lr": ("optim", "lr"),
    "batch_size": ("optim", "batch_size"),
    "schedule": ("optim", "schedule"),
    "momentum": ("optim", "momentum"),
    "weight_decay": ("optim", "weight_decay"),
    "width": ("model", "width"),
    "dropout": ("model", "dropout"),
    "modality": ("model", "modality"),
    "clip_len": ("clip", "clip_len"),
    "frame_interval": ("clip", "frame_interval"),
    "crop": ("clip", "crop"),
    "resize": ("clip", "resize"),
    "test_clips": ("clip", "test_clips"),
    "augment": ("clip", "augment"),
    "hflip": ("clip", "hflip"),
    "num_workers": ("data", "num_workers"),
    "val_fraction": ("data", "val_fraction"),
    "views": ("data", "views"),
    "warmup": ("optim", "warmup"),
    "grad_clip": ("optim", "grad_clip"),
    "threads": ("optim", "threads"),
    "sync_bn": ("optim", "sync_bn"),
    # PCL (`ssl: pcl`): the tuple view and the self-supervised terms
    "ssl": ("pcl", "ssl"),
    "pcl_interval": ("pcl", "interval"),
    "clip_stride": ("pcl", "clip_stride"),
    "spatial_perm": ("pcl", "spatial_perm"),
    "swap_pairs": ("pcl", "swap_pairs"),
    "contrast": ("pcl", "contrast"),
    "contrast_weight": ("pcl", "contrast_weight"),
    "negatives": ("pcl", "negatives"),
    "nce_temperature": ("pcl", "temperature"),
    "bank_momentum": ("pcl", "momentum"),
    # GKD (`kd: gkd`): the attention module, its CVAE and the distillation terms
    "kd": ("gkd", "method"),
    "attention": ("gkd", "attention"),
    "gkd_variant": ("gkd", "variant"),
    "gkd_beta": ("gkd", "beta"),
    "gkd_ramp": ("gkd", "ramp"),
    "gkd_rec_weight": ("gkd", "rec_weight"),
    "gkd_gd_weight": ("gkd", "gd_weight"),
    "cvae_lr": ("gkd", "cvae_lr"),
    "gkd_ce": ("gkd", "ce"),
    "gkd_rescale": ("gkd", "rescale"),
    "gkd_norm": ("gkd", "norm"),
}

# What teacher_overrides and student_overrides may set. A distilled student feeds its own clips to the
# teacher, so teachers and students may differ in size and schedule but not in how clips are cut.
MODEL_OVERRIDES = {
    "epochs", "lr", "batch_size", "schedule", "momentum", "weight_decay", "width", "dropout", "warmup", "grad_clip",
    "modality",
}

SPEC_KEYS = {
    "experiment", "dataset", "transfer", "size", "overrides", "teacher_overrides", "transfer_overrides",
    "teachers", "students", "self_distill", "fractions", "seeds", "teacher_seed", "tau", "lam",
    "weighting", "alpha", "finetune", "cache_teacher", "tuned", "student_overrides", "ssl",
    "fraction_overrides", "keep_checkpoints", "kd",
}
# What a teacher of a grid with GKD cells trains with: GKD's phase 1 (its attention module and CVAE,
# the regeneration weight ramped over the whole run, the CVAE's Adam at 1e-3).
GKD_TEACHER = {"attention": True, "gkd_ramp": 1.0, "cvae_lr": 1e-3}
DATASET_KEYS = {"name", "root", "split", "fraction", "split_dir"}


class SpecError(ValueError):
    """An experiment spec that cannot be run; the message names the file, the key and the fix."""


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset lives. `fraction` only matters for the transfer dataset."""

    name: str
    root: str
    split: int = 1
    fraction: float = 1.0
    split_dir: str = ""


@dataclass(frozen=True)
class GridSpec:
    """A whole study: every field is plain data read from YAML."""

    experiment: str
    dataset: DatasetSpec
    teachers: list[str]
    students: list[str]
    fractions: list[float]
    seeds: list[int]
    size: str = "cpu"
    overrides: dict[str, Any] = field(default_factory=dict)
    teacher_overrides: dict[str, Any] = field(default_factory=dict)
    transfer_overrides: dict[str, Any] = field(default_factory=dict)
    # Per student architecture, on top of `overrides` (e.g. more epochs for the slower ResNets); its
    # scratch and distilled runs and their fine-tunes alike.
    student_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Per training fraction, on top of those (e.g. a smaller batch where 2 % of the videos would
    # give one step an epoch); scratch and distilled students alike.
    fraction_overrides: dict[float, dict[str, Any]] = field(default_factory=dict)
    transfer: DatasetSpec | None = None
    self_distill: bool = False  # also distil an architecture into itself
    teacher_seed: int = 0  # teachers are trained once, on all training videos
    tau: float = C.KDConfig.tau
    lam: float = C.KDConfig.lam
    weighting: str = C.KDConfig.weighting
    alpha: float = C.KDConfig.alpha
    finetune: bool = False
    cache_teacher: bool = False
    tuned: str | None = None  # an Optuna study whose best KD settings (and lr) the KD cells use
    # "pcl": students (scratch and distilled) train inside PCL; teachers and fine-tunes stay supervised.
    ssl: str = "none"
    # A finished cell's model is in the tracking store; its checkpoint (optimizer state and all) is
    # deleted unless this is set (the paper's grid would otherwise leave ~18 GB behind).
    keep_checkpoints: bool = False
    kd_overrides: dict[str, Any] = field(default_factory=dict)  # filled from `tuned` (lr; GKD's beta and ramp)
    # The distillation methods of the KD cells (`--kd`): with gkd or gkd+logit the teachers train with
    # GKD's attention module (all methods distil from them) and each scratch cell gets a twin with the
    # attention module and no teacher ("scratch + attention").
    kd_methods: list[str] = field(default_factory=lambda: ["logit"])

    @property
    def kd(self) -> C.KDConfig:
        return C.KDConfig(tau=self.tau, weighting=self.weighting, alpha=self.alpha, lam=self.lam)


@dataclass(frozen=True)
class Cell:
    """One run of the grid.

    `teacher` is the teacher architecture of a distilled student, "none" for a scratch student and
    for a teacher cell itself. A fine-tune cell carries the student cell whose model it starts from.
    """

    role: str  # teacher | student | finetune
    arch: str
    teacher: str
    fraction: float
    seed: int
    cfg: C.RunConfig
    source: Cell | None = None

    @property
    def wave(self) -> str:
        """Cells of one wave are independent and may run in parallel."""
        if self.role == "student":
            return "scratch" if self.teacher == "none" else "kd"
        return self.role

    def label(self) -> str:
        if self.role == "teacher":
            return f"teacher {self.arch}"
        if self.role == "student":
            via = "scratch" if self.teacher == "none" else f"<- {self.teacher}"
            pcl = " (pcl)" if self.cfg.pcl.ssl == "pcl" else ""
            g = self.cfg.gkd
            method = "" if not g.attention else (" [attention]" if self.teacher == "none" else f" [{g.method}]")
            return f"student {self.arch}{pcl} {via}{method} fraction={self.fraction:g} seed={self.seed}"
        src = self.source
        via = "scratch" if src.teacher == "none" else f"<- {src.teacher}"
        return f"finetune {self.arch} ({via} fraction={src.fraction:g} seed={src.seed}) on {self.cfg.data.dataset}"


# ---------------------------------------------------------------- spec

def build_run_config(
    arch: str,
    *,
    size: str,
    overrides: dict[str, Any],
    dataset: DatasetSpec,
    fraction: float,
    seed: int,
    kd: C.KDConfig | None = None,
) -> C.RunConfig:
    """Defaults -> size preset -> overrides, the same order as the command line.

    Raises:
        SpecError: an unknown override key or size.
    """
    if size not in SIZES:
        raise SpecError(f"size {size!r} is not one of {', '.join(SIZES)}")
    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise SpecError(f"unknown override {', '.join(unknown)}; valid: {', '.join(sorted(OVERRIDES))}")
    base = C.RunConfig()
    for key, value in overrides.items():
        check_override(key, value, getattr(getattr(base, OVERRIDES[key][0]), OVERRIDES[key][1]))
    preset = C.CPU_PRESET if size == "cpu" else {}
    sections: dict[str, dict[str, Any]] = {name: dict(preset.get(name, {}))
                                           for name in ("data", "clip", "model", "optim", "pcl", "gkd")}
    if overrides.get("ssl") == "pcl":
        sections["model"]["modality"] = "res"  # PCL's input, unless the overrides say otherwise
        for name, values in (C.PCL_CPU_PRESET if size == "cpu" else C.PCL_PAPER_PRESET).items():
            sections[name].update(values)
    if overrides.get("kd", "logit") != "logit":
        sections["gkd"]["attention"] = True  # GKD distils the attention module's outputs
    if overrides.get("attention") or sections["gkd"].get("attention"):
        for name, values in (C.GKD_CPU_PRESET if size == "cpu" else C.GKD_PAPER_PRESET).items():
            sections[name].update(values)
    for key, value in overrides.items():
        section, name = OVERRIDES[key]
        sections[section][name] = tuple(value) if name == "resize" else value
    if size == "cpu" and "crop" in overrides and "resize" not in overrides:
        # The CPU preset's resize is 8/7 of its crop at the synthetic videos' 4:3 aspect; keep that
        # ratio when only the crop changes (the command line does the same).
        crop = overrides["crop"]
        sections["clip"]["resize"] = (round(crop * 8 / 7), round(crop * 8 / 7 * 4 / 3))
    data = dataclasses.replace(
        base.data, dataset=dataset.name, root=dataset.root, split=dataset.split, split_dir=dataset.split_dir,
        fraction=fraction,
        **sections["data"],
    )
    cfg = C.RunConfig(
        data=data,
        clip=dataclasses.replace(base.clip, **sections["clip"]),
        model=dataclasses.replace(base.model, arch=arch, **sections["model"]),
        optim=dataclasses.replace(base.optim, seed=seed, **sections["optim"]),
        kd=kd or base.kd,
        pcl=dataclasses.replace(base.pcl, **sections["pcl"]),
        gkd=dataclasses.replace(base.gkd, **sections["gkd"]),
    )
    try:
        C.check_run_config(cfg)
    except (ValueError, TypeError) as exc:
        raise SpecError(str(exc)) from None
    return cfg


def check_override(key: str, value: Any, default: Any) -> None:
    """Refuses an override whose type differs from its knob's (a string for a number, a number for a
    flag), naming the key, before any configuration is built.

    Raises:
        SpecError: e.g. "epochs='many': must be a whole number".
    """
    if isinstance(default, bool):
        ok, what = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, what = isinstance(value, int) and not isinstance(value, bool), "a whole number"
    elif isinstance(default, float):
        ok, what = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif isinstance(default, str):
        ok, what = isinstance(value, str), "a word"
    elif isinstance(default, tuple):
        ok = (isinstance(value, (list, tuple)) and len(value) == len(default)
              and all(isinstance(v, int) and not isinstance(v, bool) for v in value))
        what = f"a list of {len(default)} whole numbers"
    else:
        return
    if not ok:
        raise SpecError(f"{key}={value!r}: must be {what}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last one,
    so a spec would silently lose the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # SafeLoader itself reports an unhashable key
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key '{key}' is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_spec(path: str | Path) -> GridSpec:
    """Reads and checks an experiment spec.

    Raises:
        SpecError: the file is missing, is not a mapping, or has an unknown key or a bad value.
    """
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"experiment spec {path} does not exist; see experiments/*.yaml for examples")
    try:
        with path.open() as f:
            raw = yaml.load(f, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(f"{path}: not valid YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise SpecError(f"{path}: not a UTF-8 text file") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a mapping of keys (experiment, dataset, teachers, ...)")
    return parse_spec(raw, source=str(path))


def parse_spec(raw: dict[str, Any], source: str = "spec") -> GridSpec:
    """Builds a GridSpec from already-parsed YAML, checking every value (see `load_spec`)."""
    from kdhar.models import MODELS

    def fail(msg: str) -> SpecError:
        return SpecError(f"{source}: {msg}")

    unknown = sorted(set(raw) - SPEC_KEYS)
    if unknown:
        raise fail(f"unknown key {', '.join(unknown)}; valid keys: {', '.join(sorted(SPEC_KEYS))}")
    for key in ("experiment", "dataset", "teachers", "students", "fractions", "seeds"):
        if key not in raw:
            raise fail(f"missing key '{key}'")

    def dataset(key: str) -> DatasetSpec:
        d = raw[key]
        if not isinstance(d, dict) or "name" not in d or "root" not in d:
            raise fail(f"'{key}' needs at least 'name' and 'root', e.g. {{name: ucf101, root: data/ucf101}}")
        bad = sorted(set(d) - DATASET_KEYS)
        if bad:
            raise fail(f"unknown key {', '.join(bad)} in '{key}'; valid: {', '.join(sorted(DATASET_KEYS))}")
        frac = float(d.get("fraction", 1.0))
        if not 0 < frac <= 1:
            raise fail(f"{key}.fraction {frac} is outside (0, 1]")
        return DatasetSpec(name=str(d["name"]), root=str(d["root"]), split=whole(f"{key}.split", d.get("split", 1)), fraction=frac,
                           split_dir=str(d.get("split_dir") or ""))

    def whole(key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):  # int(1.7) would quietly be 1
            raise fail(f"{key}: {value!r} is not a whole number")
        return value

    def distinct(key: str, values: list[Any]) -> list[Any]:
        twice = sorted({v for v in values if values.count(v) > 1})
        if twice:
            raise fail(f"{key}: {', '.join(map(str, twice))} given more than once; each would plan the same cells again")
        return values

    def listed(key: str, example: str) -> list[Any]:
        value = raw[key]
        if not isinstance(value, list) or not value:
            raise fail(f"{key}: expected a non-empty list, e.g. {key}: {example}; got {value!r}")
        return value

    def archs(key: str) -> list[str]:
        names = raw[key]
        if isinstance(names, str):
            names = [names]
        names = listed(key, "[c3d, r3d_18]") if not isinstance(names, list) else names
        bad = [n for n in names if n not in MODELS]
        if bad:
            raise fail(f"{key}: unknown architecture {', '.join(map(str, bad))}; choose from {', '.join(sorted(MODELS))}")
        return [str(n) for n in names]

    def numbers(key: str, kind: type, example: str) -> list[Any]:
        values = listed(key, example)
        ok = (int,) if kind is int else (int, float)
        bad = [v for v in values if isinstance(v, bool) or not isinstance(v, ok)]
        if bad:
            raise fail(f"{key}: {bad[0]!r} is not a {'whole ' if kind is int else ''}number (e.g. {key}: {example})")
        return [kind(v) for v in values]

    fractions = distinct("fractions", numbers("fractions", float, "[1.0, 0.25]"))
    bad = [f for f in fractions if not 0 < f <= 1]
    if bad:
        raise fail(f"fractions {bad} are outside (0, 1]; the paper uses 1.0, 0.5, 0.25, 0.02")
    def flag(key: str) -> bool:
        value = raw.get(key, False)
        if not isinstance(value, bool):  # bool("false") is True: only YAML's true/false are accepted
            raise fail(f"{key}: {value!r} is not a boolean; write true or false without quotes")
        return value

    def number(key: str, default: float) -> float:
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise fail(f"{key}: {value!r} is not a finite number")
        return float(value)

    def per_student() -> dict[str, dict[str, Any]]:
        value = raw.get("student_overrides") or {}
        if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
            raise fail("student_overrides: expected a mapping of student architecture -> overrides, "
                       "e.g. {r3d_18: {epochs: 12}}")
        strays = sorted(set(value) - set(archs("students")))
        if strays:
            raise fail(f"student_overrides: {', '.join(map(str, strays))} is not in students")
        for arch, keys in value.items():
            clip_keys = sorted(set(keys) - MODEL_OVERRIDES)
            if clip_keys:
                raise fail(f"student_overrides.{arch} may not set {', '.join(clip_keys)}: a teacher takes only "
                           f"the clips it was trained on; allowed: {', '.join(sorted(MODEL_OVERRIDES))}")
        return {str(arch): dict(keys) for arch, keys in value.items()}

    def per_fraction() -> dict[float, dict[str, Any]]:
        value = raw.get("fraction_overrides") or {}
        if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
            raise fail("fraction_overrides: expected a mapping of fraction -> overrides, e.g. {0.02: {batch_size: 4}}")
        out = {}
        for frac, keys in value.items():
            if isinstance(frac, bool) or not isinstance(frac, (int, float)) or float(frac) not in fractions:
                raise fail(f"fraction_overrides: {frac!r} is not one of the fractions {fractions}")
            clip_keys = sorted(set(keys) - MODEL_OVERRIDES)
            if clip_keys:
                raise fail(f"fraction_overrides.{frac} may not set {', '.join(clip_keys)}: a teacher takes only the "
                           f"clips it was trained on; allowed: {', '.join(sorted(MODEL_OVERRIDES))}")
            out[float(frac)] = dict(keys)
        return out

    tuned = raw.get("tuned")
    if tuned is not None and not (isinstance(tuned, str) and tuned.strip()):
        raise fail(f"tuned: {tuned!r} must be the name of an Optuna study made by `kdhar tune`")
    ssl = raw.get("ssl", "none")
    if ssl not in C.SSL_METHODS:
        raise fail(f"ssl: {ssl!r} must be one of {', '.join(C.SSL_METHODS)} (pcl: students train inside PCL)")
    if "ssl" in (raw.get("overrides") or {}):
        raise fail("ssl goes at the top of the spec (ssl: pcl), where it applies to the students only; "
                   "teachers and fine-tunes stay supervised")
    kd_methods = raw.get("kd", ["logit"])
    kd_methods = [kd_methods] if isinstance(kd_methods, str) else kd_methods
    if not isinstance(kd_methods, list) or not kd_methods or any(m not in C.KD_METHODS for m in kd_methods):
        raise fail(f"kd: {raw.get('kd')!r} must be a list of {', '.join(C.KD_METHODS)}, e.g. kd: [logit, gkd]")
    if "kd" in (raw.get("overrides") or {}) or "attention" in (raw.get("overrides") or {}):
        raise fail("kd goes at the top of the spec (kd: [logit, gkd]), where it picks the KD cells' methods; "
                   "the teachers and scratch twins follow from it")
    if ssl != "none" and any(m != "logit" for m in kd_methods):
        raise fail("kd: GKD trains on single clips; it does not combine with ssl: pcl")
    finetune = flag("finetune")
    if finetune and "transfer" not in raw:
        raise fail("finetune is on but no 'transfer' dataset is given (e.g. {name: hmdb51, root: data/hmdb51})")
    spec = GridSpec(
        experiment=str(raw["experiment"]),
        dataset=dataset("dataset"),
        transfer=dataset("transfer") if "transfer" in raw else None,
        size=str(raw.get("size", "cpu")),
        overrides=dict(raw.get("overrides") or {}),
        teacher_overrides=dict(raw.get("teacher_overrides") or {}),
        transfer_overrides=dict(raw.get("transfer_overrides") or {}),
        student_overrides=per_student(),
        fraction_overrides=per_fraction(),
        teachers=archs("teachers"),
        students=archs("students"),
        self_distill=flag("self_distill"),
        fractions=fractions,
        seeds=distinct("seeds", numbers("seeds", int, "[0, 1, 2]")),
        teacher_seed=whole("teacher_seed", raw.get("teacher_seed", 0)),
        tau=number("tau", C.KDConfig.tau),
        lam=number("lam", C.KDConfig.lam),
        weighting=str(raw.get("weighting", C.KDConfig.weighting)),
        alpha=number("alpha", C.KDConfig.alpha),
        finetune=finetune,
        cache_teacher=flag("cache_teacher"),
        tuned=tuned,
        ssl=str(ssl),
        keep_checkpoints=flag("keep_checkpoints"),
        kd_methods=[str(m) for m in dict.fromkeys(kd_methods)],
    )
    if spec.cache_teacher and int(spec.overrides.get("views", 0)) < 1:
        raise fail("cache_teacher replays fixed views: add e.g. 'views: 4' to overrides, so scratch and KD "
                   "students see the same number of augmented views")
    clip_keys = sorted(set(spec.teacher_overrides) - MODEL_OVERRIDES)
    if clip_keys:
        raise fail(f"teacher_overrides may not set {', '.join(clip_keys)}: students feed their own clips to the "
                   f"teacher; allowed: {', '.join(sorted(MODEL_OVERRIDES))}")
    from kdhar.objectives.kd import check_kd

    try:
        check_kd(spec.tau, spec.weighting, spec.alpha, spec.lam)
    except ValueError as exc:
        raise fail(str(exc)) from None
    try:
        plan(spec)  # builds every configuration, so a bad override fails here, not hours in
    except SpecError as exc:
        raise fail(str(exc)) from exc
    return spec


def plan(spec: GridSpec) -> list[Cell]:
    """Every cell of the grid in run order: teachers, scratch students, distilled students, fine-tunes."""
    gkd = any(m != "logit" for m in spec.kd_methods)
    teachers = [
        Cell("teacher", t, "none", 1.0, spec.teacher_seed,
             build_run_config(t, size=spec.size, overrides={**spec.overrides, **(GKD_TEACHER if gkd else {}),
                                                             **spec.teacher_overrides},
                              dataset=spec.dataset, fraction=1.0, seed=spec.teacher_seed))
        for t in spec.teachers
    ]
    scratch: list[Cell] = []
    kd: list[Cell] = []
    for s in spec.students:
        overrides = {**spec.overrides, **spec.student_overrides.get(s, {})}
        if spec.ssl != "none":
            overrides["ssl"] = spec.ssl
        for frac in spec.fractions:
            for seed in spec.seeds:
                def config(**method: Any) -> C.RunConfig:
                    return build_run_config(s, size=spec.size, dataset=spec.dataset, fraction=frac, seed=seed, kd=spec.kd,
                                            overrides={**overrides, **spec.fraction_overrides.get(frac, {}), **method})

                scratch.append(Cell("student", s, "none", frac, seed, config()))
                if gkd:  # the attention module without a teacher, GKD's own baseline
                    scratch.append(Cell("student", s, "none", frac, seed, config(attention=True)))
                for method in spec.kd_methods:
                    tuned = {f"gkd_{k}": spec.kd_overrides[k] for k in ("beta", "ramp") if k in spec.kd_overrides}
                    cfg = config(**({"kd": method, **tuned} if method != "logit" else {}))
                    # A tuned study's lr is the distilled students' only: the scratch twin keeps the
                    # preset lr, which was chosen for plain cross-entropy.
                    kd_cfg = cfg if "lr" not in spec.kd_overrides else dataclasses.replace(
                        cfg, optim=dataclasses.replace(cfg.optim, lr=spec.kd_overrides["lr"]))
                    kd += [Cell("student", s, t, frac, seed, kd_cfg) for t in spec.teachers if t != s or spec.self_distill]
    finetunes: list[Cell] = []
    if spec.finetune and spec.transfer is not None:
        for src in scratch + kd:
            overrides = {**spec.overrides, **spec.student_overrides.get(src.arch, {}), **spec.transfer_overrides}
            overrides.pop("ssl", None)  # a fine-tune is supervised, whatever its source was trained with
            cfg = build_run_config(src.arch, size=spec.size, overrides=overrides,
                                   dataset=spec.transfer, fraction=spec.transfer.fraction, seed=src.seed)
            finetunes.append(Cell("finetune", src.arch, "none", spec.transfer.fraction, src.seed, cfg, source=src))
    return teachers + scratch + kd + finetunes


# ---------------------------------------------------------------- running

@dataclass
class CellOutcome:
    """What happened to one cell: status is "done" or "skipped"."""

    cell: Cell
    status: str
    run_id: str
    seconds: float


def run_grid(
    spec_path: str | Path,
    workers: int = 1,
    experiment: str | None = None,
    *,
    device: str | None = None,
    log: Callable[[str], None] = print,
    executor: Executor | None = None,
) -> list[CellOutcome]:
    """Runs every cell of a spec that has no FINISHED run with the same configuration yet.

    Args:
        spec_path: the YAML spec.
        workers: processes training independent cells of one wave at once; each gets
            cores // workers torch threads. Only for the default executor.
        experiment: MLflow experiment name; defaults to the spec's.
        device: torch device for every run ("cpu", "cuda", ...); None picks one.
        log: receives one progress line per cell.
        executor: what trains the cells each wave claims (`LocalExecutor(workers)` unless given,
            e.g. `kdhar.ray_grid.RayExecutor`); which cells, in which order, is decided here.

    Returns:
        One outcome per cell, in plan order.

    Raises:
        SpecError: a bad spec or a dataset root that does not exist.
    """
    spec = with_tuned(load_spec(spec_path))
    if workers < 1:
        raise SpecError(f"workers {workers} must be >= 1")
    exp = experiment or spec.experiment
    for ds in [spec.dataset] + ([spec.transfer] if spec.finetune and spec.transfer else []):
        if not Path(ds.root).exists():
            raise SpecError(f"{spec_path}: dataset root {ds.root} ({ds.name}) does not exist; "
                            "generate it with `kdhar data synth` or fix 'root'")
    executor = executor or LocalExecutor(workers)
    executor.start()
    try:
        log(f"grid {spec_path}: {len(plan(spec))} cells in experiment '{exp}' ({executor.describe()})")
        grid = _GridRun(spec, str(spec_path), exp, executor, device, log)
        grid.claims.start()
        try:
            for wave in ("teacher", "scratch", "kd", "finetune"):
                grid.run_wave(wave)
        finally:
            grid.claims.stop()
            grid.claims.release_all()
    finally:
        executor.close()
    return [grid.outcomes[i] for i in range(len(grid.cells))]


class _GridRun:
    """One `run_grid` call: its cells, what they produced so far and the claims it holds."""

    def __init__(self, spec: GridSpec, spec_path: str, experiment: str, executor: Executor, device: str | None,
                 log: Callable[[str], None]) -> None:
        self.spec, self.spec_path, self.experiment, self.executor, self.device, self.log = (
            spec, spec_path, experiment, executor, device, log)
        self.cells = plan(spec)
        self.position = {id(c): i for i, c in enumerate(self.cells)}
        self.outcomes: dict[int, CellOutcome] = {}
        self.finished_runs: dict[int, str] = {}  # plan position -> run id, so fine-tunes find their source
        # Distilled students learn from the exact teacher run this grid trained (or found finished),
        # never from whichever teacher is the registry's champion at the time.
        self.teacher_runs: dict[str, str] = {}
        self.claims = Claims(experiment)

    def report(self, i: int, outcome: CellOutcome) -> None:
        if outcome.status == "done" and not self.spec.keep_checkpoints:
            # Pruned to the best validation epoch's weights: the resume state (optimiser and all) is
            # of no use once the run finished, and its last weights are the logged model.
            (CHECKPOINTS / outcome.run_id / "last.pt").unlink(missing_ok=True)
        self.outcomes[i] = outcome
        self.finished_runs[i] = outcome.run_id
        if outcome.cell.role == "teacher":
            self.teacher_runs[outcome.cell.arch] = outcome.run_id
        width = len(str(len(self.cells)))
        what = "skipped (already finished)" if outcome.status == "skipped" else f"done in {outcome.seconds:.1f} s"
        self.log(f"[{len(self.outcomes):>{width}}/{len(self.cells)}] {outcome.cell.label()}: {what}, run {outcome.run_id}")

    def run_wave(self, wave: str) -> None:
        """Trains the cells of one wave that no run has finished and no other runner has claimed, then
        waits for those another runner is training; a cell whose other runner stopped without
        finishing it is claimed and trained on the next pass."""
        exp = self.experiment
        while True:
            todo: list[tuple[int, Cell, dict[str, str], str | None, str | None]] = []
            elsewhere: list[tuple[int, Cell, str]] = []
            open_cells = []
            for cell in (c for c in self.cells if c.wave == wave):
                i = self.position[id(cell)]
                if i in self.finished_runs:
                    continue
                source_run = self.finished_runs.get(self.position[id(cell.source)]) if cell.source is not None else None
                teacher_run = self.teacher_runs.get(cell.teacher) if cell.wave == "kd" else None
                if cell.wave == "kd" and teacher_run is None:
                    raise SpecError(f"{self.spec_path}: teacher {cell.teacher} is not among the spec's teachers")
                key = cell_hash(cell, source_run=source_run, teacher_run=teacher_run)
                existing = _finished_run(exp, cell.role, key)
                if existing:
                    self.report(i, CellOutcome(cell, "skipped", existing, 0.0))
                else:
                    open_cells.append((i, cell, key, source_run, teacher_run))
            won = self.claims.take({key: cell.label() for _, cell, key, _, _ in open_cells}) if open_cells else set()
            for i, cell, key, source_run, teacher_run in open_cells:
                if key not in won:
                    elsewhere.append((i, cell, key))
                    continue
                teacher_uri = f"runs:/{teacher_run}" if teacher_run else None
                resume = _interrupted_run(exp, cell, key, self.log)
                todo.append((i, cell, {"config_hash": key, **_cell_tags(cell, source_run)}, teacher_uri, resume))
            if todo:
                self.train(todo)
            if not elsewhere:
                return
            for i, cell, key in elsewhere:
                self.log(f"{cell.label()}: another runner is training it; waiting")
                while (run_id := _finished_run(exp, cell.role, key)) is None and self.claims.held_elsewhere(key):
                    time.sleep(CLAIM_POLL_S)
                if run_id is not None:
                    self.report(i, CellOutcome(cell, "skipped", run_id, 0.0))

    def train(self, todo) -> None:
        """Hands the claimed cells to the executor; each cell's claim is released once it is reported."""
        jobs = [CellJob(i, cell, self.experiment, self.device, tags, self.spec.cache_teacher, uri, resume)
                for i, cell, tags, uri, resume in todo]

        def done(job: CellJob, run_id: str, seconds: float) -> None:
            self.report(job.position, CellOutcome(job.cell, "done", run_id, seconds))
            self.claims.release(job.key)

        self.executor.train(jobs, done)


@dataclass(frozen=True)
class CellJob:
    """A claimed cell to train: `_run_cell`'s arguments, less whether it shows progress bars (the
    executor's choice), and the cell's place in the plan."""

    position: int
    cell: Cell
    experiment: str
    device: str | None
    tags: dict[str, str]  # config_hash and the cell's own tags
    cache_teacher: bool
    teacher_uri: str | None
    resume: str | None  # a checkpoint of the cell's interrupted run

    @property
    def key(self) -> str:
        return self.tags["config_hash"]

    def args(self, progress: bool) -> tuple:
        return (self.cell, self.experiment, self.device, self.tags, self.cache_teacher, progress, self.teacher_uri,
                self.resume)


class Executor(Protocol):
    """Trains the cells of one wave that the grid claimed. The grid decides what to train and in
    which order (waves, claims, skipping FINISHED cells, resuming from checkpoints, pruning); an
    executor only decides where each `_run_cell` call runs."""

    def start(self) -> None: ...

    def describe(self) -> str:
        """A few words for the grid's first line, e.g. "2 workers"."""
        ...

    def train(self, jobs: list[CellJob], done: Callable[[CellJob, str, float], None]) -> None:
        """Trains every job, calling `done(job, run_id, seconds)` in this thread as each finishes.
        A failed cell's exception is raised (after the cells in flight finish); Ctrl-C stops them all."""
        ...

    def close(self) -> None: ...


class LocalExecutor:
    """The cells in this process (workers=1) or in a pool of `workers` processes on this machine."""

    def __init__(self, workers: int = 1) -> None:
        if workers < 1:
            raise SpecError(f"workers {workers} must be >= 1")
        self.workers = workers
        self.threads = max(1, (os.cpu_count() or 1) // workers)

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return f"{self.workers} worker{'s' if self.workers > 1 else ''}"

    def train(self, jobs: list[CellJob], done: Callable[[CellJob, str, float], None]) -> None:
        workers = self.workers
        if workers == 1:
            for job in jobs:
                done(job, *_run_cell(*job.args(progress=True)))
            return
        ctx = multiprocessing.get_context("spawn")  # forked workers would inherit torch/mlflow threads
        pool = ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx, initializer=_init_worker,
                                   initargs=(self.threads, os.getpid()))
        try:
            pending = {pool.submit(_run_cell_in_worker, *job.args(progress=False)): job for job in jobs}
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    done(pending.pop(fut), *fut.result())  # a failed cell stops the grid; rerunning resumes
        except Exception:
            # A failed cell: start nothing more, let the cells in flight finish, then stop.
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        except BaseException:
            # Ctrl-C: stop the workers now; each ends its run as KILLED before it exits.
            _stop_workers()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()


def grid_status(spec_path: str | Path, experiment: str | None = None) -> list[tuple[Cell, str | None]]:
    """Every cell of a spec in run order with the FINISHED run that already covers it (or None).

    What `run_grid` would skip; a distilled cell whose teacher has not finished yet, or a fine-tune
    whose source has not, counts as not done.
    """
    spec = with_tuned(load_spec(spec_path))
    exp = experiment or spec.experiment
    cells = plan(spec)
    position = {id(c): i for i, c in enumerate(cells)}
    done: dict[int, str | None] = {}
    teacher_runs: dict[str, str] = {}
    for i, cell in enumerate(cells):
        source_run = done.get(position[id(cell.source)]) if cell.source is not None else None
        teacher_run = teacher_runs.get(cell.teacher) if cell.wave == "kd" else None
        if (cell.wave == "kd" and teacher_run is None) or (cell.role == "finetune" and source_run is None):
            done[i] = None
            continue
        done[i] = _finished_run(exp, cell.role, cell_hash(cell, source_run=source_run, teacher_run=teacher_run))
        if cell.role == "teacher" and done[i]:
            teacher_runs[cell.arch] = done[i]
    return [(cell, done[i]) for i, cell in enumerate(cells)]


def with_tuned(spec: GridSpec) -> GridSpec:
    """The spec with its `tuned` study's best KD settings (and lr) applied to the distilled cells."""
    if spec.tuned is None:
        return spec
    from kdhar import tuning

    best = tuning.best_settings(spec.tuned)
    kd = {k: best[k] for k in ("tau", "alpha", "lam") if k in best}
    kd_overrides = {k: best[k] for k in ("lr", "beta", "ramp") if k in best}  # beta, ramp: GKD's, for its cells
    return dataclasses.replace(spec, **kd, kd_overrides=kd_overrides)


def cell_hash(cell: Cell, *, source_run: str | None = None, teacher_run: str | None = None) -> str:
    """The `config_hash` a cell's run carries: its configuration plus where its knowledge comes from.

    A distilled student's hash names the teacher architecture and the run of the teacher it is
    distilled from (`teacher_run`), so a retrained champion teacher makes its students run again.
    A fine-tune's hash names the run it starts from (`source_run`).
    """
    from kdhar.train import config_hash

    if cell.role == "finetune":
        if source_run is None:
            raise ValueError(f"{cell.label()}: the run it starts from is needed for its hash")
        return config_hash(cell.cfg, None, f"runs:/{source_run}")
    if cell.role == "student" and cell.teacher != "none":
        if teacher_run is None:
            raise ValueError(f"{cell.label()}: the teacher's run id is needed for its hash")
        return config_hash(cell.cfg, f"{cell.teacher}@{teacher_run}", None)
    # Teachers and scratch students share this form; the role tag tells them apart.
    return config_hash(cell.cfg, None, None)


CHECKPOINTS = Path("runs") / "checkpoints"  # where run_training writes them (its default workdir)


def _interrupted_run(experiment: str, cell: Cell, key: str, log: Callable[[str], None],
                     gone: Callable[[dict[str, str]], bool] | None = None) -> str | None:
    """The checkpoint to resume this cell from: its newest run that ended KILLED, or is still RUNNING
    although its process is gone (a worker killed outright: its pid on this machine, or its heartbeat
    on another, `tracking.seems_dead`, or whatever else `gone` says of its tags: a Ray task's earlier
    attempt), and left a checkpoint (on a machine of its own, one under a shared working directory).
    Other such runs of the cell are ended KILLED, so none stays RUNNING."""
    from kdhar import tracking

    runs = tracking.find_runs(experiment, f"tags.config_hash = '{key}' and tags.role = '{cell.role}' and "
                                          "attributes.status != 'FINISHED'")
    chosen = None
    for run in runs:  # newest first
        status, tags = run["status"], run["tags"]
        if status == "RUNNING" and not tracking.seems_dead(tags) and not (gone and gone(tags)):
            continue  # still training, here or on a machine whose heartbeat is fresh
        checkpoint = CHECKPOINTS / run["run_id"] / "last.pt"
        if status == "RUNNING":
            tracking.end_run_as(run["run_id"], "KILLED")
        if chosen is None and status in ("RUNNING", "KILLED") and checkpoint.exists():
            chosen = str(checkpoint)
            log(f"{cell.label()}: resuming run {run['run_id']} from its checkpoint")
    return chosen


CLAIM_SETTLE_S = 1.0  # a second look at the claims, for a runner whose claim landed at the same moment
CLAIM_POLL_S = 5.0


class Claims:
    """Cells this grid runner trains, claimed in the tracking store so that a second runner on the
    same spec (on this machine or another) waits for them instead of training them again.

    A claim is a marker run tagged with the cell's `config_hash`; of the live claims of a cell the
    oldest (start time, then run id) wins, read right away and again `CLAIM_SETTLE_S` later (for a
    runner whose claim landed at the same moment). A claim whose runner is gone (its process on this
    machine, or its heartbeat, which `start` keeps beating, on another) does not count (it is deleted),
    so a killed runner's cells are taken over.
    """

    def __init__(self, experiment: str) -> None:
        self.experiment, self.mine = experiment, {}
        self._heartbeat = None

    def start(self) -> None:
        """Beats the heartbeat of this runner's claims until `stop`."""
        from kdhar import tracking

        self._heartbeat = tracking.Heartbeat(lambda: list(self.mine.values()))
        self._heartbeat.start()

    def stop(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stop()

    def _live(self, key: str) -> list[dict]:
        from kdhar import tracking

        runs = tracking.find_runs(self.experiment, f"tags.role = 'claim' and tags.claim = '{key}' and "
                                                   "attributes.status = 'RUNNING'")
        live = []
        for run in runs:
            if tracking.seems_dead(run["tags"]):
                tracking.delete_run(run["run_id"])  # its runner died (here, or its heartbeat stopped)
                continue
            live.append(run)
        return sorted(live, key=lambda r: (r["start_time"], r["run_id"]))

    def take(self, cells: dict[str, str]) -> set[str]:
        """Claims cells (config_hash -> label) at once; returns those won, not held by another live runner."""
        from kdhar import tracking

        tags = tracking.process_tags()
        mine = {key: tracking.create_claim(self.experiment, key, f"claim-{label}", tags) for key, label in cells.items()}
        won = set(mine)
        for delay in (0.0, CLAIM_SETTLE_S):
            time.sleep(delay)
            for key in sorted(won):
                live = self._live(key)
                if live and live[0]["run_id"] != mine[key]:
                    tracking.delete_run(mine[key])
                    won.discard(key)
        self.mine.update({key: mine[key] for key in won})
        return won

    def held_elsewhere(self, key: str) -> bool:
        return any(r["run_id"] != self.mine.get(key) for r in self._live(key))

    def release(self, key: str) -> None:
        from kdhar import tracking

        run_id = self.mine.pop(key, None)
        if run_id:
            tracking.delete_run(run_id)

    def release_all(self) -> None:
        for key in list(self.mine):
            self.release(key)


def reconcile_runs(experiment: str) -> list[str]:
    """Ends as KILLED every run of `experiment` left RUNNING by a process that is gone: one of this
    machine whose `pid` is not alive, or one of another machine whose `heartbeat` is older than
    `tracking.stale_after()`; returns their ids. Runs from before those tags are left alone:
    nothing here can tell whether they still train."""
    from kdhar import tracking

    ended = []
    for run in tracking.find_runs(experiment, "attributes.status = 'RUNNING'"):
        if tracking.seems_dead(run["tags"]):
            tracking.end_run_as(run["run_id"], "KILLED")
            ended.append(run["run_id"])
    return ended




def _finished_run(experiment: str, role: str, key: str) -> str | None:
    from kdhar import tracking

    runs = tracking.find_runs(
        experiment, f"tags.config_hash = '{key}' and tags.role = '{role}' and attributes.status = 'FINISHED'"
    )
    return runs[0]["run_id"] if runs else None


def _cell_tags(cell: Cell, source_run: str | None) -> dict[str, str]:
    if cell.role != "finetune":
        return {}
    src = cell.source
    return {
        "source_run": source_run or "",
        "source_teacher_arch": src.teacher,
        "source_fraction": str(src.fraction),
        "student_arch": cell.arch,
    }


def _init_worker(threads: int, parent_pid: int) -> None:
    import torch

    torch.set_num_threads(threads)
    # Ctrl-C reaches the whole process group; the parent alone handles it (see _stop_workers),
    # so a worker waiting for its next cell does not die with a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A pool worker outlives a parent killed by SIGTERM or SIGKILL and would go on taking queued
    # cells. On Linux the kernel sends it SIGTERM when the parent dies, which ends its run KILLED.
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        os._exit(128 + signal.SIGTERM)


def _stop_workers(timeout_s: float = 60.0) -> None:
    """SIGTERMs this process's pool workers and waits until each has closed its run."""
    children = multiprocessing.active_children()
    for proc in children:
        proc.terminate()
    for proc in children:
        proc.join(timeout_s)


def _run_cell_in_worker(*job: Any) -> tuple[str, float]:
    """`_run_cell` in a pool worker, which exits once a signal has stopped its cell.

    The pool would otherwise report the interruption as the cell's result and hand the worker
    the next cell of an interrupted grid.
    """
    from kdhar.tracking import RunTerminated

    try:
        return _run_cell(*job)
    except RunTerminated as exc:
        os._exit(128 + exc.signum)


def _run_cell(
    cell: Cell, experiment: str, device: str | None, tags: dict[str, str], cache_teacher: bool, progress: bool,
    teacher_uri: str | None = None, resume: str | None = None,
) -> tuple[str, float]:
    """Trains one cell (from `resume`, a checkpoint of its interrupted run, if given); returns its run
    id and wall-clock seconds. Runs in a worker process too."""
    start = time.perf_counter()
    if cell.role == "teacher":
        from kdhar.train import run_training

        res = run_training(cell.cfg, role="teacher", experiment=experiment, tags=tags, device=device,
                           progress=progress, resume=resume)
    elif cell.role == "student":
        from kdhar.distill import distill

        res = distill(cell.cfg, teacher=teacher_uri or "none", experiment=experiment, device=device, extra_tags=tags,
                      cache_teacher=cache_teacher and cell.teacher != "none" and not cell.cfg.gkd.attention,
                      progress=progress, resume=resume)
    else:
        from kdhar.finetune import finetune

        res = finetune(f"runs:/{tags['source_run']}", cell.cfg, experiment=experiment, tags=tags,
                       device=device, progress=progress, resume=resume)
    return res.run_id, time.perf_counter() - start
