"""Orthanc in the loop: Debian's Orthanc with the project's config and Lua script, on loopback.

- The Lua script routes exactly the chest CR/DX images (DCMTK storescp stands in for the node).
- Full round trip: storescu -> Orthanc -> Lua -> node -> Orthanc; the study in Orthanc then holds the
  Secondary Capture, heatmap Segmentation and SR series, whose content equals the node's database; the
  node's own outputs are never routed back to it.
- What a viewer finds, with the committed demo checkpoints (real decisions): for a positive and a negative
  phantom, every reference of the SR resolves to an instance of the same study, each heatmap has the
  source's geometry, and a negative model gets no map.
- A changed configuration: the image sent again is analysed again, the results get new UIDs and the new SR
  supersedes the old one in Orthanc.
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
from node.ops.orthanc import LocalOrthanc
from node.ops.peers import PeerError, compress, free_port, storescu
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
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


def _expected_kinds(job: Job) -> list[str]:
    """The output kinds of a job with the default ``[outputs]``: maps only for positive models."""
    positives = sum(1 for r in job.results if r.positive)
    return sorted(["summary", "sr", *["sc"] * positives, *["heatmap"] * positives])


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
    with pytest.raises(PeerError, match="storescu exit"):
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
        assert sorted(o.kind for o in job.outputs) == _expected_kinds(job)
        positives = sum(1 for r in job.results if r.positive)
        series = {}
        for i in outputs:
            series.setdefault(i["SeriesInstanceUID"], []).append(i)
        assert len(series) == (3 if positives else 2), path
        sc = [i for i in outputs if i["SOPClassUID"] == SC_SOP_CLASS]
        seg = [i for i in outputs if i["SOPClassUID"] == SEG_SOP_CLASS]
        sr = [i for i in outputs if i["SOPClassUID"] == SR_3D_SOP_CLASS]
        assert (len(sc), len(seg), len(sr)) == (1 + positives, positives, 1)
        assert {int(i["SeriesNumber"]) for i in sc} == {outputs_cfg.sc_series_number}
        assert {int(i["SeriesNumber"]) for i in seg} <= {outputs_cfg.heatmap_series_number}
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
    assert sorted(o.kind for o in jobs[0].outputs) == _expected_kinds(jobs[0])
    assert jobs[0].instance.times_received == 1  # the restart did not route the image again


# --- what a viewer finds, with the demo checkpoints ---------------------------------------------------------

# Phantoms of seed 31 the committed demo checkpoints call all positive (index 0, positive) and all negative
# (index 0, negative); the test checks the decisions it relies on.
VIEWER_SEED = 31


def _demo_node(base: Path, orthanc_port: int, **overrides: Any) -> RunningNode:
    """A node on the shipped configuration (the committed demo checkpoints), results to Orthanc."""
    from gradcam.config import DEFAULT_CONFIG
    from node.ops.node_toml import derived_node_config

    port = overrides.get("node", {}).get("port") or free_port()
    values: dict[str, Any] = {
        "node": {
            "port": port,
            "storage_dir": str(base / "spool"),
            "database_url": f"sqlite:///{base / 'node.db'}",
            "allowed_calling_aets": ["ORTHANC"],
            "min_free_disk_mb": 0,
        },
        "destinations": [
            {"name": "orthanc", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc_port}
        ],
        "routing": {"default_destination": "orthanc"},
        "outbox": {"backoff_initial_s": 0.2, "backoff_max_s": 1.0},
    }
    for table, entries in overrides.items():
        values.setdefault(table, {}).update(entries)
    base.mkdir(parents=True, exist_ok=True)
    cfg = derived_node_config(DEFAULT_CONFIG, base / "node.toml", values)
    return helpers.start_node_with(cfg, base, port, probe_ae="ORTHANC")


def _viewer_phantom(folder: Path, positive: bool) -> tuple[Path, Any]:
    from gradcam.phantom_dicom import phantom_dataset, write_dicom
    from gradcam.phantoms import make_phantom

    ds = phantom_dataset(make_phantom(VIEWER_SEED, 0, positive, 256), VIEWER_SEED, 0 if positive else 1)
    path = folder / f"{'positive' if positive else 'negative'}.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_dicom(ds, path)
    return path, ds


def _sr_references(item: Any) -> set[str]:
    """Every SOP Instance UID the content tree and the evidence of an SR reference."""
    out: set[str] = set()
    for child in item.get("ContentSequence", []):
        for ref in child.get("ReferencedSOPSequence", []):
            out.add(str(ref.ReferencedSOPInstanceUID))
        out |= _sr_references(child)
    for evidence in item.get("CurrentRequestedProcedureEvidenceSequence", []):
        for series in evidence.ReferencedSeriesSequence:
            out |= {str(i.ReferencedSOPInstanceUID) for i in series.ReferencedSOPSequence}
    return out


def _check_study_as_a_viewer(orthanc: LocalOrthanc, ds: Any, job: Job) -> dict[str, Any]:
    """What a viewer of the study finds; returns the study's output datasets by SOP Instance UID."""
    import highdicom as hd

    from node.outputs import read_sr_findings

    instances = orthanc.client.study_instances(ds.StudyInstanceUID)
    in_study = {i["SOPInstanceUID"] for i in instances}
    assert in_study == {ds.SOPInstanceUID} | {o.sop_instance_uid for o in job.outputs}
    objects = {
        i["SOPInstanceUID"]: pydicom.dcmread(BytesIO(orthanc.client.instance_file(i["ID"])))
        for i in instances
        if i["SOPInstanceUID"] != ds.SOPInstanceUID
    }
    (sr,) = [o for o in objects.values() if o.SOPClassUID == SR_3D_SOP_CLASS]
    # every reference of the SR resolves to an instance of this study in the PACS
    refs = _sr_references(sr)
    assert refs <= in_study, refs - in_study
    assert refs == in_study - {sr.SOPInstanceUID}
    findings = read_sr_findings(sr).by_model()
    for r in job.results:
        mine = [o for o in objects.values() if o.get("SeriesDescription") and _model_of(o) == r.model]
        if not r.positive:
            assert mine == [] and findings[r.model].region == (), r.model  # no map for a negative decision
            continue
        (seg,) = [o for o in mine if o.SOPClassUID == SEG_SOP_CLASS]
        (sc,) = [o for o in mine if o.SOPClassUID == SC_SOP_CLASS]
        assert (seg.Rows, seg.Columns) == (ds.Rows, ds.Columns)  # overlays the source pixel for pixel
        reader = hd.seg.Segmentation.from_dataset(seg)
        assert reader.get_source_image_uids()[0][2] == ds.SOPInstanceUID
        assert set(findings[r.model].references) == {seg.SOPInstanceUID, sc.SOPInstanceUID}
        assert len(findings[r.model].region) >= 4, r.model  # an outline on the source
    summaries = [o for o in objects.values() if o.SOPClassUID == SC_SOP_CLASS and _model_of(o) is None]
    assert len(summaries) == 1
    return objects


