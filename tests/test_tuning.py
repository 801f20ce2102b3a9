"""Tuning: search-space parsing, studies on SQLite and PostgreSQL, several workers, a killed worker.

Everything runs for real: tiny synthetic videos decoded by decord, a one-epoch tiny teacher, a
SQLite MLflow store per test and a fresh PostgreSQL database per multi-worker test.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from kdhar import tracking
from kdhar.config import ClipConfig, DataConfig, GKDConfig, KDConfig, ModelConfig, OptimConfig, RunConfig
from kdhar.tuning import (
    ParamRange,
    SearchSpace,
    StorageUnavailableError,
    dashboard_command,
    make_storage,
    mask_url,
    reconcile,
    best_settings,
    study_trials,
    tune,
)
from tests.conftest import SEVERAL_PROCESSES

EXPERIMENT = "tune-test"
PG_ADMIN = dict(host="127.0.0.1", port=5432, user="postgres", dbname="postgres")


def tiny_config(root: Path, epochs: int = 2) -> RunConfig:
    return RunConfig(
        data=DataConfig(root=str(root), num_workers=0, val_fraction=0.1),
        clip=ClipConfig(clip_len=4, frame_interval=1, test_clips=1, resize=(40, 53), crop=32, augment=False),
        model=ModelConfig(arch="tiny3d", width=4, dropout=0.0),
        optim=OptimConfig(batch_size=8, epochs=epochs, lr=0.05, deterministic=False),
    )


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, Path]:
    """Three-class synthetic videos and a teacher checkpoint trained on them for one epoch."""
    from kdhar.data.synthetic import SynthSpec, generate
    from kdhar.train import run_training

    base = tmp_path_factory.mktemp("tune-data")
    spec = SynthSpec(num_classes=3, groups=4, clips_per_group=2, frames=8, size=(48, 64), difficulty=0.0)
    root = generate(base / "ucf101", layout="ucf101", spec=spec).root
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{base / 'teacher-mlflow.db'}")
        mp.chdir(base)
        res = run_training(tiny_config(root, epochs=1), role="teacher", experiment="teacher", register=False, progress=False)
    return {"root": Path(root), "teacher": base / "runs" / "checkpoints" / res.run_id / "last.pt"}


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """Each test gets its own MLflow store, Optuna database and checkpoint folder."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def pg_url():
    """A fresh PostgreSQL database, dropped afterwards."""
    psycopg2 = pytest.importorskip("psycopg2")
    name = f"kdhar_tune_{uuid.uuid4().hex[:10]}"
    admin = psycopg2.connect(**PG_ADMIN)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    with admin.cursor() as cur:
        # FORCE: pooled connections of the test process may still be open.
        cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.close()


def kept_checkpoints(workdir: Path) -> list[str]:
    """The checkpoint files the study left under ./runs/checkpoints, as "<run id>/<file>"."""
    root = workdir / "runs" / "checkpoints"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def best_runs(study: str) -> set[str]:
    """The runs of the study's complete trials that reached its best value (several when tied)."""
    complete = [t for t in study_trials(None, study) if t["state"] == "COMPLETE"]
    best = max(t["value"] for t in complete)
    return {t["user_attrs"]["mlflow_run_id"] for t in complete if t["value"] == best}


def children_of(parent_id: str) -> list[dict]:
    return tracking.find_runs(EXPERIMENT, f"tags.mlflow.parentRunId = '{parent_id}'")


def parents(study: str) -> list[dict]:
    return tracking.find_runs(EXPERIMENT, f"tags.optuna_study = '{study}' and tags.role = 'tuning'")


# ---------------------------------------------------------------------------- search space
def test_search_space_parses_overrides_and_keeps_defaults():
    space = SearchSpace.parse("tau=2:8:log, lam=0:2", weighting="sum")
    assert space.tau == ParamRange(2.0, 8.0, log=True)
    assert space.lam == ParamRange(0.0, 2.0, log=False)
    assert space.alpha is None and space.lr == SearchSpace().lr
    assert SearchSpace.parse("lam=0.5:1.5", weighting="sum").tau == SearchSpace().tau
    assert SearchSpace.parse(None) == SearchSpace.parse("") == SearchSpace()
    assert SearchSpace.parse(str(space), weighting="sum") == space


