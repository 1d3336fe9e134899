"""The node's receiving side as a real subprocess, with DCMTK (and pynetdicom for malformed input) as peers.

The node is ``gradcam-node serve`` as a subprocess on a free port with a temporary spool and SQLite database
(one shared by the tests that only look at their own instances; a fresh one where the configuration differs
or the node is stopped). The tests read that database with SQLAlchemy right after the peer returns: since the
node answers success only after the commit, the rows must already be there.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import helpers
import pydicom
import pytest
from helpers import STOP_TIMEOUT_S, RunningNode, dcmtk, run_tool, wait_until
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import generate_uid
from pynetdicom import AE, StoragePresentationContexts, _config
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import func, select

from node.db import Association, AssociationStatus, Instance, Job, JobStatus
from node.receive.scp import TRANSFER_SYNTAXES

pytestmark = pytest.mark.integration

MakeFile = Callable[..., Path]
NodeFactory = Callable[..., RunningNode]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    """One node (default test config) shared by the tests that look only at their own instances.

    Overrides the conftest's per-test ``node``: one start for the module instead of one per test.
    """
    base = tmp_path_factory.mktemp("shared-node")
    running = helpers.start_node(base / "node", helpers.checkpoints_for(base / "checkpoints", ("ResNet18",)))
    yield running
    running.stop()
    print(running.log_text())


def storescu(node: RunningNode, *files: Path, calling: str = "MODALITY", extra: tuple[str, ...] = ()):
    """DCMTK storescu to the node; returns the completed process (output in .stdout)."""
    args = [dcmtk("storescu"), "-aet", calling, "-aec", node.ae_title, *extra, "127.0.0.1", str(node.port)]
    return run_tool([*args, *files])


def _instance(node: RunningNode, sop_uid: str) -> tuple[Instance, Job] | None:
    with node.sessions()() as s:
        inst = s.scalar(select(Instance).where(Instance.sop_instance_uid == sop_uid))
        if inst is None:
            return None
        job = s.scalar(select(Job).where(Job.instance_id == inst.id))
        return inst, job


def _counts(node: RunningNode, sop_uid: str | None = None) -> tuple[int, int]:
    """Instances and jobs in the node's database (only those of ``sop_uid`` if given)."""
    qi = select(func.count()).select_from(Instance)
    qj = select(func.count()).select_from(Job).join(Instance, Job.instance_id == Instance.id)
    if sop_uid is not None:
        qi = qi.where(Instance.sop_instance_uid == sop_uid)
        qj = qj.where(Instance.sop_instance_uid == sop_uid)
    with node.sessions()() as s:
        return s.scalar(qi), s.scalar(qj)


def _associations(node: RunningNode) -> list[Association]:
    with node.sessions()() as s:
        return list(s.scalars(select(Association).order_by(Association.id)))


def test_echo(node: RunningNode) -> None:
    res = run_tool([dcmtk("echoscu"), "-aet", "PACS", "-aec", node.ae_title, "127.0.0.1", str(node.port)])
    assert res.returncode == 0, res.stdout
    rows = wait_until(
        "the echo association to be released",
        lambda: [a for a in _associations(node) if a.calling_ae == "PACS" and a.status == "released"],
        10,
    )
    assert rows[0].called_ae == node.ae_title and rows[0].peer_host == "127.0.0.1"


def test_dx_is_durable_before_success(node: RunningNode, dicom_files: MakeFile) -> None:
    ds_path = dicom_files("dx", modality="DX", seed=1)
    sent = pydicom.dcmread(ds_path)
    res = storescu(node, ds_path)
    assert res.returncode == 0, res.stdout
    # No waiting: success was only answered after the file was synced and the rows committed.
    found = _instance(node, sent.SOPInstanceUID)
    assert found is not None, node.log_text()
    inst, job = found
    assert inst.study_instance_uid == sent.StudyInstanceUID
    assert (inst.modality, inst.calling_ae, inst.times_received) == ("DX", "MODALITY", 1)
    assert inst.transfer_syntax == "1.2.840.10008.1.2.1"
    assert job.reply_ae == "MODALITY" and job.reason is None
    assert job.status in (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.DONE, JobStatus.FAILED)
    path = Path(inst.path)
    assert path == node.storage_dir / sent.StudyInstanceUID / f"{sent.SOPInstanceUID}.dcm"
    assert inst.size_bytes == path.stat().st_size
    stored = pydicom.dcmread(path)
    assert stored.file_meta.MediaStorageSOPInstanceUID == sent.SOPInstanceUID
    assert stored.PixelData == sent.PixelData
    assert inst.association_id is not None
    assoc = wait_until(
        "the association to be released",
        lambda: [a for a in _associations(node) if a.id == inst.association_id and a.status == "released"],
        10,
    )[0]
    assert (assoc.calling_ae, assoc.n_received, assoc.n_failed) == ("MODALITY", 1, 0)
    assert assoc.ended_at is not None and assoc.ended_at >= assoc.started_at
    assert f"instance {sent.SOPInstanceUID} stored" in node.log_text()


