"""The whole pipeline with real peers: DCMTK storescu -> node (subprocess, three small models) -> DCMTK
storescp; then bad inputs, which must be recorded with a reason while the node keeps serving.

One node and one storescp for the whole module (start-up costs seconds). Every object the node made and
the destination received is checked with dciodvfy; the SR also with dsrdump and highdicom.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import helpers
import highdicom as hd
import numpy as np
import pydicom
import pytest
from helpers import RunningNode, StoreScp, dcmtk, run_tool, wait_until
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import JPEG2000Lossless
from pynetdicom import AE
from sqlalchemy import select

from gradcam.models import file_sha256
from node.config import load_settings
from node.db import Instance, Job, JobStatus, Output, Result, Send, SendAttempt, SendStatus
from node.outputs import OutputContext, output_uid, read_sr_findings, series_uid, sr_uid

pytestmark = pytest.mark.integration

MODELS = ("ResNet18", "EfficientNet-B0", "DenseNet121")
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
CLASS_OF_KIND = {"summary": SC_CLASS, "sc": SC_CLASS, "heatmap": SEG_CLASS, "sr": SR_CLASS}
# negative_maps on: every model has a map whatever its decision, so each input gets every kind
KINDS_PER_INPUT = sorted(["summary", "sr", *["sc"] * len(MODELS), *["heatmap"] * len(MODELS)])
RESULT_TIMEOUT_S = 240  # three CPU models on a shared 2-core machine


def _storescu_profile(files: list[Path], path: Path) -> Path:
    """A storescu association profile proposing exactly each file's SOP class in its own transfer syntax.

    Plain storescu proposes uncompressed syntaxes only (and cannot transcode JPEG family data itself),
    so compressed files need their syntax proposed explicitly; a profile does that for all in one call.
    """
    pairs = sorted(
        {
            (str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
            for ds in (pydicom.dcmread(f, stop_before_pixels=True) for f in files)
        }
    )
    syntaxes = sorted({ts for _, ts in pairs})
    lines = ["[[TransferSyntaxes]]"]
    for n, ts in enumerate(syntaxes, start=1):
        lines += [f"[TS{n}]", f"TransferSyntax1 = {ts}"]
    lines += ["[[PresentationContexts]]", "[Contexts]"]
    for n, (sop, ts) in enumerate(pairs, start=1):
        lines.append(f"PresentationContext{n} = {sop}\\TS{syntaxes.index(ts) + 1}")
    lines += ["[[Profiles]]", "[Inputs]", "PresentationContexts = Contexts"]
    path.write_text("\n".join(lines) + "\n", encoding="ascii")
    return path


def storescu(
    node: RunningNode, files: list[Path], calling: str = "MODALITY"
) -> subprocess.CompletedProcess[str]:
    """DCMTK storescu, one association for all ``files``, each sent in its own transfer syntax."""
    profile = _storescu_profile(files, files[0].parent / f"storescu-{files[0].stem}.cfg")
    args = [dcmtk("storescu"), "-xf", profile, "Inputs", "-aet", calling, "-aec", node.ae_title]
    return run_tool([*args, "127.0.0.1", str(node.port), *files], timeout=120)


def dciodvfy_errors(path: Path) -> list[str]:
    res = run_tool([dcmtk("dciodvfy"), path])
    return [line for line in res.stdout.splitlines() if line.startswith("Error")]


# --- module fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pipeline")


@pytest.fixture(scope="module")
def pacs(work: Path) -> Iterator[StoreScp]:
    scp = StoreScp(work / "pacs")
    scp.start()
    yield scp
    scp.stop()
    print(f"----- storescp log -----\n{scp.log()[-3000:]}")


@pytest.fixture(scope="module")
def pnode(work: Path, pacs: StoreScp, checkpoint_root: Path) -> Iterator[RunningNode]:
    running = helpers.start_node(
        work / "node",
        helpers.checkpoints_for(checkpoint_root, MODELS),
        destinations=[{"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port}],
        default_destination="pacs",
        worker={"batch_size": 4, "retry_delay_s": 0.5},
        outbox={"backoff_initial_s": 0.5, "backoff_max_s": 2.0},
        render={"max_side": 256},
        outputs={"negative_maps": True},
    )
    yield running
    code = running.stop()
    print(f"----- node log (exit {code}) -----\n{running.log_text()[-20000:]}")


def _image(name: str, seed: int, **kw: object) -> Dataset:
    ds = helpers.image_dataset(size=96, seed=seed, **kw)
    ds.PatientID = f"PHANTOM-{name.upper()}"
    ds.PatientName = f"PHANTOM^{name.upper()}"
    return ds


def _dcmtk_compress(tool: str, src: Path, dst: Path) -> Path:
    res = run_tool([dcmtk(tool), src, dst])
    assert res.returncode == 0, res.stdout
    return dst


@pytest.fixture(scope="module")
def good_inputs(work: Path) -> dict[str, Path]:
    """Same kind of image in every transfer syntax the node must decode, plus MONOCHROME1."""
    d = work / "inputs"
    plain = helpers.write_dataset(_image("plain", 1), d / "plain.dcm")
    files = {"uncompressed": plain}
    for i, (name, tool) in enumerate(
        (("jpeg_lossless", "dcmcjpeg"), ("jpeg_ls", "dcmcjpls"), ("rle", "dcmcrle"))
    ):
        src = helpers.write_dataset(_image(name, 10 + i), d / f"{name}_src.dcm")
        files[name] = _dcmtk_compress(tool, src, d / f"{name}.dcm")
    j2k = _with_meta(_image("j2k", 20))
    j2k.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    files["jpeg2000"] = _save(j2k, d / "j2k.dcm")
    files["monochrome1"] = helpers.write_dataset(
        _image("mono1", 30, photometric="MONOCHROME1"), d / "mono1.dcm"
    )
    return files


def _save(ds: Dataset, path: Path) -> Path:
    """Write keeping the dataset's own transfer syntax (helpers.write_dataset forces explicit VR LE)."""
    ds.ensure_file_meta()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _job_of(node: RunningNode, sop_uid: str) -> Job | None:
    with node.sessions()() as s:
        inst = s.scalar(select(Instance).where(Instance.sop_instance_uid == sop_uid))
        return None if inst is None else s.scalar(select(Job).where(Job.instance_id == inst.id))


