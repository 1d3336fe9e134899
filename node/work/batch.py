"""One batch of jobs through the models: read and decode each image, make its model inputs, hand the
batch to the model process and map the answers back to each image.

A failure stays with its item (:attr:`Item.error`); :mod:`node.work.finish` classifies it. One bad image
never fails the rest of its batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from sqlalchemy.exc import OperationalError

from gradcam.analysis import assemble, model_inputs
from gradcam.config import PreprocessConfig
from gradcam.preprocess import SourceImage, load_dataset_image
from gradcam.results import AnalysisResult
from node.work.claim import ClaimedJob
from node.work.inference import ChildError, InferenceProcess
from node.work.results import PermanentError

__all__ = ["TRANSIENT_ERRORS", "Item", "Batch", "prepare", "submit", "collect", "describe"]

# Worth another try later: disk full or I/O trouble, database locked, torch out of memory (a RuntimeError).
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (OSError, OperationalError, RuntimeError)


@dataclass
class Item:
    """One job moving through a batch."""

    job: ClaimedJob
    t0: float
    image: SourceImage | None = None
    source: pydicom.Dataset | None = None
    inputs: dict[str, np.ndarray] | None = None
    analysis: AnalysisResult | None = None
    error: BaseException | None = None


@dataclass
class Batch:
    """Jobs analysed together; ``sent`` are those handed to the model process as ``request_id``."""

    items: list[Item]
    sent: list[Item] = field(default_factory=list)
    request_id: int | None = None


def describe(exc: BaseException) -> str:
    """An exception's message, or its type's name when it has none."""
    text = str(exc).strip()
    return text if text else type(exc).__name__


def _load(item: Item, pre: PreprocessConfig) -> None:
    try:
        ds = pydicom.dcmread(item.job.path)
        item.image = load_dataset_image(ds, pre.max_pixels, str(item.job.path), min_side=pre.min_side)
        item.source = ds
    except InvalidDicomError as exc:
        item.error = PermanentError(f"spool file is not readable DICOM: {describe(exc)}")
    except Exception as exc:  # noqa: BLE001 - classified and stored with the job by node.work.finish
        item.error = exc


def prepare(claimed: list[ClaimedJob], models: InferenceProcess, pre: PreprocessConfig) -> Batch:
    """Read and decode each image and make its model inputs."""
    items = [Item(job, time.perf_counter()) for job in claimed]
    cfgs = [m.cfg for m in models.models]
    for item in items:
        _load(item, pre)
        if item.error is None:
            try:
                assert item.image is not None
                item.inputs = {k: v.numpy() for k, v in model_inputs([item.image], cfgs).items()}
            except Exception as exc:  # noqa: BLE001 - classified and stored with the job by node.work.finish
                item.error = exc
    return Batch(items)


def _fail_all(items: list[Item], exc: Exception) -> None:
    """The model process failed for all of ``items``: a transient error each (their jobs are retried)."""
    for i in items:
        i.error = exc if isinstance(exc, TRANSIENT_ERRORS) else RuntimeError(describe(exc))


def submit(batch: Batch, models: InferenceProcess) -> None:
    """Hand the batch's good items to the model process (it starts at once; this returns)."""
    batch.sent = [i for i in batch.items if i.error is None and i.inputs is not None]
    if not batch.sent:
        return
    names = list(batch.sent[0].inputs or {})
    try:
        stacked = {n: np.concatenate([i.inputs[n] for i in batch.sent if i.inputs]) for n in names}
        batch.request_id = models.submit(stacked)
    except Exception as exc:  # noqa: BLE001 - the model process could not be (re)started
        _fail_all(batch.sent, exc)
        batch.sent = []
    for i in batch.items:
        i.inputs = None


def collect(batch: Batch, models: InferenceProcess) -> None:
    """Wait for the model process's answer and map each image's CAMs to the source."""
    if batch.request_id is None or not batch.sent:
        return
    try:
        answers = models.collect(batch.request_id)
    except Exception as exc:  # noqa: BLE001 - the child died: transient, the jobs are retried
        _fail_all(batch.sent, exc)
        return
    for item, answer in zip(batch.sent, answers, strict=True):
        if isinstance(answer, ChildError):
            item.error = answer.exception()
            continue
        try:
            assert item.image is not None
            raw = {name: [out] for name, out in answer.items()}
            (item.analysis,) = assemble([item.image], models.models, raw)
        except Exception as exc:  # noqa: BLE001 - classified and stored with the job by node.work.finish
            item.error = exc