def test_default_space_searches_the_learning_rate_and_the_weight_that_acts():
    mix, paper = SearchSpace.default("mix"), SearchSpace.default("sum")
    assert mix.names() == ["tau", "alpha", "lr"] and paper.names() == ["tau", "lam", "lr"]
    assert mix.lr.log and mix.lr.low < 0.02 < mix.lr.high  # the CPU preset's lr sits inside
    assert SearchSpace.parse("lr=none").names() == ["tau", "alpha"]
    with pytest.raises(ValueError, match="lam does not act under --kd-weighting mix"):
        SearchSpace.parse("lam=0.1:2")
    with pytest.raises(ValueError, match="alpha is a share"):
        SearchSpace.parse("alpha=0.1:1.5")


@pytest.mark.parametrize(
    "text, bad",
    [
        ("temp=1:4", "temp=1:4"),  # unknown parameter
        ("tau=4:4", "tau=4:4"),  # empty range
        ("tau=8:2:log", "tau=8:2:log"),
        ("tau=1:20:log,alpha", "alpha"),  # no '='
        ("tau=1-20", "tau=1-20"),  # bad syntax
        ("alpha=a:1", "alpha=a:1"),
        ("tau=1:2:cubic", "tau=1:2:cubic"),
        ("tau=0:2:log", "tau=0:2:log"),  # log of zero; tau must stay > 0 anyway
        ("alpha=-1:1", "alpha=-1:1"),
        ("tau=1:2,tau=3:4", "tau=3:4"),
        ("tau=1:2,", "''"),
    ],
)
def test_search_space_errors_name_the_bad_part(text, bad):
    with pytest.raises(ValueError) as err:
        SearchSpace.parse(text)
    assert bad in str(err.value)


def test_heartbeat_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="--heartbeat-interval 0: must be at least 1 second"):
        make_storage(f"sqlite:///{tmp_path / 'o.db'}", heartbeat_interval=0)
    with pytest.raises(ValueError, match="--grace-period 5: must be at least the heartbeat interval"):
        make_storage(f"sqlite:///{tmp_path / 'o.db'}", heartbeat_interval=10, grace_period=5)
    assert make_storage(f"sqlite:///{tmp_path / 'o.db'}", heartbeat_interval=2, grace_period=4) is not None


def test_storage_errors_are_one_line_and_hide_the_password():
    with pytest.raises(StorageUnavailableError) as err:
        make_storage("postgresql://postgres:s3cret@127.0.0.1:1/nothing")  # nothing listens on port 1
    msg = str(err.value)
    assert "\n" not in msg and "s3cret" not in msg and "127.0.0.1:1" in msg
    with pytest.raises(StorageUnavailableError, match="not a usable database URL"):
        make_storage("nosuchdb://x")
    assert mask_url("postgresql://u:pw@h:5432/d") == "postgresql://u:***@h:5432/d"
    assert dashboard_command(None) == "optuna-dashboard sqlite:///optuna.db"


def test_a_bare_postgresql_url_works_as_optunas_docs_write_it_and_psycopg2_urls_still_do(pg_url):
    import optuna

    bare = make_storage(pg_url)  # postgresql://: SQLAlchemy 2.1 picks psycopg 3
    assert bare.engine.dialect.driver == "psycopg"
    study = optuna.create_study(study_name="drivers", storage=bare, direction="maximize")
    study.tell(study.ask(), 0.5)
    named = make_storage(pg_url.replace("postgresql://", "postgresql+psycopg2://"))
    assert named.engine.dialect.driver == "psycopg2"
    assert optuna.load_study(study_name="drivers", storage=named).best_value == 0.5
    for storage in (bare, named):
        storage.engine.dispose()