def test_same_instance_twice_is_one_job(node: RunningNode, dicom_files: MakeFile) -> None:
    ds_path = dicom_files("dx", modality="CR", seed=2)
    uid = pydicom.dcmread(ds_path).SOPInstanceUID
    assert storescu(node, ds_path).returncode == 0
    mtime = Path(_instance(node, uid)[0].path).stat().st_mtime_ns
    res = storescu(node, ds_path)
    assert res.returncode == 0, res.stdout
    inst, _ = _instance(node, uid)
    assert inst.times_received == 2
    assert _counts(node, uid) == (1, 1)
    assert Path(inst.path).stat().st_mtime_ns == mtime  # not written again
    assert "duplicate" in node.log_text()


def test_ct_and_sr_are_stored_and_skipped(node: RunningNode, dicom_files: MakeFile) -> None:
    ct = dicom_files("ct", modality="CT", seed=3)
    sr = dicom_files("sr", kind="sr")
    lateral = dicom_files("lat", modality="DX", view="LL", seed=4)
    res = storescu(node, ct, sr, lateral)
    assert res.returncode == 0, res.stdout
    expected = {
        ct: "modality CT is not CR/DX",
        sr: "SOP class Basic Text SR Storage has no pixel data",
        lateral: "view LL is not frontal (PA/AP)",
    }
    for path, reason in expected.items():
        inst, job = _instance(node, pydicom.dcmread(path).SOPInstanceUID)
        assert Path(inst.path).is_file()
        assert (job.status, job.reason) == (JobStatus.SKIPPED, reason)
        assert job.finished_at is not None
    assert "skipped: modality CT is not CR/DX" in node.log_text()


def test_configured_minimum_size_applies_at_reception(
    node_factory: NodeFactory, dicom_files: MakeFile
) -> None:
    node = node_factory(preprocess={"min_side": 100})
    small, large = dicom_files("small", size=96, seed=7), dicom_files("large", size=128, seed=8)
    assert storescu(node, small, large).returncode == 0
    _, job = _instance(node, pydicom.dcmread(small).SOPInstanceUID)
    assert job.status == JobStatus.SKIPPED and "at least 100 a side" in (job.reason or ""), job.reason
    _, job = _instance(node, pydicom.dcmread(large).SOPInstanceUID)
    assert job.status != JobStatus.SKIPPED, job.reason


def test_caller_not_allowed_is_rejected(node_factory: NodeFactory, dicom_files: MakeFile) -> None:
    node = node_factory(node={"allowed_calling_aets": ["MODALITY"]})
    ds_path = dicom_files("dx", seed=5)
    res = storescu(node, ds_path, calling="OTHER")
    assert res.returncode != 0
    assert "Calling AE Title Not Recognized" in res.stdout or "rejected" in res.stdout.lower(), res.stdout
    assert _counts(node) == (0, 0)
    rejected = [a for a in _associations(node) if a.calling_ae == "OTHER"]
    assert len(rejected) == 1 and rejected[0].status is AssociationStatus.REJECTED
    assert "Calling AE title not recognised" in (rejected[0].reason or "")
    assert storescu(node, ds_path, calling="MODALITY").returncode == 0
    assert _counts(node) == (1, 1)


def test_wrong_called_ae_title_is_rejected(node: RunningNode) -> None:
    """A peer that calls another AE title has the wrong node (or a typo): refused, logged and recorded."""
    res = run_tool([dcmtk("echoscu"), "-aec", "WRONG", "-aet", "TYPO", "127.0.0.1", str(node.port)])
    assert res.returncode != 0, res.stdout
    assert "Called AE Title Not Recognized" in res.stdout, res.stdout
    pattern = (
        r"association rejected from TYPO \(127\.0\.0\.1:\d+\): "
        rf"called AE title 'WRONG' is not this node's \({node.ae_title}\)"
    )
    wait_until("the rejection in the log", lambda: re.search(pattern, node.log_text()), 10)
    rows = wait_until(
        "the rejected association row",
        lambda: [a for a in _associations(node) if a.calling_ae == "TYPO"],
        10,
    )
    assert len(rows) == 1 and rows[0].status is AssociationStatus.REJECTED
    assert (rows[0].called_ae, rows[0].peer_host) == ("WRONG", "127.0.0.1")
    assert rows[0].reason == f"called AE title 'WRONG' is not this node's ({node.ae_title})"
    # the right called AE title still works, from the same caller
    res = run_tool([dcmtk("echoscu"), "-aec", node.ae_title, "-aet", "TYPO", "127.0.0.1", str(node.port)])
    assert res.returncode == 0, res.stdout


