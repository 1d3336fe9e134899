"""node.http without a running node: figures, metrics, health, token, thumbnails and the server itself,
on a real SQLite file filled with rows as the node writes them."""

from __future__ import annotations

import dataclasses
import json
import urllib.error
import urllib.request
from datetime import timedelta
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from sqlalchemy import create_engine, select
from sqlalchemy.orm import sessionmaker

from gradcam.config import DEFAULT_CONFIG
from gradcam.eligibility import check_dataset
from gradcam.errors import ConfigError
from node.config import HttpConfig, Settings, load_settings
from node.db import (
    Association,
    AssociationStatus,
    Instance,
    Job,
    JobStatus,
    Output,
    Result,
    Send,
    SendAttempt,
    SendStatus,
    WorkerState,
    utcnow,
)
from node.http.metrics import make_registry, reject_reason, render, skip_reason
from node.http.server import StatusApp, StatusServer
from node.http.status import job_detail, overview
from node.work.presence import Presence
from tests import helpers

TOKEN = "a-token-of-24-characters"
ALL_UP = {"receiver": True, "worker": True, "sender": True}


def _sc_file(path: Path, rows: int = 300, cols: int = 400) -> Path:
    """An RGB Secondary Capture like the node's summary picture (a gradient)."""
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    pixels = np.zeros((rows, cols, 3), np.uint8)
    pixels[..., 0] = np.linspace(0, 255, cols, dtype=np.uint8)[None, :]
    pixels[..., 2] = 200
    ds.PixelData = pixels.tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@dataclasses.dataclass
class World:
    settings: Settings
    sessions: sessionmaker
    jobs: dict[str, int]  # name -> job id
    outputs: dict[str, int]  # name -> output id


