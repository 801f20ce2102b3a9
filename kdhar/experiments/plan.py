"""A grid's cells: `plan` turns a spec into every run it asks for, in run order, each with the
`RunConfig` that `build_run_config` makes from its overrides, and `cell_hash` names each cell's run.

Cells come in five waves, each run after the one it needs: teachers, PCL pretrainings (`kd_stage:
after_ssl` only), scratch students (they start from the pretrainings' runs there), distilled
students (they learn from the teachers' runs), fine-tunes on the transfer dataset (they start from
the students' runs). Cells of one wave are independent and may train in parallel.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from kdhar import config as C
from kdhar.experiments.grid import DETECTION_KEYS, OVERRIDES, SIZES, TASKS, DatasetSpec, GridSpec, SpecError, method_overrides

WAVES = ("teacher", "pretrain", "scratch", "kd", "finetune")

# What a teacher of a grid with GKD cells trains with: GKD's phase 1 (its attention module and CVAE,
# the regeneration weight ramped over the whole run, the CVAE's Adam at 1e-3).
GKD_TEACHER = {"attention": True, "gkd_ramp": 1.0, "cvae_lr": 1e-3}
SECTIONS = ("data", "clip", "model", "optim", "pcl", "gkd", "feature", "window", "det", "finetune")


@dataclass(frozen=True)
class Cell:
    """One run of the grid.

    `teacher` is the teacher run's name of a distilled student (its architecture in a grid of one
    run per architecture), "none" for a scratch student and for a teacher cell itself; a teacher
    cell's own name is `name`. A cell that starts from another cell's model carries it as `source`:
    a fine-tune its student, a student of `kd_stage: after_ssl` its PCL pretraining.
    """

    role: str  # teacher | pretrain | student | finetune
    arch: str
    teacher: str
    fraction: float
    seed: int
    cfg: C.RunConfig
    source: Cell | None = None
    name: str = ""  # a teacher cell's name, which its distilled cells give as `teacher`

    @property
    def teacher_id(self) -> str:
        """What distilled cells call this teacher cell by (its architecture unless it is named)."""
        return self.name or self.arch

    @property
    def wave(self) -> str:
        """Cells of one wave are independent and may run in parallel."""
        if self.role == "student":
            return "scratch" if self.teacher == "none" else "kd"
        return self.role

    def label(self) -> str:
        """The cell in a few words, for progress lines and run names."""
        if self.cfg.task == "detection":
            return "detection " + self._label()
        return self._label()

    def _label(self) -> str:
        if self.role == "teacher":
            return f"teacher {self.arch}" if self.teacher_id == self.arch else f"teacher {self.teacher_id} ({self.arch})"
        if self.role == "pretrain":
            return f"pretrain {self.arch} (pcl) fraction={self.fraction:g} seed={self.seed}"
        if self.role == "student":
            via = "scratch" if self.teacher == "none" else f"<- {self.teacher}"
            pcl = " (pcl)" if self.cfg.pcl.ssl == "pcl" else " (from pcl)" if self.source is not None else ""
            g = self.cfg.gkd
            method = "" if not g.attention else (" [attention]" if self.teacher == "none" else f" [{g.method}]")
            if g.method == "feature":
                method = " [feature]"
            if g.attention and g.ablation != "none":
                method = method[:-1] + f", {g.ablation}]"
            return f"student {self.arch}{pcl} {via}{method} fraction={self.fraction:g} seed={self.seed}"
        src = self.source
        via = "scratch" if src.teacher == "none" else f"<- {src.teacher}"
        return f"finetune {self.arch} ({via} fraction={src.fraction:g} seed={src.seed}) on {self.cfg.data.dataset}"


# ---------------------------------------------------------------- one cell's configuration

def build_run_config(
    arch: str,
    *,
    size: str,
    overrides: dict[str, Any],
    dataset: DatasetSpec,
    fraction: float,
    seed: int,
    kd: C.KDConfig | None = None,
    task: str = "recognition",
    recipe: str | None = None,
) -> C.RunConfig:
    """Defaults -> size preset -> overrides, the same order as the command line. A detection run
    (`task`) takes the detection preset of its size on top of the size's own.

    `recipe` is a grid's (`C.RECIPES`): "gkd" gives the cell GKD's recipe for its size (`C.GKD_RECIPE`)
    whether it has the attention module or not, "preset" gives it none; None (a single run) gives
    it to runs with the attention module only.

    Raises:
        SpecError: an unknown override key, size or task, or a value of the wrong type or range.
    """
    base = C.RunConfig()
    if task not in TASKS:
        raise SpecError(f"task {task!r} is not one of {', '.join(TASKS)}")
    _check_overrides(size, overrides, base)
    sections = _preset_sections(size, overrides, recipe, task)
    keys = {**OVERRIDES, **(DETECTION_KEYS if task == "detection" else {})}
    for key, value in overrides.items():
        section, name = keys[key]
        sections[section][name] = tuple(value) if name == "resize" else value
    if size == "cpu" and "crop" in overrides and "resize" not in overrides:
        # The CPU preset's resize is 8/7 of its crop at the synthetic videos' 4:3 aspect; keep that
        # ratio when only the crop changes (the command line does the same).
        crop = overrides["crop"]
        sections["clip"]["resize"] = (round(crop * 8 / 7), round(crop * 8 / 7 * 4 / 3))
    data = dataclasses.replace(
        base.data, dataset=dataset.name, root=dataset.root, split=dataset.split, split_dir=dataset.split_dir,
        fraction=fraction, **sections["data"],
    )
    cfg = C.RunConfig(
        data=data,
        clip=dataclasses.replace(base.clip, **sections["clip"]),
        model=dataclasses.replace(base.model, arch=arch, **sections["model"]),
        optim=dataclasses.replace(base.optim, seed=seed, **sections["optim"]),
        kd=kd or base.kd,
        pcl=dataclasses.replace(base.pcl, **sections["pcl"]),
        gkd=dataclasses.replace(base.gkd, **sections["gkd"]),
        feature=dataclasses.replace(base.feature, **sections["feature"]),
        task=task,
        window=dataclasses.replace(base.window, **sections["window"]),
        det=dataclasses.replace(base.det, **sections["det"]),
        finetune=dataclasses.replace(base.finetune, **sections["finetune"]),
    )
    try:
        C.check_run_config(cfg)
    except (ValueError, TypeError) as exc:
        raise SpecError(str(exc)) from None
    return cfg


def _check_overrides(size: str, overrides: dict[str, Any], base: C.RunConfig) -> None:
    """Refuses an unknown size, an unknown override key or an override of the wrong type."""
    if size not in SIZES:
        raise SpecError(f"size {size!r} is not one of {', '.join(SIZES)}")
    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise SpecError(f"unknown override {', '.join(unknown)}; valid: {', '.join(sorted(OVERRIDES))}")
    for key, value in overrides.items():
        section, name = OVERRIDES[key]
        check_override(key, value, getattr(getattr(base, section), name))


def _preset_sections(size: str, overrides: dict[str, Any], recipe: str | None = None,
                     task: str = "recognition") -> dict[str, dict[str, Any]]:
    """The size's preset, section by section, with the presets of detection, PCL, PCL's fine-tuning
    and GKD where the task and the overrides (or the grid's `recipe`) turn them on; the overrides
    themselves go on top."""
    if recipe is not None and recipe not in C.RECIPES:
        raise SpecError(f"recipe {recipe!r} is not one of {', '.join(C.RECIPES)}")
    preset = C.CPU_PRESET if size == "cpu" else {}
    sections: dict[str, dict[str, Any]] = {name: dict(preset.get(name, {})) for name in SECTIONS}
    if task == "detection":
        for name, values in (C.DET_CPU_PRESET if size == "cpu" else C.DET_PAPER_PRESET).items():
            sections[name].update(values)
    if overrides.get("ssl") == "pcl":
        sections["model"]["modality"] = "res"  # PCL's input, unless the overrides say otherwise
        for name, values in (C.PCL_CPU_PRESET if size == "cpu" else C.PCL_PAPER_PRESET).items():
            sections[name].update(values)
    if overrides.get("finetune_protocol") == "pcl":
        for name, values in C.PCL_FINETUNE_PRESET[size].items():
            sections[name].update(values)
    if overrides.get("kd", "logit") in C.GKD_METHODS:
        sections["gkd"]["attention"] = True  # GKD distils the attention module's outputs
    attention = bool(overrides.get("attention") or sections["gkd"].get("attention"))
    if task == "detection":
        # A detection run keeps its own optimiser settings and the detection preset's GKD knobs:
        # every detection method uses the same ones.
        return sections
    if recipe == "gkd" or (recipe is None and attention):
        for name, values in C.GKD_RECIPE[size].items():
            sections[name].update(values)
    if attention:
        for name, values in C.GKD_MODULE_PRESET[size].items():
            sections[name].update(values)
    return sections


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


# ---------------------------------------------------------------- the grid's cells

def plan(spec: GridSpec) -> list[Cell]:
    """Every cell of the grid in run order: teachers, PCL pretrainings, scratch students, distilled
    students, fine-tunes.

    Raises:
        SpecError: an override that makes some cell's configuration invalid.
    """
    teachers = [
        Cell("teacher", t.arch, "none", 1.0, seed,
             build_run_config(t.arch, size=spec.size, dataset=spec.dataset, fraction=1.0, seed=seed,
                              overrides={**_shared(spec), **(GKD_TEACHER if spec.attention else {}), **spec.teacher_overrides,
                                         **t.overrides},
                              recipe=spec.cell_recipe, task=spec.task),
             name=name)
        for t, seed, name in spec.teacher_runs()
    ]
    pretrain: list[Cell] = []
    scratch: list[Cell] = []
    kd: list[Cell] = []
    for s in spec.students:
        for frac in spec.fractions:
            for seed in spec.seeds:
                _student_cells(spec, s, frac, seed, pretrain, scratch, kd)
    return teachers + pretrain + scratch + kd + _finetune_cells(spec, scratch + kd)


def _shared(spec: GridSpec) -> dict[str, Any]:
    """The overrides of the cells around the students (teachers, fine-tunes): the spec's, and in a
    PCL grid the students' normalisation, since a teacher sees the students' clips and a fine-tune
    starts from their weights."""
    if spec.ssl != "pcl":
        return dict(spec.overrides)
    return {"normalize": C.PCL_PROTOCOL["clip"]["normalize"], **spec.overrides}


def _student_cells(spec: GridSpec, arch: str, frac: float, seed: int, pretrain: list[Cell], scratch: list[Cell],
                   kd: list[Cell]) -> None:
    """Adds one student's cells at one fraction and seed: its scratch run (and, with GKD, its
    attention twin) to `scratch`, one distilled run per KD method and teacher run to `kd`. Every
    cell takes the grid's recipe, so the rows differ in their method alone. With `kd_stage:
    after_ssl`, its label-free PCL pretraining goes to `pretrain`, and the scratch and distilled
    runs start from it, supervised, with the pretraining's recipe (clips, optimiser, schedule)."""
    overrides = {**spec.overrides, **spec.student_overrides.get(arch, {})}
    if spec.ssl != "none":
        overrides["ssl"] = spec.ssl

    def config(**method: Any) -> C.RunConfig:
        return build_run_config(arch, size=spec.size, dataset=spec.dataset, fraction=frac, seed=seed, kd=spec.kd,
                                overrides={**overrides, **spec.fraction_overrides.get(frac, {}), **method},
                                recipe=spec.cell_recipe, task=spec.task)

    source = None
    if spec.kd_stage == "after_ssl":
        source = Cell("pretrain", arch, "none", frac, seed, config())
        pretrain.append(source)

    def student(teacher: str, **method: Any) -> Cell:
        cfg = config(**method)
        if source is not None:  # supervised from the pretraining, with its recipe
            cfg = dataclasses.replace(cfg, pcl=dataclasses.replace(cfg.pcl, ssl="none"))
        return Cell("student", arch, teacher, frac, seed, cfg, source=source)

    scratch.append(student("none"))
    if spec.attention:  # the attention module without a teacher, GKD's own baseline
        scratch.append(student("none", attention=True))
    for method in spec.kd_methods:
        kd += [student(name, **method_overrides(method)) for t, _, name in spec.teacher_runs()
               if t.arch != arch or spec.self_distill]

def _finetune_cells(spec: GridSpec, students: list[Cell]) -> list[Cell]:
    """One fine-tune on the transfer dataset per student cell, if the spec asks for them."""
    if not spec.finetune or spec.transfer is None:
        return []
    cells = []
    for src in students:
        overrides = {**_shared(spec), **spec.student_overrides.get(src.arch, {}), **spec.transfer_overrides}
        overrides.pop("ssl", None)  # a fine-tune is supervised, whatever its source was trained with
        if src.cfg.pcl.ssl == "pcl":  # PCL's code's fine-tuning, unless transfer_overrides say otherwise
            overrides.setdefault("finetune_protocol", "pcl")
        cfg = build_run_config(src.arch, size=spec.size, overrides=overrides, recipe=spec.cell_recipe,
                               dataset=spec.transfer, fraction=spec.transfer.fraction, seed=src.seed)
        cells.append(Cell("finetune", src.arch, "none", spec.transfer.fraction, src.seed, cfg, source=src))
    return cells


def cell_hash(cell: Cell, *, source_run: str | None = None, teacher_run: str | None = None) -> str:
    """The `config_hash` a cell's run carries: its configuration plus where its knowledge comes from.

    A distilled student's hash names the teacher architecture and the run of the teacher it is
    distilled from (`teacher_run`), so a retrained champion teacher makes its students run again.
    A cell with a `source` (a fine-tune, a student of `kd_stage: after_ssl`) names the run it starts
    from (`source_run`).
    """
    from kdhar.train import config_hash

    init = None
    if cell.source is not None:
        if source_run is None:
            raise ValueError(f"{cell.label()}: the run it starts from is needed for its hash")
        init = f"runs:/{source_run}"
    if cell.role == "student" and cell.teacher != "none":
        if teacher_run is None:
            raise ValueError(f"{cell.label()}: the teacher's run id is needed for its hash")
        return config_hash(cell.cfg, f"{cell.teacher}@{teacher_run}", init)
    # Teachers, pretrainings and scratch students share this form; the role tag tells them apart.
    return config_hash(cell.cfg, None, init)
