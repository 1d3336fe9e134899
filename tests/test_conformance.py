"""docs/conformance.md says what the code does: its tables marked *(checked)* equal the code's lists."""

from __future__ import annotations

import re
from pathlib import Path

import pynetdicom
from pydicom.uid import UID

from gradcam.eligibility import ANALYSED_SOP_CLASSES
from node.receive import scp
from node.send.association import OUTPUT_SOP_CLASSES

DOC = Path(__file__).resolve().parents[1] / "docs" / "conformance.md"
_UID = re.compile(r"\b1\.2\.840\.10008(?:\.\d+)+\b")


def _section(title: str) -> str:
    """The text from the heading containing ``title`` to the next heading of any level."""
    text = DOC.read_text(encoding="utf-8")
    start = next(m for m in re.finditer(r"^#+ .*$", text, re.M) if title in m.group(0))
    nxt = re.compile(r"^#+ ", re.M).search(text, start.end())
    return text[start.end() : nxt.start() if nxt else len(text)]


def _table_column(section: str, column: int) -> list[str]:
    rows = [ln for ln in section.splitlines() if ln.startswith("|") and not ln.startswith("|---")]
    return [ln.strip("|").split("|")[column].strip() for ln in rows[1:]]


def test_accepted_transfer_syntaxes_are_the_scps() -> None:
    section = _section("4.2.1.1")
    documented = _table_column(section, 1)
    assert documented == [str(ts) for ts in scp.TRANSFER_SYNTAXES]
    assert _table_column(section, 0) == [UID(ts).name for ts in scp.TRANSFER_SYNTAXES]


def test_accepted_storage_classes_count_is_the_scps() -> None:
    assert f"{len(scp.STORAGE_SOP_CLASSES)} in pynetdicom 3.0" in _section("4.2.1.1")
    assert pynetdicom.__version__.startswith("3.0")


def test_c_store_statuses_are_the_scps() -> None:
    codes = [int(c, 16) for c in _table_column(_section("4.2.1.2"), 0)]
    assert codes == [
        scp.SUCCESS,
        scp.OUT_OF_RESOURCES,
        scp.CANNOT_DECODE,
        scp.INVALID_UID,
        scp.PROCESSING_FAILURE,
    ]


def test_analysed_classes_are_the_eligibility_rules() -> None:
    assert set(_table_column(_section("4.2.1.3.1"), 1)) == set(ANALYSED_SOP_CLASSES)


def test_proposed_classes_are_the_senders_and_the_created_ones() -> None:
    proposed = _table_column(_section("4.2.2"), 1)
    assert set(proposed) == set(OUTPUT_SOP_CLASSES)
    created = set(_table_column(_section("8. Objects created"), 2))
    assert created == set(OUTPUT_SOP_CLASSES)


def test_implementation_identity_is_pynetdicoms() -> None:
    section = _section("4.1")
    assert pynetdicom.PYNETDICOM_IMPLEMENTATION_UID in section
    assert pynetdicom.PYNETDICOM_IMPLEMENTATION_VERSION in section


def test_every_uid_in_the_document_is_a_valid_one() -> None:
    for uid in _UID.findall(DOC.read_text(encoding="utf-8")):
        assert UID(uid).is_valid, uid