# ---------------------------------------------------------------------------- one worker
def test_study_nests_trials_under_one_parent_and_resumes(tiny_data, workdir):
    cfg = tiny_config(tiny_data["root"])
    # Low learning rates: at lr ~0.03+ students of this one-epoch teacher can collapse (tested below).
    space = SearchSpace.parse("lr=0.002:0.01:log")
    kw = dict(teacher=str(tiny_data["teacher"]), study_name="s1", storage=None, pruner="none",
              experiment=EXPERIMENT, seed=3, cache_teacher=True, device="cpu", space=space)
    lines = []
    first = tune(cfg, n_trials=3, log=lines.append, **kw)
    assert (workdir / "optuna.db").exists()  # the embedded default storage
    assert [line.split(":")[0] for line in lines] == ["trial 0 complete", "trial 1 complete", "trial 2 complete"]
    import optuna

    assert optuna.load_study(study_name="s1", storage="sqlite:///optuna.db").metric_names == ["val_video_top1"]
    assert first["complete"] == 3 and first["trials"] == 3 and first["epochs"] == 6
    [parent] = parents("s1")
    assert parent["run_id"] == first["parent_run_id"]
    assert parent["params"]["search_space"] == str(space)
    assert parent["metrics"]["best_val_video_top1"] == pytest.approx(first["best_value"])

    trials = {t["number"]: t for t in study_trials(None, "s1")}
    runs = children_of(parent["run_id"])
    assert len(runs) == 3
    for run in runs:
        trial = trials[int(run["tags"]["optuna_trial_number"])]
        assert run["tags"]["optuna_study"] == "s1" and run["tags"]["optuna_state"] == "COMPLETE"
        assert trial["user_attrs"]["mlflow_run_id"] == run["run_id"]
        assert float(run["params"]["kd.tau"]) == pytest.approx(trial["params"]["tau"])
        assert float(run["params"]["kd.alpha"]) == pytest.approx(trial["params"]["alpha"])
        assert float(run["params"]["optim.lr"]) == pytest.approx(trial["params"]["lr"])
        assert run["metrics"]["best_val_video_top1"] == pytest.approx(trial["value"])
    assert len({t["params"]["tau"] for t in trials.values()}) == 3  # no point sampled twice
    # Of the trials' checkpoints only the best trial's best.pt is kept (every trial used to keep two).
    [kept] = kept_checkpoints(workdir)
    assert kept.endswith("/best.pt") and kept.split("/")[0] in best_runs("s1")

    # The same command with a larger budget continues the study under the same parent.
    second = tune(cfg, n_trials=4, **kw)
    assert second["trials"] == 4 and second["parent_run_id"] == first["parent_run_id"]
    assert len(children_of(parent["run_id"])) == 4 and len(parents("s1")) == 1
    [kept] = kept_checkpoints(workdir)
    assert kept.endswith("/best.pt") and kept.split("/")[0] in best_runs("s1")
    assert [t["params"] for t in study_trials(None, "s1")][:3] == [trials[i]["params"] for i in range(3)]
    # A full study runs nothing more.
    assert tune(cfg, n_trials=4, **kw)["trials"] == 4

    # A different search space under the same name is refused before any trial runs.
    with pytest.raises(ValueError, match="search_space"):
        tune(cfg, n_trials=6, **{**kw, "space": SearchSpace.parse("tau=1:4")})
    # So is a worker whose trials would measure something else (more epochs, half the data), in one
    # line naming the differences; a thread count of its own is fine (nothing more to run here).
    longer = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, epochs=cfg.optim.epochs + 1),
                                 data=dataclasses.replace(cfg.data, fraction=0.5))
    with pytest.raises(ValueError, match=r"created for other trials \(data.fraction 1.0 -> 0.5, optim.epochs 2 -> 3\)"):
        tune(longer, n_trials=6, **kw)
    threads = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, threads=1))
    assert tune(threads, n_trials=4, **kw)["trials"] == 4
    assert len(children_of(parent["run_id"])) == 4


