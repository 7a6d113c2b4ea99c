"""The MLflow UI, in headless Chromium (Debian's package, driven by Playwright), lists a study's runs and shows a
train run's metrics. Screenshots go to outputs/screenshots/ (kept by CI as evidence) and the test's tmp folder."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from test_tracking import mlflow_server

from ptray.config import TrainConfig
from ptray.study import store, tracking
from ptray.study.context import StudyContext
from ptray.study.transfer import transfer_target
from ptray.study.trial import run_training

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = ROOT / "outputs" / "screenshots"
# Flags that work headless as root in a container (STACK-NOTES).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow-ui")) as uri:
        yield uri


@pytest.fixture(scope="module")
def study(server, tiny_model_dir, data_dir):
    """A small study's runs, logged by the same adapters the sweep runs: cb-seed0, its transfer and a baseline."""
    mc = store.client(server)
    exp = tracking.get_or_create_experiment(mc, "ptray-ui")
    ctx = StudyContext(study="ui", experiment_id=exp, tracking_uri=server, model_label=str(tiny_model_dir),
                       data_label=str(data_dir), params={"study": "ui"},
                       train=TrainConfig(model=str(tiny_model_dir), data_dir=str(data_dir), max_epochs=3, patience=5,
                                         max_train_examples=16, max_eval_examples=16, max_length=64))
    run_training({"task": "cb", "seed": 0}, ctx, None, lambda metrics, state, run_id: None)
    train_run = tracking.find_run(mc, exp, "ui", "cb-seed0")
    transfer_target("cb", [{"task": "cb", "seed": 0, "run_id": train_run.info.run_id}], ctx)
    return exp, train_run


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        pytest.fail("Debian's chromium is not installed at /usr/bin/chromium: `apt-get install -y chromium` "
                    "(make test does it)")
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="ptray-chromium-")
    with sync_playwright() as p:
        # A persistent context gives Chromium a fresh --user-data-dir of our own.
        context = p.chromium.launch_persistent_context(profile, executable_path=str(CHROMIUM), headless=True,
                                                       args=CHROMIUM_ARGS, viewport={"width": 1600, "height": 1000})
        try:
            yield context
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)


def screenshot(page, tmp_path: Path, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / name
    page.screenshot(path=str(path), full_page=True)
    shutil.copy(path, tmp_path / name)
    assert path.stat().st_size > 10_000  # a rendered page, not a blank one
    return path


def test_ui_lists_the_study_runs(server, study, browser, tmp_path):
    exp, _ = study
    page = browser.new_page()
    # The UI keeps polling: wait for the content, never for network idle.
    page.goto(f"{server}/#/experiments/{exp}/runs", wait_until="domcontentloaded")
    for name in ("cb-seed0", "transfer-cb-seed0-on-cb", "baseline-none-on-cb"):
        page.get_by_text(name, exact=True).first.wait_for(state="visible", timeout=60_000)
    screenshot(page, tmp_path, "mlflow-study-runs.png")


def test_ui_shows_a_train_runs_metrics(server, study, browser, tmp_path):
    exp, run = study
    page = browser.new_page()
    page.goto(f"{server}/#/experiments/{exp}/runs/{run.info.run_id}", wait_until="domcontentloaded")
    page.get_by_text("cb-seed0").first.wait_for(state="visible", timeout=60_000)
    for metric in ("eval_loss", "final_exact_match", "final_rank_accuracy"):
        page.get_by_text(metric, exact=True).first.wait_for(state="visible", timeout=30_000)
    # The value shown is the one logged.
    value = store.client(server).get_run(run.info.run_id).data.metrics["final_rank_accuracy"]
    name = page.get_by_text("final_rank_accuracy", exact=True).first
    row = name.locator("xpath=ancestor::*[@role='row' or self::tr][1]").inner_text(timeout=10_000)
    assert str(value) in row or f"{value:.4f}" in row, row
    screenshot(page, tmp_path, "mlflow-run-metrics.png")
    # The per-epoch history as charts.
    page.goto(f"{server}/#/experiments/{exp}/runs/{run.info.run_id}/model-metrics", wait_until="domcontentloaded")
    page.get_by_text("eval_loss", exact=True).first.wait_for(state="visible", timeout=60_000)
    screenshot(page, tmp_path, "mlflow-run-charts.png")
