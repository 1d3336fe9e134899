"""What identifies the node's outputs (``node.outputs.identity``, ``node.outputs.uids``): content-addressed
SOP Instance and Series UIDs, the algorithm of each output as Contributing Equipment, Instance Numbers."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import UID

from gradcam.config import RenderConfig, Window
from gradcam.preprocess import load_dataset_image
from node.config import OutputsConfig
from node.outputs import MANUFACTURER, OutputContext, build_outputs, plan_outputs
from tests.node.test_outputs import (
    DEVICE_UID,
    MODELS,
    build_all,
    by_kind,
    make_analysis,
    make_context,
    make_source,
    model_configs,
)

IHE_PROCESSING_ALGORITHM = ("1630", "99IHE")

# Each one changes what an output holds: every output UID and every series UID must change with it.
CONTENT_CHANGES: dict[str, Callable[[], OutputContext]] = {
    "checkpoint sha256": lambda: make_context(sha="dd" * 32),
    "threshold": lambda: make_context(threshold=0.3),
    "input size": lambda: make_context(input_size=256),
    "window": lambda: make_context(window=Window(40.0, 400.0)),
    "target layer": lambda: make_context(target_layer="layer3"),
    "builder": lambda: make_context(builder="resnet34"),
    "render opacity": lambda: make_context(render=RenderConfig(opacity=0.6)),
    "render colormap": lambda: make_context(render=RenderConfig(colormap="inferno")),
    "render max side": lambda: make_context(render=RenderConfig(max_side=512)),
    "negative maps": lambda: make_context(outputs=OutputsConfig(negative_maps=True)),
    "kinds": lambda: make_context(outputs=OutputsConfig(kinds=("summary", "sc", "sr"))),
    "sc series description": lambda: make_context(outputs=OutputsConfig(sc_series_description="AI maps")),
    "sr series description": lambda: make_context(outputs=OutputsConfig(sr_series_description="AI SR")),
    "software version": lambda: dataclasses.replace(make_context(), software_version="99.0.0"),
}


def uids(ctx: OutputContext, index: int = 0) -> dict[tuple[str, str | None], tuple[str, str]]:
    """``{(kind, model): (series UID, SOP Instance UID)}`` of the outputs of a positive phantom."""
    plan = plan_outputs(make_source(index=index), make_analysis(), ctx)
    return {(p.kind, p.model): (p.series_uid, p.sop_uid) for p in plan}


def purpose(item: Dataset) -> tuple[str, str]:
    code = item.PurposeOfReferenceCodeSequence[0]
    return str(code.CodeValue), str(code.CodingSchemeDesignator)


def algorithms_of(ds: Dataset) -> list[tuple[str, str]]:
    """(model, version) of each Processing Algorithm item in the Contributing Equipment Sequence."""
    return [
        (str(e.ManufacturerModelName), str(e.SoftwareVersions))
        for e in ds.ContributingEquipmentSequence
        if purpose(e) == IHE_PROCESSING_ALGORITHM
    ]


def node_equipment(ds: Dataset) -> list[Dataset]:
    """The node's own Processing Equipment (DCM 109102) items in the Contributing Equipment Sequence."""
    return [
        e
        for e in ds.ContributingEquipmentSequence
        if e.Manufacturer == MANUFACTURER and purpose(e) == ("109102", "DCM")
    ]


def test_a_fresh_node_gives_the_same_uids() -> None:
    source, analysis = make_source(), make_analysis()
    first, again = make_context(), make_context()  # built separately from equal configuration
    assert first is not again and first.content_key == again.content_key
    built = [
        [
            (b.kind, b.model, b.dataset.SeriesInstanceUID, b.dataset.SOPInstanceUID)
            for b in build_all(source, analysis, c)
        ]
        for c in (first, again)
    ]
    assert built[0] == built[1]
    assert [(k, m, s, i) for (k, m), (s, i) in uids(first).items()] == built[0]  # as planned


def test_model_order_does_not_matter() -> None:
    shuffled = OutputContext.of(list(reversed(model_configs())), RenderConfig(), OutputsConfig(), DEVICE_UID)
    assert shuffled.content_key == make_context().content_key


