"""The MLflow UI as a person sees it: ``slmfactory ui`` on a finished tiny sweep (2 trials,
its report logged to the sweep's parent run), driven in headless Chromium (Debian's
``chromium`` + ``chromium-driver``, installed by ``make browser``, which ``make test`` runs).

No browser is a failure, not a skip: CI installs one through the Makefile. With
``SLMFACTORY_UI_SCREENSHOTS=DIR`` (``make ui-check`` sets ``docs/``) the pages are saved there.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from .conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
RECIPE = REPO / "configs" / "sweep-tiny.yaml"
CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# The flags this machine's Chromium needs headless (no sandbox as root, no GPU, no network
# side traffic that would slow or hang page loads).
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1600,1000")


def _cli(*args, timeout=600):
    env = {**os.environ, "SLMFACTORY_LAUNCHER": "local"}
    out = subprocess.run([sys.executable, "-m", "slmfactory.cli", *args], capture_output=True, text=True,
                         timeout=timeout, env=env, cwd=REPO)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    assert Path(CHROMIUM).is_file() and Path(DRIVER).is_file(), \
        "chromium / chromium-driver missing: `make browser` installs them (apt-get)"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chrome-profile')}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def ui(tiny_root, tmp_path_factory):
    """A finished 2-trial sweep with its report, and ``slmfactory ui`` serving its store."""
    work = tmp_path_factory.mktemp("ui") / "work"
    shutil.copytree(tiny_root, work)
    args = ["-c", str(RECIPE), "--set", f"workdir={work}", "--set", "sweep.strategies=[slm]"]
    _cli("sweep", *args)
    _cli("report", *args, timeout=300)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "slmfactory.cli", "ui", *args, "--port", str(port)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        first = proc.stdout.readline()
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read() == b"OK":
                    break
            except OSError:
                time.sleep(1)
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
        yield {"base": f"http://127.0.0.1:{port}", "printed": first, "client": client,
               "experiment": client.get_experiment_by_name("slmfactory-sweep-tiny")}
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def _shot(driver, name: str) -> None:
    out = os.environ.get("SLMFACTORY_UI_SCREENSHOTS")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(out) / f"mlflow-{name}.png"))


def _wait_text(driver, *needles, timeout=60) -> str:
    deadline, text = time.time() + timeout, ""
    while time.time() < deadline:
        text = driver.find_element("tag name", "body").text
        if all(n in text for n in needles):
            return text
        time.sleep(1)
    raise AssertionError(f"{needles} not on {driver.current_url}: {text[:1500]}")


def test_mlflow_ui_in_chromium(ui, browser):
    from selenium.webdriver.common.by import By

    exp_id = ui["experiment"].experiment_id
    client = ui["client"]
    # `slmfactory ui` prints the page to open: the runs, in MLflow's model-training view
    # (3.17 keeps GenAI vs model training as a UI switch; the experiment tag alone does not
    # move its landing page).
    assert f"#/experiments/{exp_id}/runs?workflowType=machine_learning" in ui["printed"], ui["printed"]
    url = ui["printed"].split("open ", 1)[1].split()[0]
    browser.get(url)
    _wait_text(browser, "sweep sweep-tiny", "Runs")
    # The trials are nested under the sweep: its name cell's one button expands it, and then
    # both trial runs are listed by name (short names: strategy, domain, budgets).
    assert "slm legal" not in _wait_text(browser, "sweep sweep-tiny")
    browser.find_element(By.XPATH, "//*[text()='sweep sweep-tiny']/ancestor::*[@role='gridcell'][1]"
                                   "//button").click()
    _wait_text(browser, "slm legal 20.5k/10.2k", "slm biomedical 20.5k/10.2k")
    _shot(browser, "runs")

    # Compare: the trial runs' scatter of ppl_macro against a cost metric.
    trials = client.search_runs([exp_id], filter_string="tags.`slmfactory.trial` != ''")
    assert len(trials) == 2
    ids = urllib.parse.quote(json.dumps([r.info.run_id for r in trials]))
    browser.get(f"{ui['base']}/#/compare-runs?runs={ids}&experiments={urllib.parse.quote(json.dumps([exp_id]))}")
    _wait_text(browser, "Comparing 2 Runs", "Scatter Plot")
    browser.find_element(By.XPATH, "//*[text()='Scatter Plot']").click()
    _wait_text(browser, "X-axis", "Y-axis")
    # Its axes default to the first parameter and metric: choose cost and perplexity (the
    # two selects take typed text, as a person would use them).
    from selenium.webdriver.common.keys import Keys

    x_axis, y_axis = browser.find_elements(By.CSS_SELECTOR, "input[role=combobox]")[:2]
    for box, metric in ((x_axis, "cost/total_flops_N7"), (y_axis, "ppl_macro")):
        box.click()
        box.send_keys(metric)
        time.sleep(1)
        box.send_keys(Keys.ENTER)
        time.sleep(1)
    plot = _wait_text(browser, "cost/total_flops_N7", "ppl_macro").split("Run details", 1)[0]
    assert "cost/total_flops_N7" in plot and "ppl_macro" in plot, plot[-600:]
    _shot(browser, "compare-scatter")

    # The report's plots open from the parent run's artifacts.
    (parent,) = client.search_runs([exp_id], filter_string="tags.`slmfactory.sweep` != ''")
    png = next(a.path for a in client.list_artifacts(parent.info.run_id, "report") if a.path.endswith(".png")
               and "ppl_vs_cost" in a.path)
    browser.get(f"{ui['base']}/#/experiments/{exp_id}/runs/{parent.info.run_id}/artifacts/{png}")
    _wait_text(browser, Path(png).name, "report.md", "recommendation.md")
    deadline = time.time() + 60
    while time.time() < deadline:
        imgs = [i for i in browser.find_elements(By.TAG_NAME, "img")
                if browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i)]
        if any((i.get_attribute("src") or "").find("get-artifact") >= 0 or "blob:" in (i.get_attribute("src") or "")
               or "data:" in (i.get_attribute("src") or "") for i in imgs):
            break
        time.sleep(1)
    else:
        raise AssertionError("the report PNG did not render in the artifact view")
    _shot(browser, "report-artifact")