def test_collapsed_trials_fail_with_a_reason_and_best_settings_skip_them(tiny_data, workdir):
    from click.testing import CliRunner

    from kdhar.cli import cli
    from kdhar.experiments import DatasetSpec, build_run_config

    # lr 4-6 under the paper's unweighted sum throws every student into a constant output. Batch 2
    # for 9 epochs: 54 steps on the 12 training videos, past the 50 before which no run is judged.
    # Built as `kdhar tune` builds it from the options below, so the command can rejoin the study.
    options = {"width": 4, "clip_len": 4, "frame_interval": 1, "crop": 32, "test_clips": 1, "epochs": 9, "batch_size": 2,
               "warmup": 0.0, "num_workers": 0}
    cfg = build_run_config("tiny3d", size="cpu", overrides=options, dataset=DatasetSpec("ucf101", str(tiny_data["root"])),
                           fraction=1.0, seed=0, kd=KDConfig(weighting="sum"))
    summary = tune(cfg, teacher=str(tiny_data["teacher"]), n_trials=2, study_name="collapse", storage=None,
                   space=SearchSpace.parse("lr=4:6", weighting="sum"), pruner="none", experiment=EXPERIMENT,
                   seed=0, cache_teacher=True, device="cpu")
    assert (summary["failed"], summary["complete"]) == (2, 0)
    for trial in study_trials(None, "collapse"):
        assert trial["state"] == "FAIL" and trial["user_attrs"]["fail_reason"].startswith("collapsed")
    [parent] = parents("collapse")
    for run in children_of(parent["run_id"]):
        assert run["tags"]["optuna_state"] == "FAIL" and run["tags"]["collapsed"] == "true"
    with pytest.raises(ValueError, match="no complete trial"):
        best_settings("collapse")
    assert kept_checkpoints(workdir) == []  # no complete trial, nothing worth keeping

    # The command on this spent study (no trial left to run) ends in one line and exit status 1: it
    # printed "best val acc None" and exited 0, so a script went on without settings.
    args = ["tune", "--teacher", str(tiny_data["teacher"]), "--student", "tiny3d", "--n-trials", "2", "--study-name",
            "collapse", "--kd-weighting", "sum", "--space", "lr=4:6", "--pruner", "none", "--cache-teacher", "true",
            "--experiment", EXPERIMENT, "--root", str(tiny_data["root"]), "--device", "cpu", "--seed", "0",
            *(f"--{k.replace('_', '-')}={v}" for k, v in options.items())]
    done = CliRunner().invoke(cli, args)
    assert done.exit_code == 1, done.output
    assert done.output.strip().splitlines()[-1] == (
        "Error: study collapse: no trial completed (0 complete, 0 pruned, 2 failed), so it has no best settings; each "
        "trial's fail_reason (its MLflow tag and Optuna user attribute) says why: change the search space or the teacher")


def test_pruned_trials_stop_early_and_show_as_pruned(tiny_data, workdir):
    import optuna

    # Validation accuracy never reaches 1.01, so this real Optuna pruner stops every trial at its
    # first report: each trial trains one of its three epochs.
    always = optuna.pruners.ThresholdPruner(lower=1.01)
    summary = tune(tiny_config(tiny_data["root"], epochs=3), teacher=str(tiny_data["teacher"]), n_trials=2,
                   study_name="pruned", storage=None, pruner=always, experiment=EXPERIMENT, seed=0,
                   cache_teacher=True, device="cpu")
    assert (summary["pruned"], summary["complete"], summary["epochs"]) == (2, 0, 2)
    assert summary["best_value"] is None
    [parent] = parents("pruned")
    assert parent["params"]["pruner"] == "ThresholdPruner" and parent["metrics"]["n_pruned"] == 2
    trials = {t["number"]: t for t in study_trials(None, "pruned")}
    assert {t["state"] for t in trials.values()} == {"PRUNED"}
    for run in children_of(parent["run_id"]):
        assert run["status"] == "FINISHED"
        assert run["tags"]["optuna_state"] == "PRUNED" and run["tags"]["stopped_early"] == "pruned"
        assert trials[int(run["tags"]["optuna_trial_number"])]["user_attrs"]["mlflow_run_id"] == run["run_id"]
        assert [step for step, _ in tracking.metric_history(run["run_id"], "val_video_top1")] == [1]
    assert kept_checkpoints(workdir) == []  # pruned trials keep no checkpoint


def test_named_pruners():
    import optuna

    from kdhar.tuning import PRUNERS, make_pruner

    kinds = {name: type(make_pruner(name, max_epochs=12)) for name in PRUNERS}
    assert kinds == {"median": optuna.pruners.MedianPruner, "asha": optuna.pruners.SuccessiveHalvingPruner,
                     "hyperband": optuna.pruners.HyperbandPruner, "none": optuna.pruners.NopPruner}


