"""Reading an experiment spec: `load_spec` (a YAML file) and `parse_spec` (its parsed mapping) give a
`GridSpec` whose every value was checked, or one `SpecError` line naming the file, the key and the fix.

A spec is checked to the end before any cell trains: its keys and the type and range of each value
here, then every cell's configuration, built by `plan`, so a bad override fails now, not hours in.
`tuned_plan` is `plan` with the `tuned:` studies' best settings applied to the cells each measured.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import yaml

from kdhar import config as C
from kdhar.experiments.grid import (
    DATASET_KEYS,
    GRID_METHODS,
    KD_STAGES,
    MODEL_OVERRIDES,
    SPEC_KEYS,
    TUNED_ARMS,
    DatasetSpec,
    GridSpec,
    SpecError,
    TeacherSpec,
    teacher_runs,
)
from kdhar.experiments.plan import Cell, plan

REQUIRED_KEYS = ("experiment", "dataset", "teachers", "students", "fractions", "seeds")


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
    """Builds a GridSpec from already-parsed YAML, checking every value (see `load_spec`).

    Raises:
        SpecError: "SOURCE: what is wrong with which key".
    """
    read = _SpecReader(raw, source)
    read.check_keys()
    spec = read.grid_spec()
    read.check_combination(spec)
    try:
        plan(spec)  # builds every configuration, so a bad override fails here, not hours in
    except SpecError as exc:
        raise read.fail(str(exc)) from exc
    return spec


def tuned_plan(spec: GridSpec, source: str = "spec") -> list[Cell]:
    """`plan(spec)`, each student cell with the best settings (KD knobs, lr) of the `tuned:` study of
    its arm that measured it: the same student, data and budget (`tuning.StudyRecord.differences`).

    A distilled cell's arm is its teacher run's name, else its teacher recipe's, else "kd"; a scratch
    cell's is "scratch". A cell whose arm has no studies keeps the spec's settings.

    Raises:
        SpecError: in one line, a study that cannot be read, or a cell that none of its arm's studies
            measured (naming how the closest one differs).
    """
    cells = plan(spec)
    if not spec.tuned:
        return cells
    from kdhar import tuning

    recipes = {name: t.name for t, _, name in spec.teacher_runs()}
    studies = _TunedStudies()
    tuned: dict[int, Cell] = {}
    for cell in (c for c in cells if c.role == "student"):
        arms = ("scratch",) if cell.teacher == "none" else (cell.teacher, recipes.get(cell.teacher), "kd")
        arm = next((a for a in arms if a in spec.tuned), None)
        if arm is None:
            continue
        try:
            values = studies.best_for(spec.tuned[arm], cell)
        except ValueError as exc:
            raise SpecError(f"{source}: tuned.{arm}: {exc}") from None
        tuned[id(cell)] = dataclasses.replace(cell, cfg=tuning.trial_config(cell.cfg, values))
    # Fine-tunes start from the tuned student cells (run_grid finds a source by identity).
    return [tuned.get(id(c)) or (dataclasses.replace(c, source=tuned[id(c.source)]) if id(c.source) in tuned else c)
            for c in cells]


class _TunedStudies:
    """The studies a grid's `tuned:` names and the fingerprints of the data they are compared on,
    each read once per `tuned_plan`."""

    def __init__(self) -> None:
        self.records: dict[str, Any] = {}
        self.fingerprints: dict[tuple, str] = {}

    def best_for(self, studies: list[str], cell: Cell) -> dict[str, float]:
        """The best settings of the first of `studies` that measured `cell`'s run.

        Raises:
            ValueError: a study that cannot be read, or none that measured the cell.
        """
        from kdhar import tuning

        for name in studies:
            if name not in self.records:
                self.records[name] = tuning.load_record(name)
        fingerprint = self.fingerprint(cell.cfg)
        found = {name: self.records[name].differences(cell.cfg, cell.teacher == "none", fingerprint) for name in studies}
        for name, diff in found.items():
            if not diff:
                return self.records[name].best
        name, diff = min(found.items(), key=lambda item: len(item[1]))
        more = f" and {len(diff) - 3} more" if len(diff) > 3 else ""
        raise ValueError(f"no study measured {cell.label()}: study '{name}' differs in {', '.join(diff[:3])}{more}; "
                         "tune one with the cell's settings, or leave this arm out of tuned")

    def fingerprint(self, cfg: C.RunConfig) -> str:
        """The fingerprint of a cell's full training list, as a study records it."""
        from kdhar.data.index import fingerprint, load_index

        d = cfg.data
        key = (d.dataset, d.root, d.split, d.split_dir, d.on_missing)
        if key not in self.fingerprints:
            try:
                index = load_index(d.dataset, d.root, d.split, "train", on_missing=d.on_missing,
                                   split_dir=d.split_dir or None)
            except (OSError, ValueError) as exc:
                raise ValueError(f"the dataset at {d.root} cannot be read to compare with the study's: {exc}") from None
            self.fingerprints[key] = fingerprint(index)
        return self.fingerprints[key]