def _finished(node: RunningNode, sop_uids: list[str]) -> dict[str, Job] | None:
    jobs = {u: _job_of(node, u) for u in sop_uids}
    if all(
        j is not None and j.status in (JobStatus.DONE, JobStatus.FAILED, JobStatus.SKIPPED)
        for j in jobs.values()
    ):
        return jobs  # type: ignore[return-value]
    return None


@pytest.fixture(scope="module")
def delivered(pnode: RunningNode, pacs: StoreScp, good_inputs: dict[str, Path]) -> dict[str, list[Output]]:
    """Send every good input in one storescu call; wait until all outputs of each are at the PACS."""
    res = storescu(pnode, list(good_inputs.values()))
    assert res.returncode == 0, res.stdout
    uids = {
        name: str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
        for name, p in good_inputs.items()
    }
    jobs = wait_until("all jobs to finish", lambda: _finished(pnode, list(uids.values())), RESULT_TIMEOUT_S)
    not_done = {
        n: (jobs[u].status, jobs[u].reason) for n, u in uids.items() if jobs[u].status != JobStatus.DONE
    }
    assert not not_done, not_done
    outputs: dict[str, list[Output]] = {}
    with pnode.sessions()() as s:
        for name, uid in uids.items():
            outputs[name] = list(
                s.scalars(select(Output).where(Output.job_id == jobs[uid].id).order_by(Output.id))
            )
    expected = {o.sop_instance_uid for outs in outputs.values() for o in outs}
    wait_until("all outputs at the destination", lambda: expected <= set(pacs.received()), RESULT_TIMEOUT_S)
    return outputs