def test_tune_refuses_bad_inputs_before_any_trial(tiny_data, workdir):
    cfg = tiny_config(tiny_data["root"])
    kw = dict(n_trials=2, study_name="bad", experiment=EXPERIMENT, seed=0, cache_teacher=False, device="cpu",
              space=SearchSpace(), storage=None, pruner="none")
    with pytest.raises(ValueError, match="tau, alpha do not act without a teacher"):
        tune(cfg, teacher="none", **kw)  # the default KD space, for a scratch study
    with pytest.raises(ValueError, match="val_seeds 0"):
        tune(cfg, teacher="none", **{**kw, "space": SearchSpace.default(scratch=True), "val_seeds": 0})
    with pytest.raises(ValueError, match="pruner 'sometimes'"):
        tune(cfg, teacher=str(tiny_data["teacher"]), **{**kw, "pruner": "sometimes"})
    with pytest.raises(StorageUnavailableError):
        tune(cfg, teacher=str(tiny_data["teacher"]), **{**kw, "storage": "postgresql://postgres@127.0.0.1:1/x"})
    assert tracking.find_runs(EXPERIMENT, "tags.optuna_study = 'bad'") == []


# ---------------------------------------------------------------------------- scratch studies and tuned grids
def test_scratch_study_tunes_the_lr_over_several_validation_seeds(tiny_data, workdir):
    """End to end: 2 trials x 2 seeds of a one-epoch scratch run (a few seconds on one core), the one
    path that gives a scratch twin the tuning budget of its distilled twin."""
    from kdhar.data.index import fingerprint, load_index
    from kdhar.tuning import load_record

    cfg = tiny_config(tiny_data["root"], epochs=1)
    assert SearchSpace.parse(None, scratch=True).names() == ["lr"]
    with pytest.raises(ValueError, match="tau does not act without a teacher"):
        SearchSpace.parse("tau=1:4", scratch=True)
    summary = tune(cfg, teacher="none", n_trials=2, storage=None, pruner="none", experiment=EXPERIMENT, seed=0,
                   device="cpu", val_seeds=2, space=SearchSpace.parse("lr=0.005:0.05:log", scratch=True))
    name = summary["study_name"]
    assert name.startswith("scratch-tiny3d-ucf101-") and (summary["complete"], summary["epochs"]) == (2, 4)
    [parent] = parents(name)
    assert parent["params"]["val_seeds"] == "2" and "trained from scratch" in parent["tags"]["mlflow.note.content"]
    runs = {r["run_id"]: r for r in children_of(parent["run_id"])}
    for trial in study_trials(None, name):
        mine = [runs[i] for i in trial["user_attrs"]["mlflow_run_ids"]]
        assert sorted(r["params"]["optim.seed"] for r in mine) == ["0", "1"]  # each seed its own validation groups
        assert all(float(r["params"]["optim.lr"]) == pytest.approx(trial["params"]["lr"]) for r in mine)
        assert not any(k.startswith("kd.") for r in mine for k in r["params"])  # no teacher, no KD knob
        assert trial["value"] == pytest.approx(sum(r["metrics"]["best_val_video_top1"] for r in mine) / 2)
    # The study records what it measured, and a grid cell is compared with it.
    record = load_record(name)
    fp = fingerprint(load_index("ucf101", str(tiny_data["root"]), 1, "train"))
    assert record.scratch and record.searched == ["lr"] and record.best == {"lr": summary["best_params"]["lr"]}
    assert record.differences(cfg, True, fp) == []
    longer = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, epochs=3))
    assert record.differences(longer, True, fp) == ["optim.epochs 1 (cell: 3)"]
    assert record.differences(cfg, False, fp) == ["teacher 'none' (cell: a teacher)"]


def grid(root: Path, **changes) -> dict:
    """A grid spec of tiny cells on the tiny set: two teacher recipes (RGB and residual frames)."""
    raw = {"experiment": "tuned-grid", "dataset": {"name": "ucf101", "root": str(root)}, "size": "cpu",
           "overrides": {"epochs": 2, "batch_size": 8, "num_workers": 0},
           "teachers": ["c3d", {"arch": "c3d", "name": "c3d-res", "modality": "res"}], "students": ["tiny3d"],
           "fractions": [1.0, 0.5], "seeds": [0, 1]}
    return {**raw, **changes}