def _model_of(ds: Any) -> str | None:
    """The model a per-model output belongs to (its Processing Algorithm item), None for study-wide ones."""
    algorithms = [
        e.ManufacturerModelName
        for e in ds.get("ContributingEquipmentSequence", [])
        if e.PurposeOfReferenceCodeSequence[0].CodeValue == "1630"
    ]
    return algorithms[0] if len(algorithms) == 1 and ds.SOPClassUID != SR_3D_SOP_CLASS else None


def test_a_viewer_finds_the_results_of_a_positive_and_a_negative_study(
    orthanc_factory: OrthancFactory, tmp_path: Path
) -> None:
    require_orthanc()
    orthanc_port = free_port()
    node = _demo_node(tmp_path / "node", orthanc_port)
    try:
        orthanc = orthanc_factory(node_port=node.port, dicom_port=orthanc_port)
        inputs = {positive: _viewer_phantom(tmp_path / "in", positive) for positive in (True, False)}
        storescu([p for p, _ in inputs.values()], orthanc.dicom_port, orthanc.aet)
        sessions = node.sessions()
        jobs = wait_for("both studies' results in Orthanc", lambda: _all_sent(sessions, 2), 300)
        by_source = {j.instance.sop_instance_uid: j for j in jobs}
        for positive, (_, ds) in inputs.items():
            job = by_source[ds.SOPInstanceUID]
            # the demo checkpoints agree with the phantom's truth on these two (else the test proves less)
            assert job.consensus is positive and all(r.positive is positive for r in job.results), job.results
            _check_study_as_a_viewer(orthanc, ds, job)
            expected = 2 + (2 * len(job.results) if positive else 0)
            assert len(job.outputs) == expected  # positive: summary, 3 SC, 3 maps, SR; negative: summary, SR
    finally:
        node.stop()


def test_a_changed_configuration_replaces_the_results_in_orthanc(
    orthanc_factory: OrthancFactory, tmp_path: Path
) -> None:
    """Changed input_size: the image sent again gets new results under new UIDs, and the new SR lists the
    old one as its predecessor; Orthanc (OverwriteInstances false) then holds both versions."""
    require_orthanc()
    orthanc_port = free_port()
    orthanc = None
    path, ds = _viewer_phantom(tmp_path / "in", True)
    first = _demo_node(tmp_path / "node", orthanc_port)
    try:
        orthanc = orthanc_factory(node_port=first.port, dicom_port=orthanc_port)
        storescu([path], orthanc.dicom_port, orthanc.aet)
        (old,) = wait_for("the first results", lambda: _all_sent(first.sessions(), 1), 300)
    finally:
        first.stop()
    # the same node (same database and spool), ResNet18 at another input size, on Orthanc's node port
    again = _demo_node(
        tmp_path / "node", orthanc_port, node={"port": first.port}, models={"ResNet18": {"input_size": 256}}
    )
    try:
        # the PACS sends the image again (a resend by the site, as after a change of configuration)
        storescu([path], again.port, again.ae_title, "ORTHANC")
        jobs = wait_for("the new results", lambda: _all_sent(again.sessions(), 2), 300)
        new = max(jobs, key=lambda j: j.id)
        assert new.instance.sop_instance_uid == ds.SOPInstanceUID and new.id != old.id
        old_uids = {o.sop_instance_uid for o in old.outputs}
        new_uids = {o.sop_instance_uid for o in new.outputs}
        assert not old_uids & new_uids  # every output has a new UID: nothing stale under an old one
        old_sr = next(o for o in old.outputs if o.kind == "sr")
        new_sr = next(o for o in new.outputs if o.kind == "sr")
        assert new_sr.supersedes == old_sr.sop_instance_uid
        in_study = {i["SOPInstanceUID"] for i in orthanc.client.study_instances(ds.StudyInstanceUID)}
        assert old_uids | new_uids | {ds.SOPInstanceUID} == in_study
        sr = pydicom.dcmread(
            BytesIO(orthanc.client.instance_file(_orthanc_id(orthanc, new_sr.sop_instance_uid)))
        )
        (pred,) = sr.PredecessorDocumentsSequence
        assert pred.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == (
            old_sr.sop_instance_uid
        )
        new_resnet = next(r for r in new.results if r.model == "ResNet18")
        old_resnet = next(r for r in old.results if r.model == "ResNet18")
        assert new_resnet.probability != old_resnet.probability  # the PACS now serves the new numbers
    finally:
        again.stop()
