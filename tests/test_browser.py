"""What a person sees: a tiny tracked run opened in the MLflow UI in headless Chromium, asserted from the rendered page.

Needs Debian's chromium + chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver; `.ci/run` installs them) and
selenium (dev extras). Without them the test skips on a developer's machine and fails in CI (GANCORE_REQUIRE_DATA=1).
Screenshots land in tmp_path/screenshots (the path is printed); GANCORE_SAVE_SCREENSHOTS=1 also copies the experiment's
charts to docs/mlflow_run.png for the README.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import helpers
import pytest

from conftest import ROOT, needs_mnist, tiny

pytestmark = [pytest.mark.browser, needs_mnist]

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
# No internet on CI machines: everything that would phone home is off, and every profile is fresh.
CHROME_ARGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
               "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--window-size=1400,1000")
WAIT_S = 30  # per page element; a cold MLflow UI on 2 busy cores renders in a few seconds


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_ui(tmp_path):
    """Start `mlflow ui` (as `make ui` does) over a fresh SQLite store; yield (base URL, tracking URI)."""
    db = tmp_path / "store" / "mlflow.db"
    db.parent.mkdir()
    uri, port = f"sqlite:///{db}", _free_port()
    yield_value = {"uri": uri, "base": f"http://127.0.0.1:{port}"}
    started = {}

    def start():
        (db.parent / "artifacts").mkdir(exist_ok=True)
        log = open(tmp_path / "mlflow_ui.log", "w")
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri", uri,
             "--artifacts-destination", str(db.parent / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"],
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)  # its own process group: teardown stops the server and its workers
        started["proc"], started["log"] = proc, log
        helpers.wait_for(healthy, timeout=60, what=f"mlflow ui answering {yield_value['base']}/health", proc=proc,
                         log=tmp_path / "mlflow_ui.log", interval=0.5)

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"{yield_value['base']}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    yield_value["start"] = start
    yield yield_value
    proc = started.get("proc")
    if proc is not None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            helpers.wait_exit(proc, timeout=15, what="mlflow ui after SIGKILL", log=tmp_path / "mlflow_ui.log")
        started["log"].close()


@pytest.fixture
def browser(tmp_path):
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        pytest.skip(f"{CHROMIUM} / {CHROMEDRIVER} not found (apt-get install chromium chromium-driver; .ci/run does)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install -e '.[dev]')")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for a in (*CHROME_ARGS, f"--user-data-dir={tmp_path / 'chrome-profile'}"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()


def _body(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.TAG_NAME, "body").text


def _wait_text(driver, *texts: str) -> str:
    """Wait (bounded) until every text is in the rendered page; return the page text."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        WebDriverWait(driver, helpers.budget(WAIT_S)[0], poll_frequency=0.25).until(
            lambda d: all(t in _body(d) for t in texts))
    except TimeoutException:
        body = _body(driver)
        missing = [t for t in texts if t not in body]
        pytest.fail(f"not shown after {WAIT_S} s at {driver.current_url}: {missing}\npage text:\n{body[-3000:]}")
    return _body(driver)


