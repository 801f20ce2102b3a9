"""Reading an experiment spec: `load_spec` (a YAML file) and `parse_spec` (its parsed mapping) give a
`GridSpec` whose every value was checked, or one `SpecError` line naming the file, the key and the fix.

A spec is checked to the end before any cell trains: its keys and the type and range of each value
here, then every cell's configuration, built by `plan`, so a bad override fails now, not hours in.
`with_tuned` applies a tuning study's best KD settings to a checked spec.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import yaml

from kdhar import config as C
from kdhar.experiments.grid import DATASET_KEYS, MODEL_OVERRIDES, SPEC_KEYS, DatasetSpec, GridSpec, SpecError
from kdhar.experiments.plan import plan

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


def with_tuned(spec: GridSpec) -> GridSpec:
    """The spec with its `tuned` study's best KD settings (and lr) applied to the distilled cells."""
    if spec.tuned is None:
        return spec
    from kdhar import tuning

    best = tuning.best_settings(spec.tuned)
    kd = {k: best[k] for k in ("tau", "alpha", "lam") if k in best}
    kd_overrides = {k: best[k] for k in ("lr", "beta", "ramp") if k in best}  # beta, ramp: GKD's, for its cells
    return dataclasses.replace(spec, **kd, kd_overrides=kd_overrides)


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
        tuned, ssl = self.tuned(), self.ssl()
        kd_methods, finetune = self.kd_methods(ssl), self.finetune()
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
            teachers=self.archs("teachers"),
            students=self.archs("students"),
            self_distill=self.flag("self_distill"),
            fractions=fractions,
            seeds=self.distinct("seeds", self.numbers("seeds", int, "[0, 1, 2]")),
            teacher_seed=self.whole("teacher_seed", raw.get("teacher_seed", 0)),
            tau=self.number("tau", C.KDConfig.tau),
            lam=self.number("lam", C.KDConfig.lam),
            weighting=str(raw.get("weighting", C.KDConfig.weighting)),
            alpha=self.number("alpha", C.KDConfig.alpha),
            finetune=finetune,
            cache_teacher=self.flag("cache_teacher"),
            tuned=tuned,
            ssl=str(ssl),
            keep_checkpoints=self.flag("keep_checkpoints"),
            kd_methods=[str(m) for m in dict.fromkeys(kd_methods)],
            task=self.task(ssl, kd_methods, finetune),
        )

    def check_combination(self, spec: GridSpec) -> None:
        """What no single key shows: replayed views, the teachers' clips, the KD settings together."""
        if spec.cache_teacher and int(spec.overrides.get("views", 0)) < 1:
            raise self.fail("cache_teacher replays fixed views: add e.g. 'views: 4' to overrides, so scratch and "
                            "KD students see the same number of augmented views")
        self.model_keys_only("teacher_overrides", spec.teacher_overrides, "students feed their own clips to the teacher")
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
        return DatasetSpec(name=str(d["name"]), root=str(d["root"]), split=self.whole(f"{key}.split", d.get("split", 1)),
                           fraction=frac, split_dir=str(d.get("split_dir") or ""))

    def tuned(self) -> str | None:
        tuned = self.raw.get("tuned")
        if tuned is not None and not (isinstance(tuned, str) and tuned.strip()):
            raise self.fail(f"tuned: {tuned!r} must be the name of an Optuna study made by `kdhar tune`")
        return tuned

    def ssl(self) -> str:
        ssl = self.raw.get("ssl", "none")
        if ssl not in C.SSL_METHODS:
            raise self.fail(f"ssl: {ssl!r} must be one of {', '.join(C.SSL_METHODS)} (pcl: students train inside PCL)")
        if "ssl" in (self.raw.get("overrides") or {}):
            raise self.fail("ssl goes at the top of the spec (ssl: pcl), where it applies to the students only; "
                            "teachers and fine-tunes stay supervised")
        return ssl

    def kd_methods(self, ssl: str) -> list[str]:
        methods = self.raw.get("kd", ["logit"])
        methods = [methods] if isinstance(methods, str) else methods
        if not isinstance(methods, list) or not methods or any(m not in C.KD_METHODS for m in methods):
            raise self.fail(f"kd: {self.raw.get('kd')!r} must be a list of {', '.join(C.KD_METHODS)}, "
                            "e.g. kd: [logit, gkd]")
        overrides = self.raw.get("overrides") or {}
        if "kd" in overrides or "attention" in overrides:
            raise self.fail("kd goes at the top of the spec (kd: [logit, gkd]), where it picks the KD cells' "
                            "methods; the teachers and scratch twins follow from it")
        if ssl != "none" and any(m != "logit" for m in methods):
            raise self.fail("kd: GKD trains on single clips; it does not combine with ssl: pcl")
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
        if "gkd+logit" in kd_methods:
            raise self.fail("task: detection distils with kd: [logit, gkd] (logit: per-step scores); "
                            "gkd+logit is recognition's")
        return task

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

    def archs(self, key: str) -> list[str]:
        from kdhar.models import MODELS  # torch: loaded only once a spec is read

        names = self.raw[key]
        if isinstance(names, str):
            names = [names]
        names = self.listed(key, "[c3d, r3d_18]") if not isinstance(names, list) else names
        bad = [n for n in names if n not in MODELS]
        if bad:
            raise self.fail(f"{key}: unknown architecture {', '.join(map(str, bad))}; "
                            f"choose from {', '.join(sorted(MODELS))}")
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
