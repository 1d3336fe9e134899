"""The status page, /metrics and /healthz of a running node, read by a real browser and a real parser.

The node (subprocess, one small model) gets phantom chest images and one CT by DCMTK's storescu, a wrongly
addressed association by echoscu, and a destination where nothing listens (its sends fail). Headless
Chromium (Debian's ``chromium``) loads the page while the jobs run and again once they are over; the DOM it
dumps must list the jobs ``gradcam-node jobs --json`` lists, with the figures the database holds, and every
thumbnail decoded by the browser (the page's script marks ``data-loaded="WxH"``). ``/metrics`` is parsed with
``prometheus_client``'s parser and checked against the database. A second node with a token checks 401,
the bearer header and the ``?token=`` cookie flow in Chromium.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import cv2
import helpers
import pytest
from helpers import RunningNode, dcmtk, run_tool, wait_until
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import case, func, select

from node.db import (
    Association,
    AssociationStatus,
    Instance,
    Job,
    JobStatus,
    Result,
    Send,
    SendAttempt,
    SendStatus,
)

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
TOKEN = "status-page-test-token-0123456789"
RESULT_TIMEOUT_S = 240
N_IMAGES = 10  # phantoms sent while the page is loaded
FINAL_JOB = (JobStatus.DONE, JobStatus.FAILED, JobStatus.SKIPPED)
FINAL_SEND = (SendStatus.SENT, SendStatus.FAILED)
NodeFactory = Callable[..., RunningNode]


def chromium() -> Path:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium; `make peers` does)")
    return CHROMIUM


def browse(url: str, profile: Path, *extra: str) -> str:
    """Headless Chromium on ``url``: the DOM it dumps (or what ``extra``, e.g. ``--screenshot``, asks)."""
    args = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=5000",  # the page refreshes after 10 s: never within this budget
        *(extra or ["--dump-dom"]),
        url,
    ]
    res = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


class Dom(HTMLParser):
    """What the tests read from the dumped DOM: job rows, images, ``data-figure`` values."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.rows: list[dict[str, str]] = []
        self.images: list[dict[str, str]] = []
        self.figures: dict[str, str] = {}
        self._figure: str | None = None
        self.text: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "tr" and "data-job-id" in a:
            self.rows.append(a)
        if tag == "img":
            self.images.append({**a, "job": self.rows[-1]["data-job-id"] if self.rows else ""})
        if "data-figure" in a:
            if "data-value" in a:
                self.figures[a["data-figure"]] = a["data-value"]
            elif tag in ("span", "div"):
                self._figure = a["data-figure"]
                self.figures[self._figure] = ""

    def handle_endtag(self, tag: str) -> None:
        if tag in ("span", "div"):
            self._figure = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._figure is not None:
            self.figures[self._figure] += data


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, Any]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as res:
            return res.status, res.read(), res.headers
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers


def phantoms(folder: Path, count: int) -> list[Path]:
    from gradcam.phantom_dicom import phantom_dataset, write_dicom
    from gradcam.phantoms import make_phantom

    paths = []
    for i in range(count):
        path = folder / f"phantom-{i}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_dicom(phantom_dataset(make_phantom(7, i, i % 2 == 0, 128), 7, i), path)
        paths.append(path)
    return paths


def storescu(node: RunningNode, files: list[Path]) -> None:
    args = [dcmtk("storescu"), "-aet", "MODALITY", "-aec", node.ae_title, "127.0.0.1", str(node.port)]
    res = run_tool([*args, *files])
    assert res.returncode == 0, res.stdout


def settled(node: RunningNode, n_jobs: int) -> bool:
    """Every job and every send in a final state."""
    with node.sessions()() as s:
        jobs = s.scalars(select(Job.status)).all()
        sends = s.scalars(select(Send.status)).all()
    return len(jobs) == n_jobs and all(j in FINAL_JOB for j in jobs) and all(x in FINAL_SEND for x in sends)


def done_jobs(node: RunningNode) -> int:
    with node.sessions()() as s:
        return int(s.scalar(select(func.count()).where(Job.status == JobStatus.DONE)) or 0)


def jobs_json(node: RunningNode, limit: int) -> list[dict[str, Any]]:
    cmd = [sys.executable, "-m", "node.cli", "--config", node.config_path, "jobs", "--json", "--limit", limit]
    res = run_tool(cmd)
    assert res.returncode == 0, res.stdout
    return json.loads(res.stdout)["jobs"]


def _start(node_factory: NodeFactory, **http: Any) -> tuple[RunningNode, str]:
    port = helpers.free_port()
    node = node_factory(
        http={"port": port, "recent": 20, **http},
        preprocess={"min_side": 64},
        worker={"batch_size": 1},  # one job after the other: the first page load sees them running
        outbox={"max_attempts": 1},  # nothing listens at the destination: each send fails once, for good
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": helpers.free_port()}],
        default_destination="pacs",
    )
    base = f"http://127.0.0.1:{port}"
    wait_until("the status page", lambda: _answers(base + "/healthz"), 30)
    return node, base


