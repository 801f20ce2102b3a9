"""The web UIs as a user sees them, in a real headless Chromium: the MLflow UI comparing a distilled
student with its scratch twin, and optuna-dashboard showing a tuning study.

Everything is real and local: a `mlflow server` on PostgreSQL (the conftest fixture), tiny
synthetic videos, a one-epoch teacher, KD and scratch students, a two-trial study on SQLite and an
`optuna-dashboard` process. Chromium and chromedriver come from the system (Debian's `chromium`
and `chromium-driver`; `.ci/run` installs them); without them the tests skip.

Screenshots go to $KDHAR_TEST_ARTIFACTS when set, else to a pytest temporary folder; the test
prints where.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
import requests
from mlflow import MlflowClient
from selenium import webdriver
from selenium.common.exceptions import (
    ElementClickInterceptedException,
    ElementNotInteractableException,
    NoSuchElementException,
    StaleElementReferenceException,
    TimeoutException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.actions.wheel_input import ScrollOrigin
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from kdhar.config import ClipConfig, DataConfig, ModelConfig, OptimConfig, RunConfig
from kdhar.data.synthetic import SynthSpec, generate
from kdhar.distill import distill
from kdhar.train import run_training
from kdhar.tuning import SearchSpace, tune

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
        reason=f"needs {CHROMIUM} and {CHROMEDRIVER} (Debian: apt-get install chromium chromium-driver)",
    ),
]

# The pages are React apps that fetch their data after load; on 2 busy shared cores the first
# render of the MLflow UI takes tens of seconds, so every wait is generous.
PAGE_TIMEOUT_S = 120.0
DASHBOARD_START_TIMEOUT_S = 60.0

STUDY = "browser-ui"
KD_NAME = "kd-tiny3d→tiny3d-f1-s0"
SCRATCH_NAME = "scratch-tiny3d-f1-s0"
TEACHER_NAME = "teacher-tiny3d-s0"
FIRST_LOGGED = "window_acc"  # what a training run logs first
ACCURACY_PREFIXES = ("acc_", "best_acc_")  # the report's stage accuracies, first in key order
CHART_CARD = "experiment-view-compare-runs-card"


@dataclass(frozen=True)
class Runs:
    """What the training fixture leaves on the tracking server and in the Optuna storage."""

    uri: str
    experiment_id: str
    teacher_id: str
    kd_id: str
    scratch_id: str
    optuna_storage: str


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """Terminates a process, killing it when it does not exit in time."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _tiny_config(root: Path) -> RunConfig:
    return RunConfig(
        data=DataConfig(root=str(root), num_workers=0, val_fraction=0.2),
        clip=ClipConfig(clip_len=4, frame_interval=2, test_clips=1, resize=(40, 53), crop=32),
        model=ModelConfig(arch="tiny3d", width=4),
        # Batches of 2: an epoch of 18 steps reaches the 10 after which training logs its window
        # metrics, so the charts below show them as a real run's do.
        optim=OptimConfig(epochs=1, batch_size=2, threads=1),
    )