@pytest.fixture
def world(tmp_path: Path, sessions: sessionmaker) -> World:
    """One association (plus a rejected one) and five jobs: done (two outputs, a failed then a pending send),
    done (SC only), queued (old), running, skipped, failed; one job created two days ago."""
    base = load_settings(DEFAULT_CONFIG)
    spool = tmp_path / "spool"
    settings = dataclasses.replace(
        base,
        node=dataclasses.replace(base.node, storage_dir=spool, min_free_disk_mb=1),
        http=HttpConfig(port=18080, recent=10),
    )
    now = utcnow()
    jobs: dict[str, int] = {}
    outputs: dict[str, int] = {}
    with sessions.begin() as s:
        assoc = Association(
            calling_ae="MODALITY", called_ae="GRADCAM", peer_host="127.0.0.1", peer_port=5000,
            status=AssociationStatus.RELEASED, n_received=6, n_failed=2,
        )  # fmt: skip
        s.add(assoc)
        s.add(
            Association(
                calling_ae="X", called_ae="NOTUS", peer_host="127.0.0.1", peer_port=5001,
                status=AssociationStatus.REJECTED,
                reason="called AE title 'NOTUS' is not this node's (GRADCAM)",
            )
        )  # fmt: skip
        s.flush()

        def job(name: str, status: JobStatus, created_ago_s: float, **kw: Any) -> Job:
            inst = Instance(
                sop_instance_uid=f"1.2.3.{len(jobs) + 1}", sop_class_uid=helpers.DX_SOP_CLASS,
                study_instance_uid="1.2.3", series_instance_uid="1.2.3.0", patient_id="SECRET-PATIENT-ID",
                modality="DX", transfer_syntax=ExplicitVRLittleEndian, path=str(spool / "x.dcm"),
                size_bytes=10, association_id=assoc.id, calling_ae="MODALITY",
                times_received=2 if name == "done" else 1,
            )  # fmt: skip
            s.add(inst)
            s.flush()
            row = Job(
                instance_id=inst.id, status=status, attempts=1, reply_ae="MODALITY",
                created_at=now - timedelta(seconds=created_ago_s), **kw,
            )  # fmt: skip
            s.add(row)
            s.flush()
            jobs[name] = row.id
            return row

        done = job("done", JobStatus.DONE, 30, consensus=True, duration_ms=800.0)
        for model, p, ms in (("ResNet18", 0.9, 40.0), ("DenseNet121", 0.2, 300.0)):
            s.add(
                Result(
                    job_id=done.id, model=model, builder="b", probability=p, threshold=0.5, positive=p >= 0.5,
                    cam_peak_row=1, cam_peak_col=2, checkpoint_sha256="0" * 64, ms=ms,
                )
            )  # fmt: skip
        for name, kind, job_row in (("sc", "sc", done), ("summary", "summary", done), ("sr", "sr", done)):
            out = Output(
                job_id=job_row.id, kind=kind, model="ResNet18" if kind == "sc" else None,
                sop_class_uid=SecondaryCaptureImageStorage, sop_instance_uid=generate_uid(),
                series_instance_uid="9.9", path=str(_sc_file(spool / "outputs" / f"{name}.dcm")),
            )  # fmt: skip
            s.add(out)
            s.flush()
            outputs[name] = out.id
        send = Send(
            job_id=done.id, destination="pacs", ae_title="PACS", host="127.0.0.1", port=1,
            status=SendStatus.PENDING, attempts=1, last_error="connection refused",
        )  # fmt: skip
        s.add(send)
        s.flush()
        s.add(
            SendAttempt(
                send_id=send.id, outcome="failed", detail="connection refused", finished_at=now,
                send_status="pending",
            )
        )  # fmt: skip

        sc_only = job("sc_only", JobStatus.DONE, 60, consensus=False, duration_ms=2500.0)
        out = Output(
            job_id=sc_only.id, kind="sc", model="ResNet18", sop_class_uid=SecondaryCaptureImageStorage,
            sop_instance_uid=generate_uid(), series_instance_uid="9.9",
            path=str(_sc_file(spool / "outputs" / "sc2.dcm")),
        )  # fmt: skip
        s.add(out)
        s.flush()
        outputs["sc_only"] = out.id
        sent = Send(
            job_id=sc_only.id, destination="pacs", ae_title="PACS", host="h", port=1,
            status=SendStatus.SENT, attempts=1,
        )  # fmt: skip
        s.add(sent)
        s.flush()
        s.add(SendAttempt(send_id=sent.id, outcome="sent", detail="", finished_at=now, send_status="sent"))

        job("queued", JobStatus.QUEUED, 120)
        job("running", JobStatus.RUNNING, 10)
        job("skipped", JobStatus.SKIPPED, 5, reason="body part <script>alert(1)</script> is not CHEST")
        job("failed_old", JobStatus.FAILED, 2 * 86400, reason="blank image: no pixels; nothing to analyse")
        # an output that names a file outside the spool (never served)
        out = Output(
            job_id=sc_only.id, kind="summary", sop_class_uid=SecondaryCaptureImageStorage,
            sop_instance_uid=generate_uid(), series_instance_uid="9.9", path=str(tmp_path / "elsewhere.dcm"),
        )  # fmt: skip
        _sc_file(tmp_path / "elsewhere.dcm")
        s.add(out)
        s.flush()
        outputs["outside"] = out.id
    return World(settings, sessions, jobs, outputs)


# --- figures ------------------------------------------------------------------------------------------------


def test_overview_counts_what_the_tables_hold(world: World) -> None:
    with world.sessions() as s:
        o = overview(s, world.settings, 10)
    assert (o.queue_depth, o.running, o.oldest_queued_job) == (1, 1, world.jobs["queued"])
    assert 119 <= (o.oldest_queued_age_s or 0) < 200
    assert o.last_hour == {"done": 2, "queued": 1, "running": 1, "skipped": 1}
    assert o.last_day == o.last_hour  # the failed job is two days old
    assert [(m.model, m.analysed, m.positive) for m in o.models] == [
        ("DenseNet121", 1, 0),
        ("ResNet18", 1, 1),
    ]
    assert o.sends.by_status == {"pending": 1, "sent": 1}
    assert (o.sends.last_error, o.sends.last_error_job) == ("connection refused", world.jobs["done"])
    assert o.disk.free_bytes and o.disk.reserve_bytes == 2**20
    newest_first = ("skipped", "running", "done", "sc_only", "queued", "failed_old")
    assert [r["job_id"] for r in o.recent] == [world.jobs[name] for name in newest_first]
    thumbs = {r["job_id"]: r["thumbnail"] for r in o.recent}
    # the summary is preferred to an SC; a job without pictures has none
    assert thumbs[world.jobs["done"]] == world.outputs["summary"]
    assert thumbs[world.jobs["queued"]] is None
    assert all("patient_id" not in json.dumps(r) and "SECRET" not in json.dumps(r) for r in o.recent)