def _answers(url: str) -> bool:
    """200 from ``url``; False while nothing listens yet (serve opens its HTTP port after the DICOM one
    that the node fixture waits for)."""
    try:
        return get(url)[0] == 200
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ConnectionRefusedError):
            return False
        raise


def _db_figures(node: RunningNode) -> dict[str, Any]:
    with node.sessions()() as s:
        by_status = dict(s.execute(select(Job.status, func.count()).group_by(Job.status)).all())
        sends = dict(s.execute(select(Send.status, func.count()).group_by(Send.status)).all())
        attempts = dict(
            s.execute(select(SendAttempt.outcome, func.count()).group_by(SendAttempt.outcome)).all()
        )
        results = s.execute(
            select(Result.model, func.count(), func.sum(case((Result.positive, 1), else_=0))).group_by(
                Result.model
            )
        ).all()
        last_error = s.scalar(
            select(SendAttempt.detail)
            .where(SendAttempt.outcome == "failed")
            .order_by(SendAttempt.id.desc())
            .limit(1)
        )
        return {
            "jobs": {str(getattr(k, "value", k)): n for k, n in by_status.items()},
            "sends": {str(getattr(k, "value", k)): n for k, n in sends.items()},
            "attempts": attempts,
            "results": {m: (int(n), int(p or 0)) for m, n, p in results},
            "received": s.scalar(select(func.sum(Instance.times_received))),
            "rejected": s.scalar(
                select(func.count()).where(Association.status == AssociationStatus.REJECTED)
            ),
            "durations": s.scalar(select(func.count()).where(Job.duration_ms.is_not(None))),
            "last_error": last_error,
        }


def test_page_metrics_and_health_of_a_working_node(node_factory: NodeFactory, tmp_path: Path) -> None:
    node, base = _start(node_factory)
    ct = helpers.write_dataset(helpers.image_dataset(modality="CT", size=128), tmp_path / "in" / "ct.dcm")
    storescu(node, [ct])
    # a peer that calls another AE title: refused, and counted
    refused = run_tool([dcmtk("echoscu"), "-aet", "LOST", "-aec", "NOTGRADCAM", "127.0.0.1", str(node.port)])
    assert refused.returncode != 0

    # while the node works (images still arriving, one job after the other): the page renders
    args = [dcmtk("storescu"), "-aet", "MODALITY", "-aec", node.ae_title, "127.0.0.1", str(node.port)]
    sending = subprocess.Popen([*map(str, args), *map(str, phantoms(tmp_path / "in", N_IMAGES))])
    try:
        wait_until("a first job done", lambda: done_jobs(node) >= 1, RESULT_TIMEOUT_S)
        during = Dom(browse(base + "/", tmp_path / "profile"))
    finally:
        assert sending.wait(120) == 0
    statuses = [r["data-status"] for r in during.rows]
    print("statuses on the page while the node worked:", statuses)
    assert "done" in statuses and set(statuses) <= {s.value for s in JobStatus}
    assert during.figures["queue-depth"].isdigit()

    wait_until("all jobs and sends to end", lambda: settled(node, N_IMAGES + 1), RESULT_TIMEOUT_S)
    html = browse(base + "/", tmp_path / "profile")
    (tmp_path / "page.html").write_text(html)
    dom = Dom(html)

    # the job rows are `gradcam-node jobs --json`'s, in its order
    jobs = jobs_json(node, 20)
    assert [int(r["data-job-id"]) for r in dom.rows] == [j["job_id"] for j in jobs]
    assert [r["data-status"] for r in dom.rows] == [j["status"] for j in jobs]
    consensus = {None: "-", True: "positive", False: "negative"}
    assert [r["data-consensus"] for r in dom.rows] == [consensus[j["consensus"]] for j in jobs]
    assert sorted(j["status"] for j in jobs) == ["done"] * N_IMAGES + ["skipped"]

    # a thumbnail per analysed image, decoded by the browser
    with_picture = {str(j["job_id"]) for j in jobs if any(o["kind"] == "summary" for o in j["outputs"])}
    assert len(with_picture) == N_IMAGES
    thumbs = [img for img in dom.images if "thumb" in img.get("class", "")]
    assert {img["job"] for img in thumbs} == with_picture
    for img in thumbs:
        width, height = (int(v) for v in img["data-loaded"].split("x"))  # "error" fails here
        assert 0 < width <= 256 and 0 < height <= 256, img

    # the figures are the database's
    db = _db_figures(node)
    assert dom.figures["queue-depth"] == "0" and dom.figures["running"] == "0"
    for status in JobStatus:
        n = str(db["jobs"].get(status.value, 0))
        assert dom.figures[f"jobs-hour-{status.value}"] == n and dom.figures[f"jobs-day-{status.value}"] == n
    for status in SendStatus:
        assert dom.figures[f"sends-{status.value}"] == str(db["sends"].get(status.value, 0))
    assert db["sends"] == {"failed": N_IMAGES}
    assert dom.figures["sends-last-error"] == db["last_error"] and db["last_error"]
    analysed, positive = db["results"]["ResNet18"]
    assert (dom.figures["model-ResNet18-analysed"], dom.figures["model-ResNet18-positive"]) == (
        str(analysed),
        str(positive),
    )
    assert int(dom.figures["disk-free-bytes"]) > 0 and dom.figures["disk-reserve-bytes"] == "0"
    assert "PHANTOM" not in html  # patient names and IDs never reach the page

    # a screenshot, for people
    shot = tmp_path / "page.png"
    browse(base + "/", tmp_path / "profile", f"--screenshot={shot}", "--window-size=1400,1100")
    picture = cv2.imread(str(shot))
    assert picture is not None and picture.shape[:2] == (1100, 1400)

    # one job's detail page, with its pictures decoded
    done = next(j for j in jobs if j["status"] == "done")
    detail = Dom(browse(f"{base}/job/{done['job_id']}", tmp_path / "profile"))
    assert detail.figures["job-id"] == str(done["job_id"]) and detail.figures["status"] == "done"
    pictures = [img for img in detail.images if "thumb" in img.get("class", "")]
    assert len(pictures) == sum(o["kind"] in ("summary", "sc") for o in done["outputs"])
    assert all(img["data-loaded"] != "error" and "x" in img["data-loaded"] for img in pictures)

    # /metrics, parsed as Prometheus does
    status, body, headers = get(base + "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=")
    m = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }
    assert m[("gradcam_node_database_up", ())] == 1
    assert m[("gradcam_node_instances_received_total", ())] == db["received"] == N_IMAGES + 1
    for status_ in ("done", "failed", "skipped"):
        assert m[("gradcam_node_jobs_total", (("status", status_),))] == db["jobs"].get(status_, 0)
    assert m[("gradcam_node_jobs_skipped_total", (("reason", "not_cr_dx"),))] == 1
    assert (
        m[("gradcam_node_associations_rejected_total", (("reason", "called_ae_title"),))]
        == db["rejected"]
        == 1
    )
    assert m[("gradcam_node_sends_total", (("status", "failed"),))] == N_IMAGES
    assert (
        m[("gradcam_node_send_attempts_total", (("outcome", "failed"),))]
        == db["attempts"]["failed"]
        == N_IMAGES
    )
    assert m[("gradcam_node_queue_depth", ())] == 0 and m[("gradcam_node_outbox_oldest_age_seconds", ())] == 0
    assert m[("gradcam_node_analysis_seconds_count", (("model", "ResNet18"),))] == analysed
    assert m[("gradcam_node_job_duration_seconds_count", ())] == db["durations"] == N_IMAGES
    for positive_ in (True, False):
        label = "positive" if positive_ else "negative"
        expected = positive if positive_ else analysed - positive
        assert (
            m.get(("gradcam_node_decisions_total", (("decision", label), ("model", "ResNet18"))), 0)
            == expected
        )
    for part in ("receiver", "worker", "sender"):
        assert m[("gradcam_node_component_up", (("component", part),))] == 1

    # /healthz: everything runs
    status, body, _ = get(base + "/healthz")
    assert (status, body) == (200, b"ok: receiver up, worker up, sender up, database up\n")


