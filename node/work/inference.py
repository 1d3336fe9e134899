"""The models of a worker in a process of their own, on ``[worker] device``.

The worker's own work (decoding, outputs, database) is Python and holds the GIL most of the time. A PyTorch
forward pass in the same process waits for the GIL between operators, and was measured ten times slower
while a Python thread was busy. So the models run in a child process with ``[worker] inference_threads``
intra-op threads (:meth:`node.config.WorkerConfig.threads`: by default the cores but one, shared among the
worker processes), and the worker overlaps writing one batch's outputs with the next batch's inference.

Protocol over one pipe: the parent sends ``(request_id, {model: input batch as a numpy array})``; the child
answers ``(request_id, [per image: {model: RawOutput} | ChildError])``. A batch that fails as a whole is run
again one image at a time in the child, so one bad image never fails the others. The child ignores SIGINT
and SIGTERM (the node stops it after its last batch) and exits when the pipe closes, so it never outlives the
node. If it dies, the batch in flight fails with a transient error and the next batch starts a new child.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import pickle
import signal
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from gradcam.analysis import LoadedModelInfo, RawOutput
from gradcam.config import CoreConfig
from gradcam.errors import GradcamError, InputError

__all__ = [
    "ChildError",
    "DeviceError",
    "InferenceProcess",
    "ModelError",
    "ModelStartError",
    "ModelsChangedError",
    "resolve_device",
]

log = logging.getLogger(__name__)

_START_TIMEOUT_S = 600.0  # importing torch and loading three checkpoints; generous for slow disks
_POLL_S = 0.5


@dataclass(frozen=True)
class ChildError:
    """Why the models failed on one image: ``kind`` is ``input``, ``transient`` or ``unexpected``."""

    kind: str
    type_name: str
    message: str

    def exception(self) -> BaseException:
        """The error as the worker classifies it (InputError permanent, RuntimeError transient)."""
        text = f"{self.type_name}: {self.message}" if self.message else self.type_name
        if self.kind == "input":
            return InputError("image", self.message or self.type_name)
        if self.kind == "transient":
            return RuntimeError(text)
        return ModelError(f"unexpected error in the models: {text}")


class ModelError(Exception):
    """The models failed on an image for a reason that another try will not change."""


class DeviceError(GradcamError):
    """``[worker] device`` names a device this machine does not have."""


class ModelStartError(RuntimeError):
    """The model process did not start for a reason other than a model's own error (those, e.g.
    :class:`~gradcam.errors.CheckpointMissingError`, are raised as they are)."""


class ModelsChangedError(RuntimeError):
    """A restarted model process loaded other weights than the worker started with (a checkpoint file was
    replaced meanwhile). The worker's outputs name the first ones (UIDs, versions, thresholds), so it must
    not use these: it stops, and a new worker starts with the new checkpoints. A RuntimeError: the batch's
    jobs are tried again."""


def _portable(exc: BaseException) -> BaseException | str:
    """The child's start-up error as the parent can raise it: the model's own error when it is one of
    ours and crosses the pipe intact (its one-line message says what to do), else its text."""
    if isinstance(exc, GradcamError):
        try:
            if str(pickle.loads(pickle.dumps(exc))) == str(exc):
                return exc
        except Exception:  # noqa: BLE001 - an exception class that does not pickle: send its text
            pass
    return f"{type(exc).__name__}: {exc}"


def _classify(exc: BaseException) -> ChildError:
    if isinstance(exc, InputError):
        kind = "input"
    elif isinstance(exc, RuntimeError | MemoryError | OSError):
        kind = "transient"  # torch out of memory, a resource exhausted for now
    else:
        kind = "unexpected"
    return ChildError(kind, type(exc).__name__, str(exc).strip())


def resolve_device(device: str, slot: int = 0) -> str:
    """``[worker] device`` as torch names it: ``auto`` is a CUDA GPU when one is usable (local worker
    ``slot`` takes GPU ``slot`` modulo their number, so that the workers of one machine spread over its
    GPUs), else ``cpu``. Raises :class:`DeviceError` for a CUDA device this machine does not have."""
    import torch

    if device == "auto":
        if not torch.cuda.is_available():
            return "cpu"
        return f"cuda:{slot % torch.cuda.device_count()}"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(
                f'[worker] device = "{device}", but torch sees no CUDA GPU here: set device = "auto" or "cpu"'
            )
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise DeviceError(
                f'[worker] device = "{device}", but this machine has {torch.cuda.device_count()} CUDA '
                "GPU(s): use cuda:0 to cuda:N-1"
            )
    return device


def _child_main(  # pragma: no cover - child
    conn: Connection, core: CoreConfig, threads: int, device: str, slot: int
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    import torch

    from gradcam.analysis import Analyzer

    torch.set_num_threads(threads)
    try:
        where = resolve_device(device, slot)
        analyzer = Analyzer(core, device=where)
        analyzer.warm_up()
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which refuses to start
        conn.send(("error", _portable(exc)))
        return
    conn.send(("ready", (analyzer.infos, where)))
    log_child = logging.getLogger("node.work.inference.child")
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return  # the node is gone
        if msg is None:
            return
        request_id, inputs = msg
        conn.send((request_id, _run_batch(analyzer, inputs, log_child)))


def _run_batch(analyzer: Any, inputs: dict[str, np.ndarray], log_child: logging.Logger) -> list[Any]:
    import torch

    n = len(next(iter(inputs.values())))
    try:
        with torch.inference_mode():
            raw = analyzer.run({k: torch.from_numpy(v) for k, v in inputs.items()})
        return [{name: outs[i] for name, outs in raw.items()} for i in range(n)]
    except Exception as exc:  # noqa: BLE001 - classified per image below
        if n == 1:
            log_child.warning("model error: %s", exc, exc_info=True)
            return [_classify(exc)]
    # find the culprit: one image at a time, so the others still get their results
    one_by_one = ({k: v[i : i + 1] for k, v in inputs.items()} for i in range(n))
    return [_run_batch(analyzer, one, log_child)[0] for one in one_by_one]


class InferenceProcess:
    """The parent's handle on the model process: start, run a batch, stop. One caller thread at a time."""

    def __init__(self, core: CoreConfig, threads: int, device: str = "auto", slot: int = 0) -> None:
        self.core = core
        self.slot = slot
        self.threads = max(1, threads)  # torch's intra-op threads ([worker] inference_threads, resolved)
        self.device = device  # as configured until the child says which it took
        self.models: list[LoadedModelInfo] = []
        self._ctx = mp.get_context("spawn")  # never fork a process that has threads and torch state
        self._proc: Any = None
        self._conn: Connection | None = None
        self._next_id = 0

    # --- life cycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the child and wait until its models are loaded.

        Raises the model's own error (:class:`~gradcam.errors.GradcamError`: a checkpoint missing, of
        another architecture, not a checkpoint...) if one cannot be loaded, :class:`ModelStartError` if
        the process fails otherwise.
        """
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(
            target=_child_main,
            args=(child, self.core, self.threads, self.device, self.slot),
            name="gradcam-models",
            daemon=True,
        )
        proc.start()
        child.close()
        try:
            if not parent.poll(_START_TIMEOUT_S):
                raise ModelStartError(f"model process not ready after {_START_TIMEOUT_S:.0f} s")
            status, detail = parent.recv()
        except (EOFError, OSError) as exc:
            proc.join(5)
            raise ModelStartError(
                f"model process exited during start-up (exit code {proc.exitcode})"
            ) from exc
        except BaseException:
            proc.kill()
            raise
        if status != "ready":
            proc.join(5)
            if isinstance(detail, GradcamError):
                raise detail
            raise ModelStartError(f"cannot load the models: {detail}")
        infos, self.device = detail
        changed = self._changed(infos)
        if changed:
            _end(proc, parent)
            raise ModelsChangedError(
                f"{changed} changed on disk since this worker started: it stops rather than analyse with "
                "weights its outputs do not name; a new worker (serve starts one) uses the new checkpoint"
            )
        self._proc, self._conn, self.models = proc, parent, list(infos)
        log.info("model process %d ready on %s (%d torch threads)", proc.pid, self.device, self.threads)

    def _changed(self, infos: list[LoadedModelInfo]) -> str:
        """The models whose checkpoint differs from the one first loaded, as words ("" when none: a first
        start, or a restart with the same files)."""
        before = {m.cfg.name: m.sha256 for m in self.models}
        return ", ".join(
            f"the checkpoint of {m.cfg.name} ({m.cfg.checkpoint}: sha256 {before[m.cfg.name][:12]} -> "
            f"{m.sha256[:12]})"
            for m in infos
            if m.cfg.name in before and before[m.cfg.name] != m.sha256
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the child to exit (after the batch it is running) and wait; kill it if it does not."""
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        if proc is None or conn is None:
            return
        _end(proc, conn, timeout)

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    # --- work -------------------------------------------------------------------------------------------

    def submit(self, inputs: dict[str, np.ndarray]) -> int:
        """Send one batch; returns the id to :meth:`collect` it by. A dead child is replaced first."""
        if not self.alive:
            self.stop(0)
            self.start()
        assert self._conn is not None
        self._next_id += 1
        self._conn.send((self._next_id, inputs))
        return self._next_id

    def collect(self, request_id: int) -> list[dict[str, RawOutput] | ChildError]:
        """Wait for the answer to ``request_id``. Raises RuntimeError if the child dies meanwhile."""
        conn, proc = self._conn, self._proc
        if conn is None or proc is None:
            raise RuntimeError("model process is not running")
        while True:
            try:
                if conn.poll(_POLL_S):
                    got_id, answer = conn.recv()
                    if got_id == request_id:
                        return answer
                    log.warning("discarding a stale answer from the model process (%s)", got_id)
                    continue
            except (EOFError, OSError) as exc:
                self._died()
                raise RuntimeError(f"model process died (exit code {proc.exitcode})") from exc
            if not proc.is_alive():
                self._died()
                raise RuntimeError(f"model process died (exit code {proc.exitcode})")

    def _died(self) -> None:
        proc = self._proc
        if proc is not None:
            proc.join(1)
            log.error(
                "model process %d exited with code %s; a new one starts with the next batch",
                proc.pid,
                proc.exitcode,
            )
        if self._conn is not None:
            self._conn.close()
        self._proc = self._conn = None


def _end(proc: Any, conn: Connection, timeout: float = 10.0) -> None:
    """Ask a model process to exit (after the batch it is running) and wait; kill it if it does not."""
    try:
        conn.send(None)
    except OSError:
        pass
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join(5)
    conn.close()