def test_the_page_names_the_workers_that_hold_running_jobs(world: World) -> None:
    now = utcnow()
    with world.sessions.begin() as s:
        running = s.get(Job, world.jobs["running"])
        running.leased_by, running.lease_until = "gpu-host-2:4242", now - timedelta(seconds=5)
    with world.sessions() as s:
        (holder,) = overview(s, world.settings, 10, now).holders
    assert (holder.worker, holder.jobs, holder.expired) == ("gpu-host-2:4242", 1, True)
    html = StatusApp(world.settings, world.sessions, lambda: ALL_UP).get("/", {}).body.decode()
    assert (
        '<span class="holder error" data-worker="gpu-host-2:4242">gpu-host-2:4242: 1 job(s), lease expired: '
        "worker gone?</span>" in html
    )
    with world.sessions.begin() as s:
        s.get(Job, world.jobs["running"]).lease_until = now + timedelta(seconds=30)
    with world.sessions() as s:
        assert [h.expired for h in overview(s, world.settings, 10, now).holders] == [False]


def test_every_worker_process_shows_alive_silent_or_stopped(world: World) -> None:
    """Idle workers too: each worker process's row (node.work.presence), what the page and /metrics say of
    it, and a worker that stopped renewing without stopping shown as gone."""
    lease_s = world.settings.worker.lease_s
    models = ["ResNet18", "DenseNet121"]
    gpu = Presence(world.sessions, "gpu-host-1:11", "cuda:0", models, lease_s, lambda: (7, 1))
    cpu = Presence(world.sessions, "cpu-host:22", "cpu", ["ResNet18"], lease_s, lambda: (3, 0))
    idle = Presence(world.sessions, "cpu-host:33", "cpu", ["ResNet18"], lease_s, lambda: (0, 0))
    for p in (gpu, cpu, idle):
        p.start()
    try:
        gpu.beat()
        cpu.stop()
        with world.sessions() as s:
            seen = {w.worker: w for w in overview(s, world.settings, 10).workers}
        assert {k: v.state for k, v in seen.items()} == {
            "gpu-host-1:11": "alive",
            "cpu-host:33": "alive",
            "cpu-host:22": "stopped",
        }
        assert (seen["gpu-host-1:11"].device, seen["gpu-host-1:11"].jobs_done) == ("cuda:0", 7)
        assert seen["gpu-host-1:11"].models == "ResNet18, DenseNet121"
        assert seen["cpu-host:22"].jobs_done == 3  # its last counts, written as it stopped

        # the idle worker vanishes (kill -9): it renews no more; after a lease it is silent
        with world.sessions.begin() as s:
            row = s.query(WorkerState).filter_by(holder="cpu-host:33").one()
            row.seen_at = utcnow() - timedelta(seconds=lease_s + 1)
        app = StatusApp(world.settings, world.sessions, lambda: ALL_UP)
        html = app.get("/", {}).body.decode()
        assert 'data-figure="workers-alive">1</span> alive)' in html
        silent = html[html.index('<tr data-worker="cpu-host:33">') :].split("</tr>")[0]
        assert 'class="worker-silent"' in silent and "silent (gone?)" in silent
        m = _samples(app.get("/metrics", {}).body.decode())
        states = ("alive", "silent", "stopped")
        assert [m[("gradcam_node_workers", (("state", s),))] for s in states] == [1, 1, 1]

        # a worker started again with the pid of a long-gone one replaces its row; rows not seen for more
        # than a week go when a worker starts
        with world.sessions.begin() as s:
            s.query(WorkerState).filter_by(holder="cpu-host:22").one().seen_at = utcnow() - timedelta(days=8)
        again = Presence(world.sessions, "cpu-host:33", "cpu", ["ResNet18"], lease_s, lambda: (0, 0))
        again.start()
        again.stop()
        with world.sessions() as s:
            assert s.query(WorkerState).filter_by(holder="cpu-host:33").one().stopped_at is not None
            assert sorted(s.scalars(select(WorkerState.holder))) == ["cpu-host:33", "gpu-host-1:11"]
    finally:
        gpu.stop()
        idle.stop()