@pytest.mark.parametrize("change", list(CONTENT_CHANGES))
def test_a_content_change_gives_new_uids(change: str) -> None:
    before, after = uids(make_context()), uids(CONTENT_CHANGES[change]())
    common = before.keys() & after.keys()
    assert {("summary", None), ("sr", None)} <= common
    for key in common:
        (series_before, sop_before), (series_after, sop_after) = before[key], after[key]
        assert sop_before != sop_after, (change, key)
        assert series_before != series_after, (change, key)


def test_content_changes_are_all_different() -> None:
    keys = [make_context().content_key, *(f().content_key for f in CONTENT_CHANGES.values())]
    assert len(set(keys)) == len(keys)


def test_the_device_uid_is_identity_not_content() -> None:
    ctx = make_context()
    moved = dataclasses.replace(ctx, device_uid="2.25.987654321")
    assert moved.content_key == ctx.content_key and uids(moved) == uids(ctx)
    source = make_source()
    built = by_kind(build_all(source, ctx=moved))
    assert [ds.SOPInstanceUID for ds in built.values()] == [sop for _, sop in uids(ctx).values()]
    for ds in built.values():
        assert ds.DeviceSerialNumber == "2.25.987654321"
    observer = [
        i for i in built["sr", None].ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "121012"
    ]
    assert [i.UID for i in observer] == ["2.25.987654321"]  # Device Observer UID


def test_uids_are_valid_and_distinct() -> None:
    contexts = [make_context(), make_context(outputs=OutputsConfig(negative_maps=True))]
    all_uids = [u for ctx in contexts for index in (0, 1) for pair in uids(ctx, index).values() for u in pair]
    for uid in all_uids:
        assert UID(uid).is_valid and len(uid) <= 64 and uid.startswith("2.25."), uid
    sops = [sop for ctx in contexts for index in (0, 1) for _, sop in uids(ctx, index).values()]
    assert len(set(sops)) == len(sops)


def test_series_per_study_kind_and_configuration() -> None:
    ctx = make_context()
    first = make_source(index=0)
    second = make_source(index=2)  # another image ...
    second.StudyInstanceUID = first.StudyInstanceUID  # ... of the same study
    plans = [plan_outputs(s, make_analysis(), ctx) for s in (first, second)]
    series = [{p.kind: p.series_uid for p in plan} for plan in plans]
    assert series[0] == series[1]
    assert series[0]["summary"] == series[0]["sc"]  # the pictures share a series
    assert len({series[0]["sc"], series[0]["heatmap"], series[0]["sr"], first.SeriesInstanceUID}) == 4
    other_study = plan_outputs(make_source(index=1), make_analysis(), ctx)
    assert not {p.series_uid for p in other_study} & set(series[0].values())


def test_model_version_is_the_short_checkpoint_sha() -> None:
    ctx = make_context()
    for name, (_, _, _, _, sha, _) in MODELS.items():
        version = ctx.model(name).version
        assert re.fullmatch(r"sha256:[0-9a-f]{12}", version) and version == f"sha256:{sha[:12]}"


def test_every_output_names_the_models_that_made_it() -> None:
    ctx = make_context()
    everyone = sorted((m, ctx.model(m).version) for m in MODELS)
    for (kind, model), ds in by_kind(build_all(make_source(), ctx=ctx)).items():
        expected = everyone if model is None else [(model, ctx.model(model).version)]
        assert sorted(algorithms_of(ds)) == expected, kind
        assert [e.DeviceSerialNumber for e in node_equipment(ds)] == [DEVICE_UID], kind


def test_pictures_have_no_burned_in_patient_data() -> None:
    built = build_all(make_source())
    pictures = [b.dataset for b in built if b.kind in ("summary", "sc")]
    assert len(pictures) == 3 and all(ds.BurnedInAnnotation == "NO" for ds in pictures)


def test_instance_numbers_are_the_numbers_given() -> None:
    source, analysis, ctx = make_source(), make_analysis(), make_context()
    plan = plan_outputs(source, analysis, ctx)
    numbers = {p.sop_uid: 100 - 7 * i for i, p in enumerate(plan)}
    image = load_dataset_image(source, 10**8, "test")
    built = build_outputs(source, image, analysis, ctx, numbers)
    assert {b.dataset.SOPInstanceUID: b.dataset.InstanceNumber for b in built} == numbers