@pytest.fixture(scope="session")
def runs(mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    """A teacher, a KD student, its scratch twin and a two-trial tuning study, logged to the
    shared test server under an experiment of their own.

    Session-scoped, like the server: under pytest-xdist a module's tests need not run back to back
    on their worker, and a module-scoped fixture was then trained twice."""
    work = tmp_path_factory.mktemp("browser_ui")
    root = work / "ucf101"
    generate(root, "ucf101", SynthSpec(num_classes=3, groups=10, clips_per_group=2, frames=12, size=(48, 64), seed=3))
    cfg = _tiny_config(root)
    # The server is shared by the session: a unique experiment keeps the page to these runs, and
    # register=False keeps the registry's champions to the tests that check them.
    experiment = f"browser-ui-{uuid.uuid4().hex[:8]}"
    storage = f"sqlite:///{work / 'optuna.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        mp.chdir(work)  # checkpoints go to ./runs
        teacher = run_training(cfg, role="teacher", experiment=experiment, register=False, progress=False)
        teacher_uri = f"runs:/{teacher.run_id}"
        kd = distill(cfg, teacher=teacher_uri, experiment=experiment, register=False, progress=False)
        scratch = distill(cfg, teacher="none", experiment=experiment, register=False, progress=False)
        tune(cfg, teacher=teacher_uri, n_trials=2, study_name=STUDY, storage=storage,
             space=SearchSpace.parse("lr=0.002:0.01:log"), pruner="none", experiment=experiment, device="cpu")
    experiment_id = MlflowClient(mlflow_server).get_experiment_by_name(experiment).experiment_id
    return Runs(mlflow_server, experiment_id, teacher.run_id, kd.run_id, scratch.run_id, storage)


@pytest.fixture(scope="module")
def browser() -> Iterator:
    options = webdriver.ChromeOptions()
    # The system browser and driver: with both paths given, Selenium Manager downloads nothing.
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
        "--disable-dev-shm-usage",  # containers give /dev/shm 64 MB, too little for the renderer
        "--window-size=1600,1000",
        # Only 127.0.0.1 is reachable: no update checks, sync or other calls home.
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(PAGE_TIMEOUT_S)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where screenshots go: $KDHAR_TEST_ARTIFACTS/browser_ui when set (a folder to keep), else a
    pytest temporary folder."""
    env = os.environ.get("KDHAR_TEST_ARTIFACTS")
    folder = Path(env) / "browser_ui" if env else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _page_text(driver) -> str:
    return driver.find_element(By.TAG_NAME, "body").text


def _until(driver, condition, what: str, ignored: tuple[type[Exception], ...] = ()):
    """WebDriverWait(...).until(condition), failing with what never happened and what the page
    showed instead (a bare TimeoutException says neither)."""
    try:
        return WebDriverWait(driver, PAGE_TIMEOUT_S, poll_frequency=0.5, ignored_exceptions=ignored).until(condition)
    except TimeoutException:
        raise AssertionError(
            f"not after {PAGE_TIMEOUT_S:.0f} s: {what}\n--- page text ({driver.current_url}) ---\n{_page_text(driver)}"
        ) from None


def _wait_for_text(driver, *texts: str) -> str:
    """Waits until every text is visible on the page; returns the page text."""
    _until(driver, lambda d: all(t in _page_text(d) for t in texts), f"all of {list(texts)} shown")
    return _page_text(driver)


def _screenshot(driver, folder: Path, name: str, capsys: pytest.CaptureFixture) -> Path:
    path = folder / f"{name}.png"
    assert driver.save_screenshot(str(path)), f"no screenshot written to {path}"
    with capsys.disabled():  # the path is the point of the screenshot: show it even when passing
        print(f"\nscreenshot: {path}")
    return path


def _by_text(text: str) -> tuple[str, str]:
    """A locator for the element whose own text is `text` (no quotes in the texts used here)."""
    return By.XPATH, f"//*[normalize-space(text())='{text}']"


def _in_section(heading: str, text: str) -> tuple[str, str]:
    """A locator for `text` below a section heading of the compare view: the plots above the
    tables name params and metrics too (chips, hidden menus)."""
    return By.XPATH, f"//*[normalize-space(text())='{heading}']/following::*[normalize-space(text())='{text}']"


def _click(driver, locator: tuple[str, str]) -> None:
    """Clicks the element once the page lets a user click it.

    MLflow pops onboarding tips ("Got it") over the page at some point after loading; a click
    they intercept is retried after dismissing them, as a user would.
    """

    def attempt(d) -> bool:
        for tip in d.find_elements(By.XPATH, "//button[normalize-space(.)='Got it']"):
            tip.click()
        d.find_element(*locator).click()
        return True

    _until(driver, attempt, f"clicked {locator}", ignored=(
        NoSuchElementException, ElementClickInterceptedException,
        ElementNotInteractableException, StaleElementReferenceException,
    ))  # fmt: skip


def _scroll_metrics_table_until_shown(driver, metric: str) -> None:
    """Scrolls the compare view's metrics table with the mouse wheel until `metric` is listed.

    The table is a fixed-height virtualized grid: only the rows in view exist in the page, so a
    metric low in the alphabet is not there until the user scrolls the table itself.
    """
    # Of the two grids below the heading, the values scroll; the names column beside them is moved
    # by the page to follow (one wheel event late in MLflow 3.17.2, so names and values can be
    # out of step: the screenshot after this shows it).
    grids = driver.find_elements(
        By.XPATH, "//*[normalize-space(text())='Metrics']/following::div[contains(@class, 'ReactVirtualized__Grid')]"
    )
    values = next(g for g in grids if g.value_of_css_property("overflow-y") != "hidden")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", values)

    def shown_or_scroll(d) -> bool:
        if any(row.is_displayed() for row in d.find_elements(*_in_section("Metrics", metric))):
            return True
        ActionChains(d).scroll_from_origin(ScrollOrigin.from_element(values), 0, 100).perform()
        return False

    _until(driver, shown_or_scroll, f"{metric} listed in the metrics table")


def test_mlflow_ui_lists_the_runs_and_compares_kd_with_its_scratch_twin(runs: Runs, browser, shots, capsys):
    # The link MLflow prints after each run ("View experiment at").
    browser.get(f"{runs.uri}/#/experiments/{runs.experiment_id}")
    # MLflow 3.17 opens an experiment in its GenAI workflow (a traces overview with Usage, Quality
    # and Tool calls tabs, no runs) unless this browser chose "Model training" before; the loaded
    # landing page is kept as evidence.
    _wait_for_text(browser, "Model training", "Tool calls")
    _screenshot(browser, shots, "mlflow_experiment_landing", capsys)
    _click(browser, _by_text("Model training"))
    _wait_for_text(browser, KD_NAME, SCRATCH_NAME, TEACHER_NAME, f"tune-{STUDY}")
    _screenshot(browser, shots, "mlflow_experiment_runs", capsys)
    # Each name in a row of its own: three separate, visible cells at three heights.
    cells = [browser.find_element(*_by_text(name)) for name in (KD_NAME, SCRATCH_NAME, TEACHER_NAME)]
    assert all(cell.is_displayed() for cell in cells)
    assert len({cell.location["y"] for cell in cells}) == 3

    # The UI's own compare link: runs and experiments as JSON lists in the hash route's query.
    query = (f"runs={quote(json.dumps([runs.kd_id, runs.scratch_id]))}"
             f"&experiments={quote(json.dumps([runs.experiment_id]))}")
    browser.get(f"{runs.uri}/#/compare-runs?{query}")
    text = _wait_for_text(browser, "Comparing 2 Runs", KD_NAME, SCRATCH_NAME, "teacher.run_id")
    # Which teacher the KD run learned from: the param and the tags a user reads it by.
    for shown in ("teacher.run_id", runs.teacher_id, "teacher_run_id", "teacher_arch"):
        assert shown in text, f"{shown!r} not on the compare page"
    teacher_row = browser.find_element(*_in_section("Parameters", "teacher.run_id"))
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", teacher_row)
    _screenshot(browser, shots, "mlflow_compare_teacher", capsys)

    # The plot atop the page shows the first metric the runs logged: the training window's accuracy,
    # not a loss whose scale differs between KD and scratch.
    plotted = browser.find_element(By.XPATH, "//div[normalize-space(.)='Metrics:']/following-sibling::*[1]")
    assert plotted.text.split() == [FIRST_LOGGED], f"the compare page plots {plotted.text!r}"

    _scroll_metrics_table_until_shown(browser, "final_test_video_top1")
    _screenshot(browser, shots, "mlflow_compare_metrics", capsys)


def _chart_titles(driver) -> list[str]:
    """The titles of the chart cards on the page, in page order; MLflow renders only the cards near
    the view, so these are the ones a user sees first."""
    return [card.text for card in driver.find_elements(By.CSS_SELECTOR, f"[data-testid='{CHART_CARD}'] h4")]


@pytest.mark.parametrize("view", ["run", "experiment"])
def test_mlflow_charts_open_on_the_accuracy(runs: Runs, browser, shots, capsys, view: str):
    # The run page's "Model metrics" tab of the KD run, and the experiment's chart view with the KD
    # run, its scratch twin and the rest: MLflow sorts the charts by metric key.
    path = {"run": f"runs/{runs.kd_id}/model-metrics", "experiment": "runs?compareRunsMode=CHART"}[view]
    browser.get(f"{runs.uri}/#/experiments/{runs.experiment_id}/{path}")
    _wait_for_text(browser, "Model metrics", *([KD_NAME, SCRATCH_NAME] if view == "experiment" else [KD_NAME]))
    titles = _until(browser, _chart_titles, "chart cards shown")
    _screenshot(browser, shots, f"mlflow_{view}_charts", capsys)
    assert titles[0].startswith(ACCURACY_PREFIXES) or titles[0].endswith("video_top1"), titles
    assert not [t for t in titles if t.startswith(("window_", "batch_"))], f"noisy training curves first: {titles}"


@contextmanager
def _optuna_dashboard(storage: str, log_path: Path) -> Iterator[str]:
    """An optuna-dashboard process on a free loopback port; yields its URL once it answers."""
    port = _free_port()
    # wsgiref: one process that stops at once (gunicorn, the default when installed, forks workers,
    # takes seconds to stop and writes a control socket under $HOME).
    command = [str(Path(sys.executable).parent / "optuna-dashboard"), storage,
               "--host", "127.0.0.1", "--port", str(port), "--server", "wsgiref"]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + DASHBOARD_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"optuna-dashboard exited with code {proc.returncode}:\n{log_path.read_text()}")
            try:
                if requests.get(f"{url}/api/studies", timeout=1).ok:
                    break
            except (requests.ConnectionError, requests.Timeout):
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise RuntimeError(f"optuna-dashboard not up after {DASHBOARD_START_TIMEOUT_S:.0f} s:\n{log_path.read_text()}")
            time.sleep(0.25)  # a port to poll, not a page: nothing for WebDriverWait to watch yet
        yield url
    finally:
        _stop(proc)


def test_optuna_dashboard_shows_the_study_by_its_objective_name(runs: Runs, browser, shots, capsys, tmp_path):
    with _optuna_dashboard(runs.optuna_storage, tmp_path / "dashboard.log") as url:
        # From the list of studies to the study, as a user gets there.
        browser.get(f"{url}/dashboard")
        _click(browser, (By.PARTIAL_LINK_TEXT, STUDY))  # its card reads "<id>. <name>"
        # kdhar names the objective (study.set_metric_names); unnamed it would read "Objective 0".
        text = _wait_for_text(browser, "History", "val_video_top1")
        _screenshot(browser, shots, "optuna_dashboard_study", capsys)
        assert "Objective 0" not in text