def _search_charts(driver, text: str) -> None:
    """Type into the run page's 'Search metric charts' box (a React input: select-all + type, not .clear())."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.CSS_SELECTOR, "input[placeholder='Search metric charts']")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.BACKSPACE)
    box.send_keys(text)


def _close_assistant(driver) -> None:
    """MLflow 3.17 opens its 'MLflow Assistant' side panel on first load; close it so screenshots show the run."""
    from selenium.webdriver.common.by import By

    for b in driver.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):
        if b.is_displayed():
            b.click()
            return


def test_run_as_seen_in_the_mlflow_ui(tmp_path, mlflow_ui, browser):
    from mlflow.tracking import MlflowClient

    from gancore.config import hyperparams
    from gancore.train.loop import fit

    shots = tmp_path / "screenshots"
    shots.mkdir()
    print(f"\nscreenshots: {shots}")
    t0 = time.monotonic()
    # One epoch of 4 steps, a sample grid at step 4. No FID here: eval.n_samples > 0 also draws the end-of-run t-SNE,
    # which alone takes 15-50 s on 2 busy cores (test_tracking_train.py covers the fid_* metrics in MLflow).
    cfg = tiny("track.enabled=true", f"track.uri={mlflow_ui['uri']}", "track.experiment=browser", "train.epochs=1",
               "train.snapshot_epochs=[1]", "train.loss_ranges=[[1,1]]")
    r = fit(cfg, out=tmp_path / "run")
    t_fit = time.monotonic() - t0
    client = MlflowClient(tracking_uri=mlflow_ui["uri"])
    run = client.get_run(r.run_id)
    exp_id, name = run.info.experiment_id, run.info.run_name
    lr_g = str(hyperparams(cfg)["optim.lr_g"])
    mlflow_ui["start"]()
    print(f"fit {t_fit:.1f} s, server up {time.monotonic() - t0 - t_fit:.1f} s")
    base = f"{mlflow_ui['base']}/#/experiments/{exp_id}"
    ml = "workflowType=machine_learning"  # MLflow 3 opens in its GenAI view without it

    # (a) the run page: name, status, metrics table with the losses and FID, parameters with their values, tags
    browser.get(f"{base}/runs/{r.run_id}?{ml}")
    body = _wait_text(browser, name, "Finished", "Loss/D", "Loss/G", "optim.lr_g", "gancore.preset")
    _close_assistant(browser)
    assert re.search(rf"^optim\.lr_g\n{re.escape(lr_g)}$", body, re.M), "optim.lr_g shown without its value " + lr_g
    loss_d = client.get_metric_history(r.run_id, "Loss/D")[-1].value
    assert re.search(rf"^Loss/D\n{re.escape(repr(loss_d))}$", body, re.M), f"Loss/D shown without its value {loss_d!r}"
    browser.save_screenshot(str(shots / "run_overview.png"))

    # (b) the run's charts: the Loss section has D and G, the sample grids have their card
    browser.get(f"{base}/runs/{r.run_id}/model-metrics?{ml}")
    _wait_text(browser, "Model metrics", "Loss")
    _close_assistant(browser)
    _search_charts(browser, "Loss/")  # sections below the first are only drawn when scrolled to; the search shows them
    _wait_text(browser, f"{name} (Loss/D)", f"{name} (Loss/G)", "samples")
    browser.save_screenshot(str(shots / "run_loss_charts.png"))

    # (c) the run's artifacts: the sample grids logged by track.image_every under images/, named by their key
    browser.get(f"{base}/runs/{r.run_id}/artifacts?{ml}")
    _wait_text(browser, "images", "config.yaml", "real_samples.png")
    from selenium.webdriver.common.by import By

    browser.find_element(By.XPATH, "//*[normalize-space(text())='images']").click()
    _wait_text(browser, "samples+step+4+")  # track.image_every=4
    browser.save_screenshot(str(shots / "run_artifacts.png"))

    # (d) the experiment's model-training view, charts mode: the run and its loss charts
    browser.get(f"{base}/runs?{ml}&compareRunsMode=CHART")
    _wait_text(browser, name, "Loss\n(2)")
    _close_assistant(browser)
    _search_charts(browser, "Loss/")
    _wait_text(browser, f"{name} (Loss/D)", f"{name} (Loss/G)")
    browser.save_screenshot(str(shots / "experiment_charts.png"))
    print(f"whole test {time.monotonic() - t0:.1f} s")

    if os.environ.get("GANCORE_SAVE_SCREENSHOTS") == "1":
        (ROOT / "docs").mkdir(exist_ok=True)
        shutil.copyfile(shots / "experiment_charts.png", ROOT / "docs" / "mlflow_run.png")