# --- good inputs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["uncompressed", "jpeg_lossless", "jpeg_ls", "rle", "jpeg2000", "monochrome1"]
)
def test_each_input_gives_every_kind_of_output(
    name: str,
    pnode: RunningNode,
    pacs: StoreScp,
    good_inputs: dict[str, Path],
    delivered: dict[str, list[Output]],
) -> None:
    source = pydicom.dcmread(good_inputs[name], stop_before_pixels=True)
    outputs = delivered[name]
    assert sorted(o.kind for o in outputs) == KINDS_PER_INPUT
    for kind in ("sc", "heatmap"):
        assert sorted(o.model for o in outputs if o.kind == kind) == sorted(MODELS)
    ctx = _context(pnode)
    received = pacs.received()
    for o in outputs:
        files = received[o.sop_instance_uid]
        assert len(files) == 1, f"{o.kind} {o.model} delivered {len(files)} times"
        ds = pydicom.dcmread(files[0])
        assert dciodvfy_errors(files[0]) == [], f"{o.kind} {o.model}: dciodvfy errors"
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert (ds.PatientID, str(ds.PatientName)) == (source.PatientID, str(source.PatientName))
        assert ds.SOPClassUID == CLASS_OF_KIND[o.kind]
        assert o.sop_instance_uid == _expected_uid(ctx, source, o)
        assert ds.SeriesInstanceUID == series_uid(source.StudyInstanceUID, o.kind, ctx.content_key)
        assert int(ds.InstanceNumber) == o.instance_number
        if o.kind in ("sc", "summary"):
            refs = [r.ReferencedSOPInstanceUID for r in ds.get("SourceImageSequence", [])]
            assert source.SOPInstanceUID in refs
            assert ds.Rows > 0 and ds.SamplesPerPixel == 3
        elif o.kind == "heatmap":
            assert (ds.Rows, ds.Columns) == (source.Rows, source.Columns)
        else:
            _check_sr(pnode, files[0], ds, source, outputs)


def _context(node: RunningNode) -> OutputContext:
    """The output configuration the node runs with, computed from its configuration file."""
    settings = load_settings(node.config_path)
    models = [(m, file_sha256(m.checkpoint)) for m in settings.core.enabled_models]
    return OutputContext.of(models, settings.core.render, settings.outputs, "2.25.1")


def _expected_uid(ctx: OutputContext, source: Dataset, o: Output) -> str:
    """The UID derived from the source and the configuration, as the node must."""
    if o.kind == "sr":
        return sr_uid(source.SOPInstanceUID, ctx.content_key, o.supersedes)
    return output_uid(source.SOPInstanceUID, o.kind, o.model, ctx.content_key)


def test_instance_numbers_are_unique_per_series(delivered: dict[str, list[Output]]) -> None:
    # every input is in its own study here except where they share one: numbers never repeat in a series
    seen: dict[str, set[int]] = {}
    for outs in delivered.values():
        for o in outs:
            assert o.instance_number is not None and o.instance_number >= 1
            assert o.instance_number not in seen.setdefault(o.series_instance_uid, set()), o
            seen[o.series_instance_uid].add(o.instance_number)


