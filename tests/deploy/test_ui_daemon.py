"""The deployment a team runs: ``ravl ui``'s ``dagster dev`` (webserver and
``dagster-daemon``) against a temporary instance already holding one audited
set. The daemon's sensor picks up a new validation-set folder and audits it
alone; the schedule, on a test cadence, fires a re-audit of every set; then
headless Chromium opens the asset graph and the ``spurious_features`` page
and reads what a user sees there. Both share one instance and one server."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
from PIL import Image

from ravl_pipeline.cli.ui import DagsterDev, session_pids, serve_reports
from ravl_pipeline.core.drift import has_changes
from ravl_pipeline.defs.resources import RavlProject
from ravl_pipeline.defs.schedules import TICK_TAG
from ravl_pipeline.defs.jobs import AUDIT_JOB, REAUDIT_JOB
from tests.deploy.browser import CHROMIUM, chromium
from tests.deploy.services import free_port, wait_for_port
from tests.defs.test_graph import N_VAL, make_validation_set, write_params
from tests.tiny_project import RAVL, REPO

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason=f"headless Chromium not found at {CHROMIUM} (make setup-chromium)")

DISCOVERY = {"region_proposals", "region_embeddings", "zero_shot_scores", "region_clusters", "spurious_features"}
PARTITIONED = DISCOVERY | {"mitigated_model", "control_model", "mitigation_metrics", "mitigated_findings", "evaluation_report"}
# one run at a time, as on a small machine: the schedule's runs queue behind the sensor's
RUN_QUEUE = "\nconcurrency:\n  runs:\n    max_concurrent_runs: 1\n"
SCREENSHOT = os.environ.get("RAVL_UI_SCREENSHOT")  # e.g. docs/ui.png, to refresh the README's picture


def _runs(instance: dg.DagsterInstance, **tags) -> list[dg.DagsterRun]:
    return instance.get_runs(filters=dg.RunsFilter(tags=tags))


def _wait(instance: dg.DagsterInstance, what: str, count: int, timeout: float, **tags) -> list[dg.DagsterRun]:
    """The first ``count`` runs with ``tags`` (the daemon launches them), once
    they have finished; a schedule firing every minute adds more meanwhile."""
    deadline = time.monotonic() + timeout
    done = (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED)
    while time.monotonic() < deadline:
        runs = _runs(instance, **tags)[::-1][:count]  # oldest first
        if len(runs) == count and all(r.status in done for r in runs):
            return runs
        time.sleep(2)
    raise AssertionError(f"{what}: {[(r.run_id[:8], r.status) for r in _runs(instance, **tags)]} "
                         f"after {timeout:.0f}s")


def _first_tick(instance: dg.DagsterInstance, count: int, timeout: float) -> list[dg.DagsterRun]:
    """The runs of the first schedule tick that requested ``count`` sets,
    once finished (a cron of every minute fires more ticks meanwhile)."""
    deadline = time.monotonic() + timeout
    done = (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED)
    while time.monotonic() < deadline:
        ticks: dict[str, list] = {}
        for run in _runs(instance, **{"dagster/schedule_name": "weekly_reaudit"}):
            ticks.setdefault(run.tags[TICK_TAG], []).append(run)
        full = [ticks[t] for t in sorted(ticks) if len(ticks[t]) == count]
        if full and all(r.status in done for r in full[0]):
            return full[0]
        time.sleep(2)
    raise AssertionError(f"no finished schedule tick of {count} runs after {timeout:.0f}s")


def _materialized(instance: dg.DagsterInstance, run_id: str) -> set[tuple[str, str | None]]:
    records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION).records
    return {(r.event_log_entry.dagster_event.asset_key.to_user_string(), r.event_log_entry.dagster_event.partition)
            for r in records}


@pytest.fixture(scope="module")
def deployment(tiny_setting, tmp_path_factory):
    """The session's tiny audited model (it finds features, so the pages have
    a findings table and a region grid), set A audited with ``ravl
    materialize``, then set B dropped in while the daemon runs."""
    tmp = tmp_path_factory.mktemp("deployment")
    root = tmp / "project"
    eval_dir = tiny_setting["setting"] / "eval"
    make_validation_set(eval_dir, root / "data" / "validation_sets" / "set-a", offset=0)
    params = write_params(root / "params.yaml", tiny_setting)
    env = dict(os.environ, RAVL_DATA_DIR=str(root / "data"), RAVL_PARAMS=str(params),
               DAGSTER_HOME=str(root / "dagster_home"), TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    first = subprocess.run([str(RAVL), "materialize"], env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    first_findings = (root / "data" / "outputs" / "set-a" / "findings.json").read_bytes()
    home = Path(env["DAGSTER_HOME"])
    (home / "dagster.yaml").write_text((home / "dagster.yaml").read_text() + RUN_QUEUE)
    # a new folder appears: the sensor's business
    make_validation_set(eval_dir, root / "data" / "validation_sets" / "set-b", offset=N_VAL)
    ui_port, reports_port = free_port(), free_port()
    reports_url = f"http://127.0.0.1:{reports_port}"
    # a cron that fires within a minute; each daemon-launched run executes its steps in its run
    # worker (the executors are tested in test_celery.py), which keeps this test short
    env = dict(env, RAVL_REAUDIT_CRON="* * * * *", RAVL_REPORTS_URL=reports_url, RAVL_EXECUTOR="in_process")
    dev = DagsterDev(port=ui_port, env=env, log=tmp / "dagster-dev.log", cwd=REPO)
    reports = serve_reports(root / "data" / "outputs", "127.0.0.1", reports_port)
    try:
        with dev:
            wait_for_port(ui_port, timeout=120)
            with dg.DagsterInstance.from_config(str(home)) as instance:
                sensor_runs = _wait(instance, "the sensor's audit of set-b", 1, 400,
                                    **{"dagster/sensor_name": "new_validation_sets"})
                schedule_runs = _first_tick(instance, 2, 400)
                runs = {"sensor": sensor_runs, "schedule": schedule_runs, "all": instance.get_runs(),
                        "materialized": {r.run_id: _materialized(instance, r.run_id)
                                         for r in sensor_runs + schedule_runs}}
            with chromium(tmp) as page:
                base = f"http://127.0.0.1:{ui_port}"
                page.goto(f"{base}/locations/ravl_pipeline/asset-groups/audit/lineage")  # the asset graph
                graph_text = page.wait_for_text("spurious_features", "region_embeddings", "evaluation_report")
                page.goto(f"{base}/assets/spurious_features?partition=set-a")
                asset_text = page.wait_for_text("changes_since_last_audit", "top_regions", "silhouette",
                                                "largest gaps", "Since the previous audit")
                time.sleep(2)
                page.dismiss("Skip")  # the first visit's newsletter dialog
                page.dismiss("Hide navigation")
                page.evaluate("Array.from(document.querySelectorAll('*')).find(e => e.children.length === 0"
                              " && e.innerText === 'Metadata').scrollIntoView()")
                time.sleep(1)
                shot = page.screenshot(tmp / "ui.png")
                if SCREENSHOT:
                    shutil.copy2(shot, REPO / SCREENSHOT)
                # the region grid is long Markdown (a PNG): the UI shows it on request
                opened = page.click_in_row("top_regions", "Show Markdown")
                images = page.wait_for_images("top regions")
                page.goto(f"{base}/assets/evaluation_report?partition=set-b")
                report_text = page.wait_for_text("report_url", "changes_since_last_audit")
                report_links = page.evaluate("Array.from(document.links).map(a => a.href)")
            # what that link opens, from the reports server `ravl ui` runs beside the UI
            served = urllib.request.urlopen(f"{reports_url}/set-b/report/report.html", timeout=60).read().decode()
            session = dev.proc.pid
    finally:
        reports.shutdown()
    yield {"opened": opened, "root": root, "home": home, "first_findings": first_findings,
           "project": RavlProject(data_dir=str(root / "data"), params_path=str(params)), "runs": runs, "graph_text": graph_text, "asset_text": asset_text,
           "images": images, "report_text": report_text, "report_links": report_links, "served": served,
           "shot": shot, "session": session, "reports_url": reports_url}


def test_the_sensor_audits_the_new_set_and_only_it(deployment):
    runs = deployment["runs"]
    (sensor_run,) = [r for r in runs["sensor"]]
    assert sensor_run.status == dg.DagsterRunStatus.SUCCESS
    assert sensor_run.job_name == AUDIT_JOB and sensor_run.tags["dagster/partition"] == "set-b"
    assert runs["materialized"][sensor_run.run_id] == {(a, "set-b") for a in PARTITIONED}
    # the sources are observed outside runs: the runs list holds audits only
    assert {r.job_name for r in runs["all"]} <= {AUDIT_JOB, REAUDIT_JOB, "build_audited_model"}


def test_the_schedule_fires_a_reaudit_of_every_set(deployment):
    runs = deployment["runs"]["schedule"]
    assert sorted(r.tags["dagster/partition"] for r in runs) == ["set-a", "set-b"]
    assert {r.job_name for r in runs} == {REAUDIT_JOB}
    assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
    for run in runs:
        part = run.tags["dagster/partition"]
        assert deployment["runs"]["materialized"][run.run_id] == {(a, part) for a in DISCOVERY}
    # the re-audit kept the findings it replaced, and on unchanged data and model nothing changed
    out = deployment["root"] / "data" / "outputs" / "set-a"
    assert (out / "previous" / "findings.json").read_bytes() == deployment["first_findings"]
    drift = deployment["project"].audit("set-a").drift()
    assert drift["previous"]["n_features"] == len(json.loads(deployment["first_findings"])["features"])
    assert not has_changes(drift) and drift["new_called"] == []


def test_the_asset_graph_lists_the_assets(deployment):
    text = deployment["graph_text"]
    for name in ("audited_model", "region_proposals", "region_clusters", "spurious_features",
                 "mitigated_model", "evaluation_report"):
        assert name in text


def test_the_spurious_features_page_shows_the_latest_materialization(deployment):
    text = deployment["asset_text"]
    for key in ("k", "silhouette", "called", "lead_rank", "findings", "top_regions", "changes_since_last_audit"):
        assert key in text, key
    # the findings table with its evidence columns, and the drift of the re-audit
    for header in ("rank", "attribute", "G_c", "H_c", "called", "masking", "largest gaps"):
        assert header in text, header
    assert "Since the previous audit" in text
    # the region grid decoded in the browser: one row of image thumbnails per finding
    assert deployment["opened"]
    assert deployment["images"], "the region grid did not decode"
    width, height = deployment["images"][0]
    n_features = int(re.search(r"Row count\s+(\d+)", text).group(1))
    rows = min(n_features, 8)  # the first eight findings, the rest counted
    assert rows and width > 300 and height == rows * 68
    shot = np.asarray(Image.open(deployment["shot"]).convert("RGB"))
    assert shot.shape[0] >= 900 and len(np.unique(shot.reshape(-1, 3), axis=0)) > 50


def test_the_report_page_links_the_report(deployment):
    want = f"{deployment['reports_url']}/set-b/report/report.html"
    assert want in deployment["report_links"]
    assert "RaVL audit report" in deployment["served"] and 'id="findings"' in deployment["served"]
    assert "report_url" in deployment["report_text"]


def test_stopping_leaves_no_process_behind(deployment):
    assert session_pids(deployment["session"]) == []