def test_low_disk_space_is_out_of_resources(node_factory: NodeFactory, dicom_files: MakeFile) -> None:
    node = node_factory(node={"min_free_disk_mb": 10**9})  # a petabyte: never available
    res = storescu(node, dicom_files("dx", seed=6), extra=("-d",))  # -d prints the response status
    assert res.returncode != 0
    assert re.search(r"DIMSE Status\s*:\s*0xa700", res.stdout, re.IGNORECASE), res.stdout
    assert _counts(node) == (0, 0)
    assert not any(node.storage_dir.rglob("*.dcm"))
    assert "status 0xA700" in node.log_text()


@pytest.mark.parametrize(
    ("tool", "tool_args", "propose", "ts"),
    [
        ("dcmcjpeg", (), "-xs", "1.2.840.10008.1.2.4.70"),  # JPEG lossless SV1
        ("dcmcrle", (), "-xr", "1.2.840.10008.1.2.5"),  # RLE lossless
        ("dcmcjpls", (), "-xt", "1.2.840.10008.1.2.4.80"),  # JPEG-LS lossless
    ],
)
def test_compressed_kept_byte_for_byte(
    node: RunningNode,
    dicom_files: MakeFile,
    tmp_path: Path,
    tool: str,
    tool_args: tuple,
    propose: str,
    ts: str,
) -> None:
    src = dicom_files("dx", seed=7)
    compressed = tmp_path / f"{tool}.dcm"
    conv = run_tool([dcmtk(tool), *tool_args, src, compressed])
    assert conv.returncode == 0, conv.stdout
    sent = pydicom.dcmread(compressed)
    assert sent.file_meta.TransferSyntaxUID == ts
    res = storescu(node, compressed, extra=(propose,))
    assert res.returncode == 0, res.stdout
    inst, job = _instance(node, sent.SOPInstanceUID)
    assert inst.transfer_syntax == ts
    stored = pydicom.dcmread(inst.path)
    assert stored.file_meta.TransferSyntaxUID == ts
    assert stored.PixelData == sent.PixelData  # the encapsulated fragments, untouched
    assert job.status is not JobStatus.SKIPPED


def test_deflated_transfer_syntax(node: RunningNode, dicom_files: MakeFile) -> None:
    src = dicom_files("dx", seed=8)
    res = storescu(node, src, extra=("-xd",))
    assert res.returncode == 0, res.stdout
    sent = pydicom.dcmread(src)
    inst, _ = _instance(node, sent.SOPInstanceUID)
    assert inst.transfer_syntax == "1.2.840.10008.1.2.1.99"
    stored = pydicom.dcmread(inst.path)
    assert stored.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1.99"
    assert stored.PixelData == sent.PixelData


def test_every_storage_class_and_transfer_syntax_is_accepted(node: RunningNode) -> None:
    """DX, CR, CT, MR, SC, SR... with every configured transfer syntax: nothing a PACS routes is refused."""
    ae = AE(ae_title="PACS")
    wanted = [
        "1.2.840.10008.5.1.4.1.1.88.34",
        "1.2.840.10008.5.1.4.1.1.88.22",
    ]  # Comprehensive 3D, Enhanced SR
    wanted += [cx.abstract_syntax for cx in StoragePresentationContexts]  # includes retired classes
    classes = list(dict.fromkeys(wanted))[:127]  # a requestor may propose 128 contexts, one is Verification
    for uid in classes:
        ae.add_requested_context(uid, list(TRANSFER_SYNTAXES))
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    try:
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        for required in (
            "1.2.840.10008.5.1.4.1.1.1",  # CR
            "1.2.840.10008.5.1.4.1.1.1.1",  # DX for presentation
            "1.2.840.10008.5.1.4.1.1.2",  # CT
            "1.2.840.10008.5.1.4.1.1.4",  # MR
            "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
            "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR
        ):
            assert required in accepted
        assert accepted == set(classes) | {Verification}
        assert not assoc.rejected_contexts
    finally:
        assoc.release()
    # Each transfer syntax on its own is accepted for DX.
    for ts in TRANSFER_SYNTAXES:
        ae = AE(ae_title="PACS")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1.1", ts)
        assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
        assert assoc.is_established
        assert [str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts] == [ts]
        assoc.release()