def test_job_detail_has_attempts_association_and_output_ids(world: World) -> None:
    with world.sessions() as s:
        d = job_detail(s, world.jobs["done"])
        assert job_detail(s, 10**9) is None
    assert d is not None and d["status"] == "done" and d["consensus"] is True
    assert [o["id"] for o in d["outputs"]] == [world.outputs[k] for k in ("sc", "summary", "sr")]
    assert [o["thumbnail"] is not None for o in d["outputs"]] == [True, True, False]
    assert d["sends"][0]["attempts_log"][0]["outcome"] == "failed"
    assert d["association"]["calling_ae"] == "MODALITY" and d["association"]["n_failed"] == 2


# --- metrics ------------------------------------------------------------------------------------------------


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_are_totals_of_the_tables(world: World) -> None:
    parts = {"receiver": True, "worker": False, "sender": True}
    text = render(make_registry(world.sessions, world.settings, lambda: parts)).decode()
    m = _samples(text)
    assert m[("gradcam_node_database_up", ())] == 1
    assert m[("gradcam_node_instances_received_total", ())] == 7  # one instance received twice
    assert m[("gradcam_node_instances_refused_total", ())] == 2
    assert m[("gradcam_node_associations_total", ())] == 2
    assert m[("gradcam_node_associations_rejected_total", (("reason", "called_ae_title"),))] == 1
    for status, n in (("done", 2), ("failed", 1), ("skipped", 1)):
        assert m[("gradcam_node_jobs_total", (("status", status),))] == n
    assert m[("gradcam_node_jobs_skipped_total", (("reason", "not_chest"),))] == 1
    assert m[("gradcam_node_queue_depth", ())] == 1 and m[("gradcam_node_jobs_running", ())] == 1
    assert 119 <= m[("gradcam_node_queue_oldest_age_seconds", ())] < 200
    assert m[("gradcam_node_decisions_total", (("decision", "positive"), ("model", "ResNet18")))] == 1
    assert m[("gradcam_node_sends_total", (("status", "sent"),))] == 1
    assert m[("gradcam_node_outbox_sends", (("status", "pending"),))] == 1
    assert m[("gradcam_node_send_attempts_total", (("outcome", "failed"),))] == 1
    assert m[("gradcam_node_outbox_oldest_age_seconds", ())] >= 0
    assert m[("gradcam_node_component_up", (("component", "worker"),))] == 0
    assert m[("gradcam_node_disk_reserve_bytes", ())] == 2**20
    # histograms: cumulative buckets, +Inf = count, sum in seconds
    job = {
        dict(k[1]).get("le"): v for k, v in m.items() if k[0] == "gradcam_node_job_duration_seconds_bucket"
    }
    assert (job["0.5"], job["1.0"], job["2.5"], job["+Inf"]) == (0, 1, 2, 2)
    assert m[("gradcam_node_job_duration_seconds_count", ())] == 2
    assert m[("gradcam_node_job_duration_seconds_sum", ())] == pytest.approx(3.3)
    dn = (("le", "0.25"), ("model", "DenseNet121"))
    assert m[("gradcam_node_analysis_seconds_bucket", dn)] == 0
    assert m[("gradcam_node_analysis_seconds_bucket", (("le", "0.5"), ("model", "DenseNet121")))] == 1
    assert m[("gradcam_node_analysis_seconds_sum", (("model", "ResNet18"),))] == pytest.approx(0.04)