def recorded_study(name: str, cell, teacher: str, best: dict[str, float], root: Path) -> None:
    """A study in ./optuna.db whose record says it measured `cell`'s run, with one complete trial."""
    import optuna

    from kdhar.data.index import fingerprint, load_index
    from kdhar.tuning import ATTR_CONFIG, ATTR_SPACE, study_config

    space = SearchSpace(**{k: (ParamRange(0.001, 10) if k in best else None) for k in ("tau", "alpha", "lr")})
    fp = fingerprint(load_index("ucf101", str(root), 1, "train"))
    study = optuna.create_study(study_name=name, storage="sqlite:///optuna.db", direction="maximize")
    study.set_user_attr(ATTR_SPACE, str(space))
    study.set_user_attr(ATTR_CONFIG, json.dumps(study_config(cell.cfg, space, teacher, fp), sort_keys=True, default=str))
    dist = {k: optuna.distributions.FloatDistribution(0.001, 10) for k in best}
    study.add_trial(optuna.trial.create_trial(params=best, distributions=dist, value=0.5))


def test_tuned_cells_take_the_study_that_measured_them(tiny_data, workdir):
    from kdhar.experiments import parse_spec, plan, tuned_plan

    root = tiny_data["root"]
    cells = plan(parse_spec(grid(root)))
    first = {(c.wave, c.teacher, c.fraction): c for c in cells if c.role == "student" and c.seed == 0}
    for frac, tag in ((1.0, "f1"), (0.5, "f05")):
        recorded_study(f"s-{tag}", first[("scratch", "none", frac)], "none", {"lr": 0.01 * frac}, root)
        recorded_study(f"k-{tag}", first[("kd", "c3d", frac)], "c3d", {"tau": 3.0, "alpha": 0.7, "lr": 0.005 * frac}, root)
    recorded_study("res-f1", first[("kd", "c3d-res", 1.0)], "c3d", {"tau": 2.0, "alpha": 0.2, "lr": 0.03}, root)
    tuned = {"scratch": ["s-f1", "s-f05"], "kd": ["k-f1", "k-f05"]}
    spec = parse_spec(grid(root, tuned=tuned))
    for cell in tuned_plan(spec):
        if cell.role == "teacher":
            assert cell.cfg.optim.lr == 0.02  # teachers are never tuned
        elif cell.teacher == "none":
            assert cell.cfg.optim.lr == pytest.approx(0.01 * cell.fraction)
        else:  # both teachers' cells take the kd studies, each the one at its own fraction
            assert (cell.cfg.kd.tau, cell.cfg.kd.alpha, cell.cfg.optim.lr) == (3.0, 0.7, pytest.approx(0.005 * cell.fraction))
    # A teacher's own studies go before kd's; a teacher-run arm with no study for a cell is refused.
    own = tuned_plan(parse_spec(grid(root, fractions=[1.0], tuned={**tuned, "c3d-res": "res-f1"})))
    assert {(c.teacher, c.cfg.kd.tau) for c in own if c.wave == "kd"} == {("c3d", 3.0), ("c3d-res", 2.0)}


@pytest.mark.parametrize("changes, message", [
    # a longer budget than the study measured
    ({"overrides": {"epochs": 3, "batch_size": 8, "num_workers": 0}},
     r"tuned\.scratch: no study measured student tiny3d scratch fraction=1 seed=0: study 's-f1' differs in "
     r"optim\.epochs 2 \(cell: 3\)"),
    # another student
    ({"students": ["c3d"], "self_distill": True}, r"study 's-f1' differs in model\.arch 'tiny3d' \(cell: 'c3d'\)"),
    # another share of the data: no study of the arm measured fraction 0.5
    ({"fractions": [1.0, 0.5]}, r"fraction=0\.5 seed=0: study 's-f1' differs in data\.fraction 1\.0 \(cell: 0\.5\)"),
    # a scratch study given for distilled cells
    ({"tuned": {"kd": "s-f1"}}, r"tuned\.kd: no study measured student tiny3d <- c3d fraction=1 seed=0: study 's-f1' "
                                r"differs in teacher 'none' \(cell: a teacher\)"),
    ({"tuned": {"scratch": "unrecorded"}}, r"tuned\.scratch: study 'unrecorded' does not record what its trials measured"),
])
def test_tuned_refuses_a_study_that_measured_another_cell(tiny_data, workdir, changes, message):
    import optuna

    from kdhar.experiments import SpecError, parse_spec, plan, tuned_plan

    root = tiny_data["root"]
    cells = plan(parse_spec(grid(root, fractions=[1.0])))
    recorded_study("s-f1", next(c for c in cells if c.wave == "scratch" and c.seed == 0), "none", {"lr": 0.01}, root)
    optuna.create_study(study_name="unrecorded", storage="sqlite:///optuna.db", direction="maximize")
    spec = parse_spec(grid(root, **{"fractions": [1.0], "tuned": {"scratch": "s-f1"}, **changes}))
    with pytest.raises(SpecError, match=message) as err:
        tuned_plan(spec, "grid.yaml")
    assert "\n" not in str(err.value) and str(err.value).startswith("grid.yaml: tuned.")