def _pynetdicom_store(node: RunningNode, dataset: Dataset | Path) -> Dataset:
    if isinstance(dataset, Dataset):
        dataset.file_meta = FileMetaDataset()
        dataset.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    ae = AE(ae_title="FUZZER")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    try:
        return assoc.send_c_store(dataset)
    finally:
        assoc.release()


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.parametrize("study_uid", ["../../evil", "1.2.abc", ""])
def test_invalid_study_uid_is_refused(node: RunningNode, study_uid: str) -> None:
    ds = helpers.image_dataset(seed=9)
    ds.StudyInstanceUID = study_uid
    status = _pynetdicom_store(node, ds)
    assert status.Status == 0xC211
    assert "Study Instance UID" in status.ErrorComment
    assert _counts(node, ds.SOPInstanceUID) == (0, 0)
    assert not list(node.storage_dir.parent.parent.rglob(f"{ds.SOPInstanceUID}*"))  # nowhere, not even ../..
    assert node.proc.poll() is None


def test_undecodable_dataset_is_refused(
    node: RunningNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Valid file meta, then a data element with an unknown VR: pydicom cannot decode it.
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    buf = DicomBytesIO()
    write_file_meta_info(buf, meta, enforce_standard=True)
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"\0" * 128 + b"DICM" + buf.getvalue() + b"\x08\x00\x16\x00XX\x04\x00abcd")
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send the bytes as they are
    status = _pynetdicom_store(node, bad)
    assert status.Status == 0xC210
    assert _counts(node, meta.MediaStorageSOPInstanceUID) == (0, 0)
    assert node.echo()  # still serving


def test_sigterm_stops_cleanly(node_factory: NodeFactory) -> None:
    node = node_factory()
    assert node.stop() == 0
    log = node.log_text()
    assert "received SIGTERM" in log
    assert re.search(r"node\.service: stopped$", log, re.MULTILINE), log


def test_jobs_command_lists_what_was_received(node: RunningNode, dicom_files: MakeFile) -> None:
    dx, ct = dicom_files("dx", seed=11), dicom_files("ct", modality="CT", seed=12)
    assert storescu(node, dx, ct).returncode == 0
    cli = [sys.executable, "-m", "node.cli", "--config", node.config_path, "jobs"]
    res = run_tool([*cli, "--json", "--limit", "100"])
    assert res.returncode == 0, res.stdout
    jobs = {j["instance"]["sop_instance_uid"]: j for j in json.loads(res.stdout)["jobs"]}
    ct_job = jobs[pydicom.dcmread(ct).SOPInstanceUID]
    assert (ct_job["status"], ct_job["reason"]) == ("skipped", "modality CT is not CR/DX")
    assert ct_job["instance"]["calling_ae"] == "MODALITY" and ct_job["instance"]["modality"] == "CT"
    assert jobs[pydicom.dcmread(dx).SOPInstanceUID]["status"] in ("queued", "running", "done", "failed")
    skipped = json.loads(run_tool([*cli, "--json", "--status", "skipped"]).stdout)["jobs"]
    assert skipped and all(j["status"] == "skipped" for j in skipped)
    table = run_tool([*cli, "--limit", "100"])
    assert table.returncode == 0 and "reason: modality CT is not CR/DX" in table.stdout
    bad = run_tool([*cli, "--status", "finished"])
    assert bad.returncode == 2
    assert "valid: queued, running, done, failed, skipped" in bad.stdout


def test_port_in_use_fails_to_start(node: RunningNode, node_factory: NodeFactory) -> None:
    other = node_factory(port=node.port, wait=False)  # the shared node holds the port
    assert other.proc.wait(STOP_TIMEOUT_S) != 0
    assert f"cannot listen on 127.0.0.1:{node.port}" in other.log_text()
    assert node.echo()  # the first node is unaffected


def test_aborted_association_is_recorded(node: RunningNode) -> None:
    ae = AE(ae_title="ABORTER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    assoc.abort()
    row = wait_until(
        "the aborted association row",
        lambda: [a for a in _associations(node) if a.calling_ae == "ABORTER" and a.status == "aborted"],
        10,
    )[0]
    assert row.ended_at is not None and row.reason
