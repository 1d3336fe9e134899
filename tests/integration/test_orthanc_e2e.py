"""Orthanc in the loop: Debian's Orthanc with the project's config and Lua script, on loopback.

- The Lua script routes exactly the chest CR/DX images (DCMTK storescp stands in for the node).
- Full round trip: storescu -> Orthanc -> Lua -> node -> Orthanc; the study in Orthanc then holds the
  Secondary Capture and SR series, whose content equals the node's database; the node's own outputs are
  never routed back to it.
- Orthanc down when results are ready: they arrive once Orthanc is back.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any

import helpers
import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from node.config import OutputsConfig
from node.db import Job, JobStatus, Send, SendStatus
from node.demo import LocalOrthanc, OrthancError, compress, free_port, storescu
from tests.integration.orthanc_fixture import (
    OrthancFactory,
    orthanc_factory_fixture,  # noqa: F401  (the fixture "orthanc_factory")
    require_orthanc,
    wait_for,
)

if TYPE_CHECKING:
    from tests.integration.conftest import NodeFactory, RunningNode

pytestmark = pytest.mark.integration

STORESCP = Path("/usr/bin/storescp")
SC_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7"
SR_3D_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"


def _orthanc_id(orthanc: LocalOrthanc, sop_uid: str) -> str:
    hits = [h for h in orthanc.client.post_json("/tools/lookup", sop_uid) if h["Type"] == "Instance"]
    assert len(hits) == 1, (sop_uid, hits)
    return str(hits[0]["ID"])


def _routing_log(orthanc: LocalOrthanc) -> dict[str, str]:
    """Orthanc instance ID -> "sent ..." / "not sent: reason", from the Lua script's log lines."""
    out = {}
    for line in orthanc.log_path.read_text(encoding="utf-8", errors="replace").splitlines():
        m = _VERDICT.search(line)
        if m:
            out[m["id"]] = "sent" if m["verdict"] == "sent" else f"not sent: {m['reason']}"
    return out


_VERDICT = re.compile(
    r"gradcam-node routing: (?P<verdict>sent|not sent) (?P<id>[0-9a-f-]+)(: (?P<reason>.*))?"
)