def test_metrics_without_database_say_so(tmp_path: Path, world: World) -> None:
    (tmp_path / "file").write_text("")
    broken = sessionmaker(bind=create_engine(f"sqlite:///{tmp_path / 'file' / 'node.db'}"))
    m = _samples(render(make_registry(broken, world.settings)).decode())
    assert m[("gradcam_node_database_up", ())] == 0
    assert ("gradcam_node_queue_depth", ()) not in m


def _reason(**options: Any) -> str | None:
    return check_dataset(helpers.image_dataset(size=512, **options)).reason


def test_reasons_become_a_fixed_set_of_labels() -> None:
    # the reasons as gradcam.eligibility words them today
    assert skip_reason(_reason(modality="CT")) == "not_cr_dx"
    assert skip_reason(_reason(body_part="KNEE")) == "not_chest"
    assert skip_reason(_reason(view="LL")) == "not_frontal"
    assert skip_reason(check_dataset(helpers.image_dataset(size=16)).reason) == "too_small"
    assert skip_reason("own output (loop protection)") == "own_output"
    assert skip_reason("something new") == "other" and skip_reason(None) == "other"
    assert reject_reason("called AE title 'X' is not this node's (GRADCAM)") == "called_ae_title"
    assert (
        reject_reason("Rejected (Permanent), Service User: Calling AE title not recognised")
        == "calling_ae_title"
    )
    assert (
        reject_reason("Rejected (Transient), Service Provider: Local limit exceeded")
        == "too_many_associations"
    )


# --- health -------------------------------------------------------------------------------------------------


def test_health_names_what_is_down(tmp_path: Path, world: World) -> None:
    app = StatusApp(world.settings, world.sessions, lambda: ALL_UP)
    ok = app.get("/healthz", {})
    assert ok.status == 200 and ok.body.startswith(b"ok: receiver up, worker up, sender up, database up")
    down = StatusApp(world.settings, world.sessions, lambda: {**ALL_UP, "worker": False}).get("/healthz", {})
    assert (down.status, down.body) == (503, b"unhealthy: worker is not running\n")

    def broken_probe() -> dict[str, bool]:
        raise RuntimeError("boom")

    assert (
        b"liveness probe failed"
        in StatusApp(world.settings, world.sessions, broken_probe).get("/healthz", {}).body
    )
    (tmp_path / "file").write_text("")
    broken = sessionmaker(bind=create_engine(f"sqlite:///{tmp_path / 'file' / 'node.db'}"))
    no_db = StatusApp(world.settings, broken, lambda: ALL_UP)
    res = no_db.get("/healthz", {})
    assert (res.status, res.body) == (503, b"unhealthy: database does not answer (OperationalError)\n")
    assert no_db.get("/", {}).status == 503  # the page says so too, without a traceback


# --- token --------------------------------------------------------------------------------------------------


def test_token_bearer_and_cookie(world: World) -> None:
    settings = dataclasses.replace(world.settings, http=HttpConfig(port=18080, token=TOKEN))
    app = StatusApp(settings, world.sessions, lambda: ALL_UP)
    for path in ("/", "/metrics", f"/job/{world.jobs['done']}", f"/thumb/{world.outputs['summary']}.png"):
        denied = app.get(path, {})
        assert denied.status == 401 and denied.headers["WWW-Authenticate"].startswith("Bearer")
        assert app.get(path, {"Authorization": f"Bearer {TOKEN}"}).status == 200, path
        assert app.get(path, {"Authorization": "Bearer wrong-token-wrong-token"}).status == 401
    assert app.get("/healthz", {}).status == 200
    assert app.get("/?token=nope", {}).status == 401
    # a browser: ?token= once, then the cookie
    redirect = app.get(f"/job/{world.jobs['done']}?token={TOKEN}&x=1", {})
    assert redirect.status == 303 and redirect.headers["Location"] == f"/job/{world.jobs['done']}?x=1"
    cookie = redirect.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
    pair = cookie.split(";")[0]
    assert app.get("/", {"Cookie": pair}).status == 200
    assert app.get("/", {"Cookie": pair[:-1] + "0"}).status == 401
    assert app.get("/\\evil.example?token=" + TOKEN, {}).headers["Location"] == "/"


