"""The MLflow UI as a person sees it: ``slmfactory ui`` on a finished tiny sweep (two
``slm-nopt`` trials on one domain at two specialisation budgets, its report logged to the
sweep's parent run), driven in headless Chromium (Debian's ``chromium`` + ``chromium-driver``,
installed by ``make browser``, which ``make test`` runs).

What it checks, each the way a person gets there in MLflow 3.17.2:

1. the URL ``slmfactory ui`` prints opens the Runs page (model-training view), and expanding
   the sweep's parent run lists both trial runs by name;
2. on the compare page of the two trials, the Scatter Plot tab with X = ``cost/total_flops_N7``
   and Y = ``ppl_macro`` chosen in its two axis selects draws two points, and the plotted
   y-axis spans the trials' own perplexities;
3. the parent run's artifact view shows the report's ``ppl_vs_cost_*_N7_flops.png`` as an
   image of the PNG's own pixel size, and ``configurations.json`` (the ``log_table`` of every
   configuration) opens as a table.

No browser is a failure, not a skip: CI installs one through the Makefile. Every wait is an
explicit ``WebDriverWait`` on the condition the step needs (a loaded machine makes the
bundled UI slow to render, so the timeouts are generous; nothing sleeps a fixed time). With
``SLMFACTORY_UI_SCREENSHOTS=DIR`` (``make ui-check`` sets ``docs/``) the pages are saved there.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from .conftest import REPO
from .local_cluster import free_port

# The fixture runs a sweep (Ray Tune) and serves the MLflow UI to Chromium.
pytestmark = [pytest.mark.ray, pytest.mark.server, pytest.mark.slow, pytest.mark.timeout(900)]
RECIPE = REPO / "configs" / "sweep-tiny.yaml"
# Two trials that differ in cost: slm-nopt has no generic phase to train first, so the sweep is
# the cheapest one with a real perplexity-against-cost scatter (two distinct points).
SWEEP = ("--set", "sweep.strategies=[slm-nopt]", "--set", "sweep.domains=[legal]",
         "--set", "sweep.spec_tokens=[5120,10240]")
TRIAL_NAMES = ("slm-nopt legal -/5.12k", "slm-nopt legal -/10.2k")
X_METRIC, Y_METRIC = "cost/total_flops_N7", "ppl_macro"
CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# The flags this machine's Chromium needs headless (no sandbox as root, no GPU, no network
# side traffic that would slow or hang page loads).
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1600,1000")
# Seconds any one UI step may take: MLflow's 10 MB JS bundle renders slowly on 2 busy cores
# (a step took up to ~60 s at load average 20), and a wait returns as soon as it holds.
WAIT = 180
# MLflow 3.17's GenAI / model-training switch is a URL parameter (the runs page `slmfactory ui`
# prints carries it); without it every page shows the GenAI side bar ("Evaluation runs").
ML_VIEW = "workflowType=machine_learning"


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
    # A fresh profile: no UI state (workflow type, chosen columns) carried over from any run.
    for flag in (*FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chrome-profile')}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()


def _healthy(url: str) -> bool:
    try:
        return urllib.request.urlopen(url, timeout=5).read() == b"OK"
    except OSError:
        return False


@pytest.fixture(scope="module")
def ui(tiny_root, tmp_path_factory):
    """A finished 2-trial sweep with its report, and ``slmfactory ui`` serving its store."""
    work = tmp_path_factory.mktemp("ui") / "work"
    shutil.copytree(tiny_root, work)
    args = ["-c", str(RECIPE), "--set", f"workdir={work}", *SWEEP]
    _cli("sweep", *args)
    _cli("report", *args, timeout=300)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "slmfactory.cli", "ui", *args, "--port", str(port)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        first = proc.stdout.readline()
        from selenium.webdriver.support.ui import WebDriverWait

        # The server's own health route; WebDriverWait is only a polling loop here.
        WebDriverWait(None, WAIT, poll_frequency=1).until(lambda _: _healthy(f"http://127.0.0.1:{port}/health"),
                                                          "mlflow server never answered /health")
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


def _wait(driver, condition, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, WAIT, poll_frequency=0.5).until(condition)
    except Exception as e:  # the page's text says what was on screen instead
        body = driver.execute_script("return document.body ? document.body.innerText : ''")
        raise AssertionError(f"{what}: not on {driver.current_url} after {WAIT}s; page: {body[:1500]}") from e


def _wait_text(driver, *needles) -> None:
    _wait(driver, lambda d: all(n in d.execute_script("return document.body.innerText") for n in needles),
          f"text {needles}")


def _choose_axis(driver, axis: str, metric: str) -> None:
    """The compare page's axis select (MLflow's design-system SimpleSelect, a Radix popover):
    a ``button#{x,y}-axis-selector[role=combobox]`` whose ``value`` is ``metric-<key>`` or
    ``param-<key>``; clicking it opens a ``[role=listbox]`` of ``[role=option]`` rows, one
    per parameter then per metric, each labelled by the key.

    One converging step per poll, until the select's value is the metric: open the list if it
    is closed, else click the option. React may re-render between finding an element and
    clicking it; such a poll changes nothing and the next one looks again."""
    from selenium.common.exceptions import (ElementClickInterceptedException, ElementNotInteractableException,
                                            StaleElementReferenceException)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    select, want = f"{axis}-axis-selector", f"metric-{metric}"
    option = f"//*[@role='listbox']//*[@role='option'][normalize-space(.)='{metric}']"

    def step(d) -> bool:
        button = d.find_element(By.ID, select)
        if button.get_attribute("value") == want:
            return True
        found = d.find_elements(By.XPATH, option)
        if not found:
            if button.get_attribute("aria-expanded") != "true":
                button.click()
            return False
        # The list is a scrolled box of ~170 keys: bring the row into view for a real click.
        d.execute_script("arguments[0].scrollIntoView({block: 'center'})", found[0])
        found[0].click()
        return False

    try:
        WebDriverWait(driver, WAIT, poll_frequency=0.5, ignored_exceptions=(
            StaleElementReferenceException, ElementClickInterceptedException, ElementNotInteractableException,
        )).until(step)
    except Exception as e:
        raise AssertionError(f"{axis}-axis: could not choose {metric} on {driver.current_url}") from e


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])  # IHDR: width, height


def test_mlflow_ui_in_chromium(ui, browser):
    from selenium.webdriver.common.by import By

    exp_id = ui["experiment"].experiment_id
    client = ui["client"]
    trials = client.search_runs([exp_id], filter_string="tags.`slmfactory.trial` != ''")
    (parent,) = client.search_runs([exp_id], filter_string="tags.`slmfactory.sweep` != ''")
    assert sorted(r.info.run_name for r in trials) == sorted(TRIAL_NAMES)

    # 1. `slmfactory ui` prints the page to open: the runs, in MLflow's model-training view
    # (3.17 keeps GenAI vs model training as a UI switch; the experiment tag alone does not
    # move its landing page).
    assert f"#/experiments/{exp_id}/runs?workflowType=machine_learning" in ui["printed"], ui["printed"]
    browser.get(ui["printed"].split("open ", 1)[1].split()[0])
    _wait_text(browser, "sweep sweep-tiny", "Runs")
    # The trials are nested under the sweep: its name cell's one button expands it, and then
    # both trial runs are listed by name (short names: strategy, domain, budgets).
    assert not any(n in browser.execute_script("return document.body.innerText") for n in TRIAL_NAMES)
    from selenium.webdriver.support import expected_conditions as EC

    _wait(browser, EC.element_to_be_clickable(
        (By.XPATH, "//*[text()='sweep sweep-tiny']/ancestor::*[@role='gridcell'][1]//button")),
        "the sweep row's expander").click()
    _wait_text(browser, *TRIAL_NAMES)
    _shot(browser, "runs")

    # 2. Compare the two trials: Scatter Plot, X = a cost, Y = macro perplexity.
    ids = urllib.parse.quote(json.dumps([r.info.run_id for r in trials]))
    browser.get(f"{ui['base']}/#/compare-runs?runs={ids}&experiments={urllib.parse.quote(json.dumps([exp_id]))}"
                f"&{ML_VIEW}")
    _wait(browser, EC.element_to_be_clickable((By.XPATH, "//*[@role='tab' and normalize-space(.)='Scatter Plot']")),
          "the Scatter Plot tab").click()
    _choose_axis(browser, "x", X_METRIC)
    _choose_axis(browser, "y", Y_METRIC)
    # The plot is plotly's: its axis titles (SVG text) are the chosen keys, and its one trace
    # holds exactly the trials' (cost, perplexity) pairs. Plotly draws the markers with WebGL
    # (scattergl) on a canvas, so the points are read from the plot's data, not from the DOM,
    # and the canvas must have a size (the screenshot shows the two markers).
    plot = "//*[@role='tabpanel' and @data-state='active']//*[contains(@class,'js-plotly-plot')]"
    _wait(browser, lambda d: [t.text for t in d.find_elements(By.XPATH, f"{plot}//*[@class='xtitle']")] == [X_METRIC]
          and [t.text for t in d.find_elements(By.XPATH, f"{plot}//*[@class='ytitle']")] == [Y_METRIC],
          "the scatter's axis titles")
    want = sorted((r.data.metrics[X_METRIC], r.data.metrics[Y_METRIC]) for r in trials)
    points = _wait(browser, lambda d: (lambda xy: xy if xy and sorted(map(tuple, xy)) == want else None)(
        d.execute_script(
            "const p = document.evaluate(arguments[0], document, null, 9, null).singleNodeValue;"
            "const t = (p && p.data || []).filter(t => t.x && t.y && t.x.length);"
            "return t.length === 1 ? t[0].x.map((x, i) => [x, t[0].y[i]]) : null;", plot)),
        f"the scatter's points = the trials' ({X_METRIC}, {Y_METRIC})")
    assert len(points) == len(trials) == 2
    canvas = browser.find_element(By.XPATH, f"{plot}//*[local-name()='canvas' and contains(@class,'gl-canvas-context')]")
    assert canvas.size["width"] > 100 and canvas.size["height"] > 100, canvas.size
    _shot(browser, "compare-scatter")

    # 3. The report's plots open from the parent run's artifacts: the perplexity-against-cost
    # figure at N = 7 domains, FLOPs, renders at the PNG's own size (the image is that file).
    png = next(a.path for a in client.list_artifacts(parent.info.run_id, "report")
               if Path(a.path).name.startswith("ppl_vs_cost_") and a.path.endswith("_N7_flops.png"))
    size = _png_size(Path(client.download_artifacts(parent.info.run_id, png)).read_bytes())
    browser.get(f"{ui['base']}/#/experiments/{exp_id}/runs/{parent.info.run_id}/artifacts/{png}?{ML_VIEW}")
    _wait_text(browser, Path(png).name, "configurations.json", "recommendation.md")
    shown = _wait(browser, lambda d: d.execute_script(
        "return [...document.images].filter(i => i.complete && i.naturalWidth > 0"
        " && i.getBoundingClientRect().width > 0).map(i => [i.naturalWidth, i.naturalHeight])"
        ".find(s => s[0] === arguments[0] && s[1] === arguments[1]) || null", *size), f"{png} rendered")
    assert tuple(shown) == size
    _shot(browser, "report-artifact")

    # The configurations table (MlflowClient.log_table on the parent): clicking it in the
    # artifact tree, as a person would, shows it as a table, one row per configuration with
    # its macro perplexity (the logged file's own values, as the UI prints numbers).
    table = json.loads(Path(client.download_artifacts(parent.info.run_id, "configurations.json")).read_text())
    col = table["columns"].index(Y_METRIC)
    _wait(browser, EC.element_to_be_clickable((By.XPATH, "//*[normalize-space(text())='configurations.json']")),
          "configurations.json in the artifact tree").click()
    _wait_text(browser, "View as table", Y_METRIC, *(str(row[col]) for row in table["data"]))
    _shot(browser, "configurations-table")