@pytest.fixture
def storescp_node(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """DCMTK storescp as a stand-in for the node (AE GRADCAM): (port, folder of received files)."""
    require_orthanc()
    if not STORESCP.exists():
        pytest.skip(f"{STORESCP} is not installed (apt-get install dcmtk)")
    port, folder = free_port(), tmp_path / "received"
    folder.mkdir()
    log = (tmp_path / "storescp.log").open("w")
    proc = subprocess.Popen(
        [str(STORESCP), "-aet", "GRADCAM", "--accept-all", "-od", str(folder), str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield port, folder
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")  # " chest ": devices do send this
def test_lua_routes_chest_cr_dx_only(
    orthanc_factory: OrthancFactory,
    storescp_node: tuple[int, Path],
    tmp_path: Path,
) -> None:
    node_port, received = storescp_node
    orthanc = orthanc_factory(node_port=node_port)
    study = generate_uid()
    cases: dict[str, tuple[Any, str]] = {
        # name: (dataset, expected verdict prefix)
        "cr_chest": (helpers.image_dataset(modality="CR", study_uid=study, seed=1), "sent"),
        "dx_no_body_part": (helpers.image_dataset(modality="DX", body_part=None, seed=2), "sent"),
        "dx_chest_lower_case": (helpers.image_dataset(modality="DX", body_part=" chest ", seed=3), "sent"),
        "ct_chest": (helpers.image_dataset(modality="CT", seed=4), "not sent: modality CT"),
        "cr_knee": (
            helpers.image_dataset(modality="CR", body_part="KNEE", seed=5),
            "not sent: body part KNEE",
        ),
        "sr": (helpers.sr_dataset(study_uid=study), "not sent: SOP class"),
        "sc_claiming_cr": (
            helpers.image_dataset(modality="CR", sop_class_uid=SC_SOP_CLASS, seed=6),
            "not sent: SOP class",
        ),
        "node_manufacturer": (
            helpers.image_dataset(modality="DX", manufacturer="gradcam-node", seed=7),
            "not sent: a gradcam-node",
        ),
    }
    files = {
        name: helpers.write_dataset(ds, tmp_path / "in" / f"{name}.dcm") for name, (ds, _) in cases.items()
    }
    storescu(list(files.values()), orthanc.dicom_port, orthanc.aet)

    # what the node itself stores (calling AE GRADCAM) is never routed, whatever it is
    own = helpers.image_dataset(modality="CR", seed=8)
    storescu([helpers.write_dataset(own, tmp_path / "own.dcm")], orthanc.dicom_port, orthanc.aet, "GRADCAM")
    # an upload through the REST API (Orthanc Explorer) is routed like a DICOM store
    upload = helpers.image_dataset(modality="DX", seed=9)
    orthanc.client.upload(helpers.write_dataset(upload, tmp_path / "up.dcm").read_bytes())
    # a modality missing from DicomModalities may not store at all
    with pytest.raises(OrthancError, match="storescu exit"):
        storescu([files["cr_chest"]], orthanc.dicom_port, orthanc.aet, "INTRUDER")

    expected = {_orthanc_id(orthanc, ds.SOPInstanceUID): verdict for ds, verdict in cases.values()}
    expected[_orthanc_id(orthanc, own.SOPInstanceUID)] = "not sent: stored by the node itself"
    expected[_orthanc_id(orthanc, upload.SOPInstanceUID)] = "sent"

    def verdicts() -> dict[str, str] | None:
        log = _routing_log(orthanc)
        return log if log.keys() >= expected.keys() else None

    log = wait_for("the Lua verdict on every instance", verdicts, 30)
    for instance_id, verdict in expected.items():
        assert log[instance_id].startswith(verdict), (instance_id, log[instance_id], verdict)

    routed = {ds.SOPInstanceUID for ds, verdict in cases.values() if verdict == "sent"} | {
        upload.SOPInstanceUID
    }
    # storescp names files MODALITY.SOPInstanceUID
    wait_for("the routed instances at the stand-in node", lambda: _received(received) >= routed, 30)
    assert _received(received) == routed
    jobs = wait_for("the routing jobs to finish", lambda: _store_jobs(orthanc, finished=True), 30)
    assert [j["State"] for j in jobs] == ["Success"] * len(routed)


def _received(folder: Path) -> set[str]:
    return {p.name.split(".", 1)[1] for p in folder.iterdir() if not p.name.endswith(".tmp")}


def _store_jobs(orthanc: LocalOrthanc, finished: bool = False) -> list[dict[str, Any]] | None:
    """Orthanc's DicomModalityStore jobs (the Lua routing); None while some still run when ``finished``."""
    jobs = [j for j in orthanc.client.get_json("/jobs?expand") if j["Type"] == "DicomModalityStore"]
    if finished and any(j["State"] in ("Pending", "Running", "Retry") for j in jobs):
        return None
    return jobs


# --- the full round trip with the node ----------------------------------------------------------------------

MODELS = ("ResNet18", "EfficientNet-B0", "DenseNet121")
SEED = 31
PATIENT_STUDY_KEYWORDS = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)


def _phantom(
    folder: Path, index: int, positive: bool, modality: str, encoding: str | None
) -> tuple[Path, Any]:
    """A phantom chest image as its own study, written (and compressed by DCMTK) for storescu."""
    from gradcam.phantom_dicom import phantom_dataset, write_dicom
    from gradcam.phantoms import make_phantom

    ds = phantom_dataset(make_phantom(SEED, index, positive, 128), SEED, index, modality=modality)
    path = folder / f"{index}-{modality}-{encoding or 'raw'}.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_dicom(ds, path)
    if encoding is not None:
        assert compress(path, encoding), f"{encoding} encoder missing (DCMTK)"
    return path, ds


def _node_for_orthanc(
    node_factory: NodeFactory, orthanc_dicom_port: int, models: tuple[str, ...]
) -> RunningNode:
    """A node whose results go to an Orthanc (AE ORTHANC) on ``orthanc_dicom_port``; fast retries."""
    return node_factory(
        models=models,
        destinations=[
            {"name": "orthanc", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc_dicom_port}
        ],
        default_destination="orthanc",
        node={"allowed_calling_aets": ["ORTHANC"]},
        outbox={"max_attempts": 200, "backoff_initial_s": 0.2, "backoff_max_s": 1.0},
    )


def _jobs(sessions: Any) -> list[Job]:
    with sessions() as s:
        jobs = s.scalars(
            select(Job).options(
                selectinload(Job.instance),
                selectinload(Job.results),
                selectinload(Job.outputs),
                selectinload(Job.sends).selectinload(Send.attempts_log),
            )
        ).all()
        s.expunge_all()
        return list(jobs)


def _all_sent(sessions: Any, n: int) -> list[Job] | None:
    jobs = _jobs(sessions)
    done = [
        j for j in jobs if j.status == JobStatus.DONE and j.sends and j.sends[0].status == SendStatus.SENT
    ]
    failed = [j for j in jobs if j.status in (JobStatus.FAILED, JobStatus.SKIPPED)]
    assert not failed, [(j.status, j.reason) for j in failed]
    return jobs if len(done) == n else None


def test_results_come_back_into_the_study(
    node_factory: NodeFactory,
    orthanc_factory: OrthancFactory,
    tmp_path: Path,
) -> None:
    require_orthanc()
    from node.outputs import read_sr_findings

    orthanc_port = free_port()
    node = _node_for_orthanc(node_factory, orthanc_port, MODELS)
    orthanc = orthanc_factory(node_port=node.port, dicom_port=orthanc_port)
    inputs = [
        _phantom(tmp_path / "in", 0, True, "CR", None),
        _phantom(tmp_path / "in", 1, False, "DX", "jpeg-ls"),
        _phantom(tmp_path / "in", 2, True, "DX", "jpeg-lossless"),
    ]
    storescu([p for p, _ in inputs], orthanc.dicom_port, orthanc.aet)

    sessions = node.sessions()
    jobs = wait_for(
        "the node to analyse every image and send the results", lambda: _all_sent(sessions, 3), 300
    )
    by_source = {j.instance.sop_instance_uid: j for j in jobs}
    # the node received exactly the original images, once each, from Orthanc: never its own outputs
    assert by_source.keys() == {ds.SOPInstanceUID for _, ds in inputs}
    assert all(j.instance.times_received == 1 and j.instance.calling_ae == "ORTHANC" for j in jobs)

    outputs_cfg = OutputsConfig()
    for path, ds in inputs:
        job = by_source[ds.SOPInstanceUID]
        # compressed images reach the node as the modality sent them (Orthanc does not transcode them)
        sent_syntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
        assert job.instance.transfer_syntax == str(sent_syntax)
        instances = orthanc.client.study_instances(ds.StudyInstanceUID)
        # Orthanc holds the image and exactly the node's outputs, in the same study
        assert {i["SOPInstanceUID"] for i in instances} == {ds.SOPInstanceUID} | {
            o.sop_instance_uid for o in job.outputs
        }
        outputs = [i for i in instances if i["SOPInstanceUID"] != ds.SOPInstanceUID]
        assert all(i["RemoteAET"] == "GRADCAM" for i in outputs), outputs
        series = {}
        for i in outputs:
            series.setdefault(i["SeriesInstanceUID"], []).append(i)
        assert len(series) == 2 and len({i["SeriesInstanceUID"] for i in instances}) == 3, path
        sc = [i for i in outputs if i["SOPClassUID"] == SC_SOP_CLASS]
        sr = [i for i in outputs if i["SOPClassUID"] == SR_3D_SOP_CLASS]
        assert len(sc) == len(MODELS) and len(sr) == 1
        assert {int(i["SeriesNumber"]) for i in sc} == {outputs_cfg.sc_series_number}
        assert int(sr[0]["SeriesNumber"]) == outputs_cfg.sr_series_number
        assert len({i["SeriesInstanceUID"] for i in sc}) == 1
        # patient and study attributes copied from the image
        for i in outputs:
            out = pydicom.dcmread(BytesIO(orthanc.client.instance_file(i["ID"])))
            for kw in PATIENT_STUDY_KEYWORDS:
                assert out.get(kw) == ds.get(kw), (kw, out.get(kw), ds.get(kw))
        # the SR's findings, read back from Orthanc, are the node's database
        findings = read_sr_findings(pydicom.dcmread(BytesIO(orthanc.client.instance_file(sr[0]["ID"]))))
        assert findings.consensus == job.consensus
        got = {f.model: (f.probability, f.threshold, f.positive) for f in findings.models}
        want = {r.model: (r.probability, r.threshold, r.positive) for r in job.results}
        assert got.keys() == want.keys() == set(MODELS)
        for model, (p, t, positive) in want.items():
            assert got[model] == (pytest.approx(p, abs=1e-6), pytest.approx(t, abs=1e-6), positive), model

    # Orthanc routed the three images, and its Lua refused every output the node stored
    jobs_routed = _store_jobs(orthanc, finished=True)
    assert jobs_routed is not None and len(jobs_routed) == 3
    verdicts = _routing_log(orthanc)
    for job in jobs:
        for o in job.outputs:
            assert verdicts[_orthanc_id(orthanc, o.sop_instance_uid)].startswith(
                "not sent: stored by the node"
            )


def test_results_wait_until_orthanc_is_back(
    node_factory: NodeFactory,
    orthanc_factory: OrthancFactory,
    tmp_path: Path,
) -> None:
    """Results ready while Orthanc cannot take them are kept by the node and arrive when Orthanc is back."""
    require_orthanc()
    results_port = free_port()  # where the node sends results: nothing listens there yet
    node = _node_for_orthanc(node_factory, results_port, ("ResNet18",))
    orthanc = orthanc_factory(node_port=node.port)  # receives and routes on another port
    path, ds = _phantom(tmp_path / "in", 0, True, "DX", None)
    storescu([path], orthanc.dicom_port, orthanc.aet)
    sessions = node.sessions()

    def failed_attempts(at_least: int) -> tuple[Send, int] | None:
        jobs = _jobs(sessions)
        if not jobs or not jobs[0].sends:
            return None
        send = jobs[0].sends[0]
        failed = sum(1 for a in send.attempts_log if a.outcome == "failed")
        return (send, failed) if failed >= at_least else None

    send, _ = wait_for("the node's first failed sends", lambda: failed_attempts(2), 240)
    assert send.status in (SendStatus.PENDING, SendStatus.SENDING), send.status
    assert "cannot connect" in (send.last_error or ""), send.last_error
    assert not orthanc.client.study_instances(ds.StudyInstanceUID)[1:]  # only the image, no result yet
    # Orthanc goes down completely; the node keeps trying
    orthanc.stop()
    _, failed = failed_attempts(0) or (None, 0)
    wait_for("another failed send while Orthanc is down", lambda: failed_attempts(failed + 1), 60)
    # back, on the same storage, listening where the node sends results
    orthanc.restart(dicom_port=results_port)
    jobs = wait_for("the results to be delivered", lambda: _all_sent(sessions, 1), 120)
    instances = orthanc.client.study_instances(ds.StudyInstanceUID)
    assert {i["SOPInstanceUID"] for i in instances} == {ds.SOPInstanceUID} | {
        o.sop_instance_uid for o in jobs[0].outputs
    }
    assert len(jobs[0].outputs) == 2  # one heatmap (one model) and the SR
    assert jobs[0].instance.times_received == 1  # the restart did not route the image again