def test_a_gkd_study_refuses_a_teacher_without_its_attention_module_before_any_trial(tiny_data, workdir, monkeypatch):
    # The teacher was checked only inside the first trial: Optuna printed the trial's traceback, and
    # the study, its parent run and a failed trial run were left behind.
    cfg = dataclasses.replace(tiny_config(tiny_data["root"]), gkd=GKDConfig(method="gkd", attention=True))
    kw = dict(n_trials=1, study_name="gkd", experiment=EXPERIMENT, seed=0, cache_teacher=False, device="cpu",
              storage=None, pruner="none")
    checkpoint = tiny_data["teacher"]
    run_id = checkpoint.parent.name
    # A checkpoint file whose run lives in another tracking store: GKD's parts are not here.
    with pytest.raises(ValueError) as refused:
        tune(cfg, teacher=str(checkpoint), **kw)
    line = str(refused.value)
    assert f"teacher {checkpoint}: its run {run_id} is not in the tracking store sqlite:///{workdir}" in line
    assert "set MLFLOW_TRACKING_URI to the store it was trained in" in line
    assert "`kdhar train-teacher --arch tiny3d --attention`" in line and "\n" not in line
    assert tracking.find_runs(EXPERIMENT) == [] and not (workdir / "optuna.db").exists()

    # In its own store the run is found, but it was trained without the attention module.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{checkpoint.parents[3] / 'teacher-mlflow.db'}")
    with pytest.raises(ValueError, match=rf"teacher runs:/{run_id} has no GKD attention module and CVAE: train one "
                                         r"with `kdhar train-teacher --arch tiny3d --attention`"):
        tune(cfg, teacher=f"runs:/{run_id}", **kw)
    assert tracking.find_runs(EXPERIMENT) == [] and not (workdir / "optuna.db").exists()


# ---------------------------------------------------------------------------- several workers
WORKER = """
import json, sys, torch
from pathlib import Path
from kdhar.config import ClipConfig, DataConfig, KDConfig, ModelConfig, OptimConfig, RunConfig
from kdhar.tuning import SearchSpace, tune
a = json.loads(sys.argv[1])
torch.set_num_threads(1)
cfg = RunConfig(
    data=DataConfig(root=a["root"], num_workers=0, val_fraction=0.1),
    clip=ClipConfig(clip_len=4, frame_interval=1, test_clips=1, resize=(40, 53), crop=32, augment=False),
    model=ModelConfig(arch="tiny3d", width=4, dropout=0.0),
    optim=OptimConfig(batch_size=8, epochs=a["epochs"], lr=0.05, deterministic=False),
)
print(json.dumps(tune(cfg, teacher=a["teacher"], n_trials=a["n_trials"], study_name=a["study"],
    storage=a["storage"], pruner="none", experiment=a["experiment"], seed=0, cache_teacher=False,
    device="cpu", heartbeat_interval=1, grace_period=a["grace"],
    space=SearchSpace.parse("lr=0.002:0.01:log"))))  # low lr: no trial of this weak teacher collapses
"""


def start_worker(tiny_data, workdir: Path, storage: str, n_trials: int, epochs: int = 2, grace: int = 3) -> subprocess.Popen:
    args = dict(root=str(tiny_data["root"]), teacher=str(tiny_data["teacher"]), n_trials=n_trials, study="shared",
                storage=storage, experiment=EXPERIMENT, epochs=epochs, grace=grace)
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, json.dumps(args)], cwd=workdir, env=dict(os.environ),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 120) -> dict:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