def test_token_header_and_browser_cookie(node_factory: NodeFactory, tmp_path: Path) -> None:
    node, base = _start(node_factory, token=TOKEN)
    storescu(node, phantoms(tmp_path / "in", 1))
    wait_until("the job and its send to end", lambda: settled(node, 1), RESULT_TIMEOUT_S)
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    for path in ("/", "/metrics", "/job/1"):
        assert get(base + path)[0] == 401, path
        assert get(base + path, bearer)[0] == 200, path
    assert get(base + "/healthz")[0] == 200  # open: it tells only what is down

    # a browser without the token gets the 401 text
    assert "401 unauthorised" in browse(base + "/", tmp_path / "profile-none")
    # ?token= once: redirected to the page without it, which only the cookie lets in (thumbnails too)
    dom = Dom(browse(f"{base}/?token={TOKEN}", tmp_path / "profile"))
    assert [int(r["data-job-id"]) for r in dom.rows] == [j["job_id"] for j in jobs_json(node, 20)]
    thumbs = [img for img in dom.images if "thumb" in img.get("class", "")]
    assert len(thumbs) == 1 and "x" in thumbs[0]["data-loaded"], thumbs


def test_status_port_in_use_stops_the_start_with_one_line(tmp_path: Path, checkpoint_root: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        cfg = helpers.write_test_config(
            tmp_path / "node.toml",
            checkpoints=helpers.checkpoints_for(checkpoint_root, ("ResNet18",)),
            port=helpers.free_port(),
            storage_dir=tmp_path / "spool",
            database_url=f"sqlite:///{tmp_path / 'node.db'}",
            http={"port": port},
        )
        res = subprocess.run(
            [sys.executable, "-m", "node.cli", "--config", str(cfg), "serve"],
            cwd=helpers.REPO_ROOT,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert res.returncode == 1, res.stderr
    errors = [line for line in res.stderr.splitlines() if "error:" in line]
    assert errors == [
        f"gradcam-node: error: cannot serve the status page on 127.0.0.1:{port}: Address already in use: "
        f"set [http] port, or enabled = false, in {cfg}"
    ], res.stderr
    assert "loading models" not in res.stderr and "Traceback" not in res.stderr