def _check_sr(node: RunningNode, path: Path, ds: Dataset, source: Dataset, outputs: list[Output]) -> None:
    dump = run_tool([dcmtk("dsrdump"), path])
    assert dump.returncode == 0, dump.stdout
    assert not [ln for ln in dump.stdout.splitlines() if ln.startswith("E:")], dump.stdout
    sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    findings = read_sr_findings(ds)
    job = _job_of(node, source.SOPInstanceUID)
    with node.sessions()() as s:
        results = s.scalars(select(Result).where(Result.job_id == job.id)).all()
    db = {r.model: (round(r.probability, 4), r.threshold, r.positive) for r in results}
    from_sr = {f.model: (round(f.probability, 4), f.threshold, f.positive) for f in findings.models}
    assert from_sr == db
    assert findings.consensus == job.consensus
    # each model's group references its map and its picture; the evidence lists every output
    for f in findings.models:
        mine = {o.sop_instance_uid for o in outputs if o.model == f.model}
        assert set(f.references) == mine, f.model
    evidence = {
        i.ReferencedSOPInstanceUID
        for e in ds.CurrentRequestedProcedureEvidenceSequence
        for s in e.ReferencedSeriesSequence
        for i in s.ReferencedSOPSequence
    }
    assert evidence == {o.sop_instance_uid for o in outputs if o.kind != "sr"} | {source.SOPInstanceUID}


def test_sends_recorded_as_sent(pnode: RunningNode, delivered: dict[str, list[Output]]) -> None:
    job_ids = {outs[0].job_id for outs in delivered.values()}
    with pnode.sessions()() as s:
        sends = s.scalars(select(Send).where(Send.job_id.in_(job_ids))).all()
        attempts = s.scalars(select(SendAttempt).where(SendAttempt.send_id.in_([x.id for x in sends]))).all()
    assert len(sends) == len(job_ids)
    assert all(x.status == SendStatus.SENT and x.destination == "pacs" for x in sends)
    assert {a.outcome for a in attempts} == {"sent"}
    assert all(a.detail.count("=0x0000") == len(KINDS_PER_INPUT) for a in attempts)


def test_no_temporary_files_left(pnode: RunningNode, delivered: dict[str, list[Output]]) -> None:
    assert not list(pnode.storage_dir.rglob("*.tmp"))
    for outs in delivered.values():
        assert all(Path(o.path).is_file() for o in outs)


# --- bad inputs -----------------------------------------------------------------------------------------


def _corrupt_jpeg(work: Path) -> Path:
    """A JPEG lossless file whose frame is garbage after its header (markers intact, entropy data not)."""
    src = helpers.write_dataset(_image("corrupt", 40), work / "bad" / "corrupt_src.dcm")
    jpeg = _dcmtk_compress("dcmcjpeg", src, work / "bad" / "corrupt_jpeg.dcm")
    ds = pydicom.dcmread(jpeg)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    garbage = bytes((i * 97 + 13) % 256 for i in range(len(frame) - 40))
    bad = frame[:20] + garbage.replace(b"\xff", b"\x00") + b"\xff\xd9"
    ds.PixelData = encapsulate([bad])
    ds.save_as(jpeg, enforce_file_format=True)
    return jpeg