class _SpecReader:
    """One spec's raw values, each read through a check; `fail` makes the error naming the source."""

    def __init__(self, raw: dict[str, Any], source: str) -> None:
        self.raw, self.source = raw, source

    def fail(self, msg: str) -> SpecError:
        return SpecError(f"{self.source}: {msg}")

    def check_keys(self) -> None:
        unknown = sorted(set(self.raw) - SPEC_KEYS)
        if unknown:
            raise self.fail(f"unknown key {', '.join(unknown)}; valid keys: {', '.join(sorted(SPEC_KEYS))}")
        for key in REQUIRED_KEYS:
            if key not in self.raw:
                raise self.fail(f"missing key '{key}'")

    def grid_spec(self) -> GridSpec:
        """Every key read and checked, in the order a mistake is most useful to hear of first."""
        raw = self.raw
        fractions = self.fractions()
        teachers, teacher_seeds = self.teachers(), self.teacher_seeds()
        tuned, ssl = self.tuned(teachers, teacher_seeds), self.ssl()
        kd_methods, finetune, kd_stage = self.kd_methods(ssl), self.finetune(), self.kd_stage(ssl)
        return GridSpec(
            experiment=str(raw["experiment"]),
            dataset=self.dataset("dataset"),
            transfer=self.dataset("transfer") if "transfer" in raw else None,
            size=str(raw.get("size", "cpu")),
            overrides=dict(raw.get("overrides") or {}),
            teacher_overrides=dict(raw.get("teacher_overrides") or {}),
            transfer_overrides=dict(raw.get("transfer_overrides") or {}),
            student_overrides=self.per_student(),
            fraction_overrides=self.per_fraction(fractions),
            teachers=teachers,
            students=self.archs("students"),
            self_distill=self.flag("self_distill"),
            fractions=fractions,
            seeds=self.distinct("seeds", self.numbers("seeds", int, "[0, 1, 2]")),
            teacher_seeds=teacher_seeds,
            tau=self.number("tau", C.KDConfig.tau),
            lam=self.number("lam", C.KDConfig.lam),
            weighting=str(raw.get("weighting", C.default_kd_weighting(ssl, kd_stage))),
            alpha=self.number("alpha", C.KDConfig.alpha),
            finetune=finetune,
            cache_teacher=self.flag("cache_teacher"),
            tuned=tuned,
            ssl=str(ssl),
            kd_stage=kd_stage,
            keep_checkpoints=self.flag("keep_checkpoints"),
            kd_methods=[str(m) for m in dict.fromkeys(kd_methods)],
            task=self.task(ssl, kd_methods, finetune),
            recipe=self.recipe(),
        )

    def check_combination(self, spec: GridSpec) -> None:
        """What no single key shows: replayed views, the teachers' clips, the KD settings together."""
        if spec.cache_teacher and int(spec.overrides.get("views", 0)) < 1:
            raise self.fail("cache_teacher replays fixed views: add e.g. 'views: 4' to overrides, so scratch and "
                            "KD students see the same number of augmented views")
        self.model_keys_only("teacher_overrides", spec.teacher_overrides, "students feed their own clips to the teacher")
        if "finetune_protocol" in spec.overrides:
            raise self.fail("finetune_protocol goes in transfer_overrides, where it shapes the fine-tunes only "
                            "(the default: pcl for students trained inside PCL, else plain)")
        from kdhar.objectives.kd import check_kd

        try:
            check_kd(spec.tau, spec.weighting, spec.alpha, spec.lam)
        except ValueError as exc:
            raise self.fail(str(exc)) from None

    # ------------------------------------------------------------ one value

    def whole(self, key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):  # int(1.7) would quietly be 1
            raise self.fail(f"{key}: {value!r} is not a whole number")
        return value

    def flag(self, key: str) -> bool:
        value = self.raw.get(key, False)
        if not isinstance(value, bool):  # bool("false") is True: only YAML's true/false are accepted
            raise self.fail(f"{key}: {value!r} is not a boolean; write true or false without quotes")
        return value

    def number(self, key: str, default: float) -> float:
        value = self.raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(f"{key}: {value!r} is not a finite number")
        return float(value)

    def dataset(self, key: str) -> DatasetSpec:
        d = self.raw[key]
        if not isinstance(d, dict) or "name" not in d or "root" not in d:
            raise self.fail(f"'{key}' needs at least 'name' and 'root', e.g. {{name: ucf101, root: data/ucf101}}")
        bad = sorted(set(d) - DATASET_KEYS)
        if bad:
            raise self.fail(f"unknown key {', '.join(bad)} in '{key}'; valid: {', '.join(sorted(DATASET_KEYS))}")
        frac = float(d.get("fraction", 1.0))
        if not 0 < frac <= 1:
            raise self.fail(f"{key}.fraction {frac} is outside (0, 1]")
        split = self.whole(f"{key}.split", d.get("split", 1))
        if split not in C.SPLITS:  # else the grid would fail at its first cell, after planning every one
            raise self.fail(f"{key}.split: {split} is not one of the official splits {', '.join(map(str, C.SPLITS))}")
        return DatasetSpec(name=str(d["name"]), root=str(d["root"]), split=split,
                           fraction=frac, split_dir=str(d.get("split_dir") or ""))

    def tuned(self, teachers: list[TeacherSpec], seeds: list[int]) -> dict[str, list[str]]:
        """`tuned: STUDY` (the distilled cells) or a mapping of arm -> study or list of studies, the
        arms being scratch, kd, or a teacher recipe's or teacher run's name."""
        tuned = self.raw.get("tuned")
        if tuned is None:
            return {}
        example = "tuned: {scratch: STUDY, kd: [STUDY, ...]}"
        tuned = {"kd": tuned} if isinstance(tuned, str) else tuned
        if not isinstance(tuned, dict) or not tuned:
            raise self.fail(f"tuned: {self.raw.get('tuned')!r} must be a study made by `kdhar tune` or a mapping, e.g. {example}")
        arms = [*TUNED_ARMS, *dict.fromkeys(t.name for t in teachers), *(name for _, _, name in teacher_runs(teachers, seeds))]
        out = {}
        for arm, studies in tuned.items():
            if arm not in arms:
                raise self.fail(f"tuned: {arm!r} is not one of {', '.join(map(str, dict.fromkeys(arms)))}")
            studies = [studies] if isinstance(studies, str) else studies
            if not isinstance(studies, list) or not studies or not all(isinstance(n, str) and n.strip() for n in studies):
                raise self.fail(f"tuned.{arm}: {tuned[arm]!r} must be a study name or a list of them, e.g. {example}")
            out[str(arm)] = [str(n) for n in studies]
        return out

    def ssl(self) -> str:
        ssl = self.raw.get("ssl", "none")
        if ssl not in C.SSL_METHODS:
            raise self.fail(f"ssl: {ssl!r} must be one of {', '.join(C.SSL_METHODS)} (pcl: students train inside PCL)")
        if "ssl" in (self.raw.get("overrides") or {}):
            raise self.fail("ssl goes at the top of the spec (ssl: pcl), where it applies to the students only; "
                            "teachers and fine-tunes stay supervised")
        return ssl

    def kd_stage(self, ssl: str) -> str:
        stage = self.raw.get("kd_stage", "during_ssl")
        if stage not in KD_STAGES:
            raise self.fail(f"kd_stage: {stage!r} must be one of {', '.join(KD_STAGES)} (during_ssl: KD inside PCL; "
                            "after_ssl: KD from an encoder pretrained inside PCL)")
        if stage == "after_ssl" and ssl != "pcl":
            raise self.fail("kd_stage: after_ssl distils from an encoder pretrained inside PCL: add ssl: pcl")
        return stage

    def kd_methods(self, ssl: str) -> list[str]:
        methods = self.raw.get("kd", ["logit"])
        methods = [methods] if isinstance(methods, str) else methods
        if not isinstance(methods, list) or not methods or any(m not in GRID_METHODS for m in methods):
            raise self.fail(f"kd: {self.raw.get('kd')!r} must be a list of {', '.join(GRID_METHODS)}, "
                            "e.g. kd: [logit, gkd]")
        overrides = self.raw.get("overrides") or {}
        if "kd" in overrides or "attention" in overrides or "gkd_ablation" in overrides:
            raise self.fail("kd goes at the top of the spec (kd: [logit, gkd]), where it picks the KD cells' "
                            "methods; the teachers and scratch twins follow from it")
        if ssl != "none" and any(m != "logit" for m in methods):
            raise self.fail("kd: feature KD and GKD train on single clips; they do not combine with ssl: pcl")
        return methods

    def task(self, ssl: str, kd_methods: list[str], finetune: bool) -> str:
        task = self.raw.get("task", "recognition")
        if task not in C.TASKS:
            raise self.fail(f"task: {task!r} must be one of {', '.join(C.TASKS)}")
        if task != "detection":
            return task
        dataset = (self.raw.get("dataset") or {}).get("name") if isinstance(self.raw.get("dataset"), dict) else None
        if dataset != "thumos14":
            raise self.fail(f"task: detection trains on untrimmed videos: give dataset {{name: thumos14, root: ...}}, "
                            f"not {dataset!r}")
        if ssl != "none" or finetune or self.raw.get("cache_teacher"):
            raise self.fail("task: detection takes none of ssl, finetune and cache_teacher")
        if self.raw.get("recipe") is not None:
            raise self.fail("task: detection trains every cell with the detection preset of its size: leave recipe out")
        other = [m for m in kd_methods if m not in ("logit", "gkd")]
        if other:
            raise self.fail(f"task: detection distils with kd: [logit, gkd] (logit: per-step scores); "
                            f"{', '.join(other)} {'is' if len(other) == 1 else 'are'} recognition's")
        return task

    def recipe(self) -> str | None:
        recipe = self.raw.get("recipe")
        if recipe is not None and recipe not in C.RECIPES:
            raise self.fail(f"recipe: {recipe!r} must be one of {', '.join(C.RECIPES)} (gkd: GKD's recipe for every "
                            "cell, the default with a GKD method; preset: the size preset alone)")
        return recipe
    def finetune(self) -> bool:
        finetune = self.flag("finetune")
        if finetune and "transfer" not in self.raw:
            raise self.fail("finetune is on but no 'transfer' dataset is given (e.g. {name: hmdb51, root: data/hmdb51})")
        return finetune

    # ------------------------------------------------------------ lists

    def listed(self, key: str, example: str) -> list[Any]:
        value = self.raw[key]
        if not isinstance(value, list) or not value:
            raise self.fail(f"{key}: expected a non-empty list, e.g. {key}: {example}; got {value!r}")
        return value

    def distinct(self, key: str, values: list[Any]) -> list[Any]:
        twice = sorted({v for v in values if values.count(v) > 1})
        if twice:
            raise self.fail(f"{key}: {', '.join(map(str, twice))} given more than once; each would plan the same "
                            "cells again")
        return values

    def numbers(self, key: str, kind: type, example: str) -> list[Any]:
        values = self.listed(key, example)
        ok = (int,) if kind is int else (int, float)
        bad = [v for v in values if isinstance(v, bool) or not isinstance(v, ok)]
        if bad:
            raise self.fail(f"{key}: {bad[0]!r} is not a {'whole ' if kind is int else ''}number (e.g. {key}: {example})")
        return [kind(v) for v in values]

    def fractions(self) -> list[float]:
        fractions = self.distinct("fractions", self.numbers("fractions", float, "[1.0, 0.25]"))
        bad = [f for f in fractions if not 0 < f <= 1]
        if bad:
            raise self.fail(f"fractions {bad} are outside (0, 1]; the paper uses 1.0, 0.5, 0.25, 0.02")
        return fractions

    def teachers(self) -> list[TeacherSpec]:
        """Each entry an architecture, or a mapping {arch, name, <model overrides>} naming a recipe of
        its own (e.g. {arch: c3d, name: c3d-res, modality: res}); names must be distinct."""
        entries = self.raw["teachers"]
        entries = [entries] if isinstance(entries, (str, dict)) else entries
        if not isinstance(entries, list) or not entries:
            self.listed("teachers", "[c3d, {arch: c3d, name: c3d-res, modality: res}]")  # raises, with an example
        teachers = []
        for entry in entries:
            if isinstance(entry, dict):
                if "arch" not in entry:
                    raise self.fail(f"teachers: {entry!r} needs an arch, e.g. {{arch: c3d, name: c3d-res, modality: res}}")
                overrides = {k: v for k, v in entry.items() if k not in ("arch", "name")}
                self.model_keys_only(f"teachers.{entry.get('name', entry['arch'])}", overrides,
                                     "students feed their own clips to the teacher")
                teachers.append(TeacherSpec(str(entry.get("name", entry["arch"])), str(entry["arch"]), overrides))
            else:
                teachers.append(TeacherSpec(str(entry), str(entry)))
        self.known_archs("teachers", [t.arch for t in teachers])
        names = [t.name for t in teachers]
        bad = [n for n in names if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", n) or n in ("none", *TUNED_ARMS)]
        if bad:
            raise self.fail(f"teachers: name {bad[0]!r} must be letters, digits, '.', '_' or '-', and not none, scratch or kd")
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise self.fail(f"teachers: {', '.join(twice)} given more than once; name each recipe, e.g. "
                            "{arch: c3d, name: c3d-res, modality: res}")
        return teachers

    def teacher_seeds(self) -> list[int]:
        """`teacher_seeds: [0, 1]` (one teacher run per recipe and seed) or `teacher_seed: 0`."""
        if "teacher_seeds" in self.raw and "teacher_seed" in self.raw:
            raise self.fail("give teacher_seed or teacher_seeds, not both")
        for key in ("teacher_seeds", "teacher_seed"):  # teacher_seed may list them too
            if isinstance(self.raw.get(key), list) or key == "teacher_seeds" and key in self.raw:
                return self.distinct(key, self.numbers(key, int, "[0, 1]"))
        return [self.whole("teacher_seed", self.raw.get("teacher_seed", 0))]

    def known_archs(self, key: str, names: list[Any]) -> None:
        from kdhar.models import MODELS  # torch: loaded only once a spec is read

        bad = [n for n in names if n not in MODELS]
        if bad:
            raise self.fail(f"{key}: unknown architecture {', '.join(map(str, bad))}; "
                            f"choose from {', '.join(sorted(MODELS))}")

    def archs(self, key: str) -> list[str]:
        names = self.raw[key]
        if isinstance(names, str):
            names = [names]
        names = self.listed(key, "[c3d, r3d_18]") if not isinstance(names, list) else names
        self.known_archs(key, names)
        return [str(n) for n in names]

    # ------------------------------------------------------------ per-student and per-fraction overrides

    def model_keys_only(self, where: str, keys: dict[str, Any], why: str) -> None:
        """Refuses overrides of how clips are cut where a teacher and its students must agree on them."""
        clip_keys = sorted(set(keys) - MODEL_OVERRIDES)
        if clip_keys:
            raise self.fail(f"{where} may not set {', '.join(clip_keys)}: {why}; "
                            f"allowed: {', '.join(sorted(MODEL_OVERRIDES))}")

    def per_student(self) -> dict[str, dict[str, Any]]:
        value = self.raw.get("student_overrides") or {}
        if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
            raise self.fail("student_overrides: expected a mapping of student architecture -> overrides, "
                            "e.g. {r3d_18: {epochs: 12}}")
        strays = sorted(set(value) - set(self.archs("students")))
        if strays:
            raise self.fail(f"student_overrides: {', '.join(map(str, strays))} is not in students")
        for arch, keys in value.items():
            self.model_keys_only(f"student_overrides.{arch}", keys, "a teacher takes only the clips it was trained on")
        return {str(arch): dict(keys) for arch, keys in value.items()}

    def per_fraction(self, fractions: list[float]) -> dict[float, dict[str, Any]]:
        value = self.raw.get("fraction_overrides") or {}
        if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
            raise self.fail("fraction_overrides: expected a mapping of fraction -> overrides, "
                            "e.g. {0.02: {batch_size: 4}}")
        out = {}
        for frac, keys in value.items():
            if isinstance(frac, bool) or not isinstance(frac, (int, float)) or float(frac) not in fractions:
                raise self.fail(f"fraction_overrides: {frac!r} is not one of the fractions {fractions}")
            self.model_keys_only(f"fraction_overrides.{frac}", keys, "a teacher takes only the clips it was trained on")
            out[float(frac)] = dict(keys)
        return out