@SEVERAL_PROCESSES
def test_two_workers_share_a_postgres_study(tiny_data, workdir, pg_url):
    procs = [start_worker(tiny_data, workdir, pg_url, n_trials=3) for _ in range(2)]
    results = [finish(p) for p in procs]
    trials = study_trials(pg_url, "shared")
    assert sorted(t["number"] for t in trials) == [0, 1, 2]
    assert all(t["state"] == "COMPLETE" for t in trials)
    assert {r["parent_run_id"] for r in results} == {parents("shared")[0]["run_id"]}
    assert len(parents("shared")) == 1
    runs = children_of(results[0]["parent_run_id"])
    numbers = sorted(int(r["tags"]["optuna_trial_number"]) for r in runs)
    assert numbers == [0, 1, 2]  # each trial ran exactly once
    assert {r["run_id"] for r in runs} == {t["user_attrs"]["mlflow_run_id"] for t in trials}
    # The two workers sampled with different seeds: no duplicated points.
    assert len({t["params"]["tau"] for t in trials}) == 3


@SEVERAL_PROCESSES
def test_killed_worker_trial_is_failed_retried_and_its_run_ended(tiny_data, workdir, pg_url):
    # Both workers run the same settings (a worker with other epochs would be refused by the study),
    # and the first is killed as soon as its trial's run appears: the run stays RUNNING through its
    # epochs and the export and upload of its model, seconds even for two tiny epochs. (Longer
    # trials of this weak teacher are flagged collapsed, which would end the retry FAIL.)
    doomed = start_worker(tiny_data, workdir, pg_url, n_trials=1)
    deadline = time.monotonic() + 90
    killed_run = None
    while killed_run is None:
        assert doomed.poll() is None, doomed.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the first worker never started its trial"
        time.sleep(0.3)
        runs = tracking.find_runs(EXPERIMENT, "tags.optuna_trial_number = '0' and attributes.status = 'RUNNING'")
        killed_run = runs[0]["run_id"] if runs else None
    os.kill(doomed.pid, signal.SIGKILL)
    doomed.wait()
    assert tracking.run_status(killed_run) == "RUNNING"  # what a killed process leaves behind

    # The budget is one trial, held by the dead worker's: the survivor must wait for it to go
    # stale (no heartbeat for 2 s) and then run its retry rather than leave the study unfinished.
    survivor = finish(start_worker(tiny_data, workdir, pg_url, n_trials=1, grace=2), timeout=300)
    reconcile(pg_url, "shared", heartbeat_interval=1, grace_period=2)
    trials = {t["number"]: t for t in study_trials(pg_url, "shared")}
    assert trials[0]["state"] == "FAIL"
    retries = [t for t in trials.values() if t["retry_of"] == 0]
    assert len(retries) == 1 and retries[0]["state"] == "COMPLETE", retries[0]["user_attrs"]
    assert retries[0]["params"] == trials[0]["params"]
    assert len(trials) == 2 and survivor["complete"] == 1
    assert tracking.run_status(killed_run) == "KILLED"
    [killed] = [r for r in children_of(survivor["parent_run_id"]) if r["run_id"] == killed_run]
    assert killed["tags"]["optuna_state"] == "FAIL"
    [retry_run] = [r for r in children_of(survivor["parent_run_id"]) if r["run_id"] == retries[0]["user_attrs"]["mlflow_run_id"]]
    assert retry_run["tags"]["optuna_retry_of"] == "0"


@pytest.mark.parametrize("name", ["it's", "a b", "", "x" * 129, "-lead", "semi;colon"])
def test_study_names_that_would_break_mlflow_filters_are_refused(name):
    # A quote in the name broke the filter strings that find a study's runs, so a study with a
    # failed trial could never be resumed.
    from kdhar.tuning import check_study_name

    with pytest.raises(ValueError, match="use letters, digits"):
        check_study_name(name)
    assert check_study_name("kd-c3d-tiny3d_v1.2") == "kd-c3d-tiny3d_v1.2"