# --- page and thumbnails ------------------------------------------------------------------------------------


def test_page_escapes_and_hides_patient_ids(world: World) -> None:
    res = StatusApp(world.settings, world.sessions, lambda: ALL_UP).get("/", {})
    html = res.body.decode()
    assert res.status == 200 and res.content_type.startswith("text/html")
    assert "<script>alert(1)" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "SECRET" not in html
    nonce = res.headers["Content-Security-Policy"].split("'nonce-")[1].split("'")[0]
    assert (
        f'<script nonce="{nonce}">' in html and "unsafe-inline" not in res.headers["Content-Security-Policy"]
    )
    assert f'data-job-id="{world.jobs["done"]}" data-status="done" data-consensus="positive"' in html
    detail = StatusApp(world.settings, world.sessions, lambda: ALL_UP).get(f"/job/{world.jobs['done']}", {})
    assert detail.status == 200 and b"connection refused" in detail.body and b"SECRET" not in detail.body


def test_thumbnails_only_of_known_pictures_in_the_spool(world: World) -> None:
    app = StatusApp(world.settings, world.sessions, lambda: ALL_UP)
    res = app.get(f"/thumb/{world.outputs['summary']}.png", {})
    assert res.status == 200 and res.content_type == "image/png"
    png = cv2.imdecode(np.frombuffer(res.body, np.uint8), cv2.IMREAD_COLOR)
    assert png.shape == (192, 256, 3)  # 300 x 400 downscaled to a 256 px long side
    assert png[96, 0, 0] > 150 and png[96, 255, 2] > 200  # blue stays blue (BGR), red grows to the right
    assert app.get(f"/thumb/{world.outputs['sr']}.png", {}).status == 404  # not a picture
    assert app.get(f"/thumb/{world.outputs['outside']}.png", {}).status == 404
    assert app.get("/thumb/999999.png", {}).status == 404
    assert app.get("/thumb/../../etc/passwd", {}).status == 404
    assert app.get("/job/999999", {}).status == 404


def test_server_answers_over_http_and_stops(world: World) -> None:
    server = StatusServer(StatusApp(world.settings, world.sessions, lambda: ALL_UP), "127.0.0.1", 0)
    host, port = server.address
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=10) as res:
            assert res.status == 200 and res.read().startswith(b"ok")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"http://{host}:{port}/nothing", timeout=10)
        assert info.value.code == 404
    finally:
        server.stop()
    assert not server.is_alive()


# --- configuration ------------------------------------------------------------------------------------------


def _config(tmp_path: Path, http: str) -> Path:
    text = DEFAULT_CONFIG.read_text()
    start = text.index("[http]")
    end = text.find("\n[", start + 1)
    end = len(text) if end < 0 else end
    path = tmp_path / "node.toml"
    path.write_text(text[:start] + "[http]\n" + http + "\n" + text[end:])
    return path


def test_http_section_defaults_and_checks(tmp_path: Path) -> None:
    assert load_settings(_config(tmp_path, "")).http == HttpConfig()
    assert load_settings(DEFAULT_CONFIG).http == HttpConfig()
    cfg = load_settings(_config(tmp_path, f'port = 9100\ntoken = "{TOKEN}"\nrecent = 5')).http
    assert (cfg.port, cfg.token, cfg.recent) == (9100, TOKEN, 5)
    for bad, key, words in (
        ('token = "short"', "http.token", "16-256 URL-safe"),
        ('token = "has spaces in it, sixteen+"', "http.token", "URL-safe"),
        ("port = 11112", "http.port", "other than [node] port"),
        ("recent = 0", "http.recent", "between 1 and 500"),
        ("enabeld = false", "http.enabeld", "unknown key"),
    ):
        with pytest.raises(ConfigError) as info:
            load_settings(_config(tmp_path, bad))
        assert info.value.key == key and words in str(info.value), bad
    assert not load_settings(_config(tmp_path, "enabled = false\nport = 11112")).http.enabled