def _pynetdicom_store(node: RunningNode, ds: Dataset) -> int:
    """C-STORE a dataset as it is (storescu would refuse a file with short pixel data)."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    return int(status.Status)


def _ineligible(bad: Path) -> dict[str, Path]:
    """Inputs the rules of gradcam.eligibility refuse: from the header at reception (skipped), or once
    decoded (a blank image: failed). DCMTK storescu sends them all as they are."""
    rng = np.random.default_rng(80)
    ct_as_dx = _image("ct_as_dx", 80, modality="DX", sop_class_uid=helpers.CT_SOP_CLASS)
    tiny = helpers.image_dataset(size=1, seed=81)
    bits1 = _image("bits1", 82)
    bits1.BitsAllocated = bits1.BitsStored = 1
    bits1.HighBit = 0
    bits1.PixelData = np.packbits(rng.random((96, 96)) > 0.5, bitorder="little").tobytes()  # a mask
    floats = _image("float", 83)
    del floats.PixelData, floats.BitsStored, floats.HighBit, floats.PixelRepresentation
    floats.BitsAllocated = 32
    floats.FloatPixelData = rng.random((96, 96)).astype(np.float32).tobytes()
    no_series = _image("no_series", 84)
    del no_series.SeriesInstanceUID
    slope0 = _image("slope0", 85)
    slope0.RescaleSlope, slope0.RescaleIntercept, slope0.RescaleType = 0, 100, "US"
    constant = _image("constant", 86)
    constant.PixelData = np.full((96, 96), 1000, np.uint16).tobytes()
    made = {
        "ct_as_dx": ct_as_dx,
        "tiny": tiny,
        "bits1": bits1,
        "float": floats,
        "no_series": no_series,
        "slope0": slope0,
        "constant": constant,
    }
    return {name: helpers.write_dataset(ds, bad / f"{name}.dcm") for name, ds in made.items()}


def _with_meta(ds: Dataset) -> Dataset:
    ds.ensure_file_meta()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    return ds


@pytest.fixture(scope="module")
def bad_results(pnode: RunningNode, work: Path, delivered: dict[str, list[Output]]) -> dict[str, Job]:
    """Send every bad input; returns name -> its finished job."""
    bad = work / "bad"
    ct = helpers.write_dataset(_image("ct", 50, modality="CT"), bad / "ct.dcm")
    sr = helpers.write_dataset(helpers.sr_dataset(), bad / "sr.dcm")
    corrupt = _corrupt_jpeg(work)
    own_sc = Path(next(o.path for o in delivered["uncompressed"] if o.kind == "sc"))
    own_seg = Path(next(o.path for o in delivered["uncompressed"] if o.kind == "heatmap"))
    res = storescu(pnode, [ct, sr, corrupt, own_sc, own_seg])
    assert res.returncode == 0, res.stdout
    ineligible = _ineligible(bad)
    res = storescu(pnode, list(ineligible.values()))
    assert res.returncode == 0, res.stdout

    truncated = _with_meta(_image("truncated", 60))
    truncated.PixelData = truncated.PixelData[: len(truncated.PixelData) // 3]
    huge = _with_meta(_image("huge", 61))
    huge.Rows = huge.Columns = 60000
    assert _pynetdicom_store(pnode, truncated) == 0x0000
    assert _pynetdicom_store(pnode, huge) == 0x0000

    uids = {
        "ct": pydicom.dcmread(ct).SOPInstanceUID,
        "sr": pydicom.dcmread(sr).SOPInstanceUID,
        "corrupt": pydicom.dcmread(corrupt, stop_before_pixels=True).SOPInstanceUID,
        "own_sc": pydicom.dcmread(own_sc, stop_before_pixels=True).SOPInstanceUID,
        "own_seg": pydicom.dcmread(own_seg, stop_before_pixels=True).SOPInstanceUID,
        "truncated": truncated.SOPInstanceUID,
        "huge": huge.SOPInstanceUID,
        **{n: pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for n, p in ineligible.items()},
    }
    jobs = wait_until(
        "bad inputs to be settled", lambda: _finished(pnode, list(uids.values())), RESULT_TIMEOUT_S
    )
    return {name: jobs[uid] for name, uid in uids.items()}


@pytest.mark.parametrize(
    ("name", "status", "words"),
    [
        ("ct", JobStatus.SKIPPED, "modality ct"),
        ("sr", JobStatus.SKIPPED, "no pixel data"),
        ("own_sc", JobStatus.SKIPPED, "own output"),
        ("own_seg", JobStatus.SKIPPED, "own output"),
        ("corrupt", JobStatus.FAILED, "pixel data cannot be decoded"),
        ("truncated", JobStatus.FAILED, "less than expected"),
        ("huge", JobStatus.FAILED, "60000x60000"),
        # the rules of gradcam.eligibility: from the header at reception...
        (
            "ct_as_dx",
            JobStatus.SKIPPED,
            "ct image storage (1.2.840.10008.5.1.4.1.1.2) is not a cr or dx image",
        ),
        ("tiny", JobStatus.SKIPPED, "image of 1 x 1 pixels is too small to be a radiograph"),
        ("bits1", JobStatus.SKIPPED, "bits allocated 1 (a binary image, not a radiograph) is not analysed"),
        ("float", JobStatus.SKIPPED, "float pixel data (7fe0,0008) is not analysed"),
        ("no_series", JobStatus.SKIPPED, "missing series instance uid (0020,000e)"),
        # ... and once decoded: nothing to see
        (
            "slope0",
            JobStatus.FAILED,
            "blank image: every pixel has the same value after the display pipeline (rescale slope 0?)",
        ),
        (
            "constant",
            JobStatus.FAILED,
            "blank image: every pixel has the same value after the display pipeline;",
        ),
    ],
)
def test_bad_input_is_recorded_with_reason(
    name: str, status: JobStatus, words: str, pnode: RunningNode, bad_results: dict[str, Job]
) -> None:
    job = bad_results[name]
    assert job.status == status, (job.status, job.reason)
    assert words in (job.reason or "").lower(), job.reason
    with pnode.sessions()() as s:
        inst = s.get(Instance, job.instance_id)
        assert s.scalars(select(Output).where(Output.job_id == job.id)).all() == []
    assert Path(inst.path).is_file(), "the received file must stay in the spool"


def test_node_still_serves_after_bad_inputs(
    pnode: RunningNode, pacs: StoreScp, work: Path, bad_results: dict[str, Job]
) -> None:
    assert pnode.proc.poll() is None
    echo = run_tool(
        [dcmtk("echoscu"), "-aet", "MODALITY", "-aec", pnode.ae_title, "127.0.0.1", str(pnode.port)]
    )
    assert echo.returncode == 0, echo.stdout
    after = helpers.write_dataset(_image("after", 70), work / "after.dcm")
    assert storescu(pnode, [after]).returncode == 0
    uid = pydicom.dcmread(after, stop_before_pixels=True).SOPInstanceUID
    jobs = wait_until("the good image after the bad ones", lambda: _finished(pnode, [uid]), RESULT_TIMEOUT_S)
    assert jobs[uid].status == JobStatus.DONE, jobs[uid].reason
    with pnode.sessions()() as s:
        outs = {o.sop_instance_uid for o in s.scalars(select(Output).where(Output.job_id == jobs[uid].id))}
    assert len(outs) == len(KINDS_PER_INPUT)
    wait_until("its outputs at the destination", lambda: outs <= set(pacs.received()), RESULT_TIMEOUT_S)


def test_jobs_json_lists_every_output(pnode: RunningNode, delivered: dict[str, list[Output]]) -> None:
    import json
    import sys

    res = run_tool(
        [sys.executable, "-m", "node.cli", "--config", pnode.config_path, "jobs", "--json", "--limit", "100"]
    )
    assert res.returncode == 0, res.stdout
    listed = {o["sop_instance_uid"]: o for job in json.loads(res.stdout)["jobs"] for o in job["outputs"]}
    for outs in delivered.values():
        for o in outs:
            got = listed[o.sop_instance_uid]
            assert (got["kind"], got["model"], got["path"]) == (o.kind, o.model, o.path)
            assert got["series_instance_uid"] == o.series_instance_uid
            assert got["instance_number"] == o.instance_number
    table = run_tool(
        [sys.executable, "-m", "node.cli", "--config", pnode.config_path, "jobs", "--limit", "100"]
    )
    assert all(o.path in table.stdout for outs in delivered.values() for o in outs)
    # and the node's worker process: alive, where its models run, what it did
    workers = json.loads(res.stdout)["workers"]
    alive = [w for w in workers if w["state"] == "alive"]
    assert len(alive) == 1 and alive[0]["device"] == "cpu", workers
    models = {o.model for outs in delivered.values() for o in outs if o.model}
    assert models and models <= set(alive[0]["models"].split(", ")), alive[0]["models"]
    line = table.stdout.splitlines()[-1]
    assert line.startswith("workers: ") and f"{alive[0]['worker']} cpu alive, seen " in line, line
