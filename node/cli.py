"""``gradcam-node``: the command line of the node and of the imaging core.

Every subcommand explains itself with ``--help``. ``--config`` and ``--debug`` go before or after the
subcommand. Errors go to stderr as one readable line, ``gradcam-node: error: ...``; ``--debug`` adds the
traceback. Exit codes: 0 done, 1 failed (a failed start, echo or analysis; the line says why), 2 usage error
(as argparse), 130 interrupted, 141 (128 + SIGPIPE, as ``cat`` under ``set -o pipefail``) when the reader of
the output went away (``gradcam-node jobs | head``): quietly, without a message.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gradcam.errors import GradcamError
from node.ops.logs import setup_logging

__all__ = ["main", "build_parser"]

_EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a tool killed by a closed pipe

DESCRIPTION = """\
DICOM node for pneumonia classification of chest X-rays (CR/DX) with three CNNs and Grad-CAM.
Receives images by C-STORE, sends back Secondary Capture heatmaps and a Structured Report.
Every output is an AI research output, NOT for diagnostic use.

configuration: --config FILE, else $GRADCAM_NODE_CONFIG, else config/node.toml"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gradcam-node", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _add_common(p)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    a = sub.add_parser(
        "analyze",
        help="analyse DICOM/PNG/JPEG files or folders on disk",
        description="Run every enabled model (or those named with --model) with Grad-CAM on "
        "each file (and the images under each folder, recursively) and write DIR/<stem>/result.json, "
        "<model>.png overlays and <model>_cam.npy maps. Only what the node would analyse: a file "
        "that is no frontal chest CR/DX radiograph (or, for PNG/JPEG, is smaller than [preprocess] "
        "min_side) gets one SKIP line with the reason. A file that cannot be loaded (or is blank) "
        "gets one line on stderr; the others are still done; exit code 1 if any could not be loaded.",
    )
    a.add_argument(
        "paths", nargs="+", metavar="PATH", help="input files (DICOM, PNG, JPEG) or folders of them"
    )
    a.add_argument(
        "--force",
        action="store_true",
        help="analyse files the rules would skip (other SOP classes, modalities, views, small images)",
    )
    a.add_argument("--out", required=True, metavar="DIR", help="output folder")
    a.add_argument(
        "--model", action="append", metavar="NAME", help="model to run (repeatable; default: all enabled)"
    )

    ph = sub.add_parser(
        "phantoms",
        help="generate synthetic chest radiograph phantoms",
        description="Deterministic synthetic chest X-ray phantoms with labelled consolidations "
        "(labels.csv, masks). Synthetic data only: never patient data.",
    )
    ph.add_argument("--out", required=True, metavar="DIR", help="output folder (images/, masks/, labels.csv)")
    ph.add_argument("--count", type=int, required=True, metavar="N", help="number of images")
    ph.add_argument("--seed", type=int, required=True, metavar="S", help="same seed, same images")
    ph.add_argument(
        "--positive-fraction", type=float, default=0.5, metavar="F", help="share of images with lesions"
    )
    ph.add_argument(
        "--format", choices=("png", "dicom", "both"), default="png", help="16-bit PNG, DX/CR DICOM, or both"
    )

    t = sub.add_parser(
        "train",
        help="train one model of the registry",
        description="Train a configured model (single logit, BCE with logits) on a phantom folder "
        "(labels.csv) or an ImageFolder-style data set (train/NORMAL, train/PNEUMONIA, val/...). "
        "Keeps the best epoch by validation AUC and saves fp16 weights with metadata.",
    )
    t.add_argument("--data", required=True, metavar="DIR")
    t.add_argument("--model", required=True, metavar="NAME")
    t.add_argument("--epochs", type=int, required=True, metavar="E")
    t.add_argument("--out", required=True, metavar="FILE")
    t.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument(
        "--cam-guidance",
        type=float,
        default=0.0,
        metavar="W",
        help="weight of a loss that keeps the Grad-CAM of positives inside their lesion boxes "
        "(phantom folders only; 0 = off)",
    )
    t.add_argument("--input-size", type=int, metavar="PX", help="override the model's configured input size")
    t.add_argument(
        "--val-fraction", type=float, default=0.2, help="phantom folders: share held out for validation"
    )
    t.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="random affine, exposure and noise jitter of training images (default: on)",
    )
    t.add_argument(
        "--init",
        metavar="FILE",
        help="start from this checkpoint of the same architecture (fine-tuning) instead of random weights",
    )

    e = sub.add_parser(
        "evaluate",
        help="AUC, sensitivity/specificity, ROC thresholds, pointing game",
        description="Evaluate models on a labelled folder: AUC, sensitivity and specificity at the "
        "configured threshold, the ROC-optimal threshold (Youden's J, or the highest threshold "
        "reaching --min-sensitivity) and, for positives with lesion boxes, the pointing game. "
        "Writes an ROC curve PNG per model.",
    )
    e.add_argument("--data", required=True, metavar="DIR")
    e.add_argument("--model", action="append", metavar="NAME")
    e.add_argument("--json", action="store_true", help="print JSON")
    e.add_argument(
        "--write-thresholds",
        action="store_true",
        help="write the ROC-optimal thresholds into the configuration file used",
    )
    e.add_argument("--min-sensitivity", type=float, metavar="S")
    e.add_argument("--out", metavar="DIR", help="folder for ROC PNGs (default: DATA/evaluation)")

    sub.add_parser(
        "serve",
        help="run the DICOM node (C-ECHO, C-STORE in; SC and SR out)",
        description="Start the DICOM node on the configured AE title and port. Stops cleanly on "
        "SIGTERM or SIGINT.",
    )

    w = sub.add_parser(
        "work",
        help="run one analysis worker (jobs from the database, results into the spool)",
        description="Run one analysis worker until SIGTERM or SIGINT: it claims queued jobs from the "
        "node's database, runs the models on [worker] device and records the results and their sends. Run "
        "as many as the machines allow, beside `serve` or on other machines that share its database "
        "(PostgreSQL) and spool folder; see README, 'Scaling out'.",
    )
    w.add_argument(
        "--device", metavar="D", type=_device, help="override [worker] device: auto, cpu, cuda or cuda:N"
    )
    w.add_argument("--slot", type=int, default=0, help=argparse.SUPPRESS)  # serve's local worker number
    w.add_argument("--wake-fd", type=int, default=None, help=argparse.SUPPRESS)  # see node.work.process
    w.add_argument("--notify-fd", type=int, default=None, help=argparse.SUPPRESS)

    j = sub.add_parser(
        "jobs",
        help="list received instances, jobs, results and sends",
        description="Recent jobs from the node's database, newest first: the instance, the calling AE, "
        "the job state and reason, each model's probability and decision, the consensus and the send.",
    )
    j.add_argument("--limit", type=int, default=20, metavar="N", help="at most N jobs (default 20)")
    j.add_argument(
        "--status", metavar="S", help="only jobs in this state (queued, running, done, failed, skipped)"
    )
    j.add_argument("--json", action="store_true", help="print JSON instead of a table")

    ec = sub.add_parser(
        "echo",
        help="C-ECHO a configured destination",
        description="Open an association to a [[destinations]] entry with the node's AE title and send a "
        "C-ECHO: checks the network path, the AE titles and the peer's configuration. Exit code 0 if it "
        "answered with success.",
    )
    ec.add_argument("destination", metavar="DEST", help="destination name from [[destinations]]")

    d = sub.add_parser(
        "demo",
        help="start Orthanc and the node locally, send phantom studies, show the results",
        description="Start Debian's Orthanc and the node on this machine, send a few synthetic phantom "
        "studies to Orthanc, which routes them to the node, wait for the heatmaps and reports to "
        "arrive back in Orthanc, and print where to look. Ctrl-C stops both.",
    )
    d.add_argument("--exit", action="store_true", help="stop Orthanc and the node after the summary")
    _add_operator_commands(sub)
    for command in sub.choices.values():
        # also after the subcommand (`gradcam-node serve --config FILE`); SUPPRESS: not given there, the
        # value given before the subcommand stays
        _add_common(command, on_subcommand=True)
    return p


def _add_common(parser: argparse.ArgumentParser, on_subcommand: bool = False) -> None:
    """``--config`` and ``--debug``, on the main parser and again on every subcommand."""
    config_default, debug_default = (argparse.SUPPRESS,) * 2 if on_subcommand else (None, False)
    parser.add_argument("--config", metavar="FILE", default=config_default, help="configuration file (TOML)")
    parser.add_argument(
        "--debug", action="store_true", default=debug_default, help="verbose logging and tracebacks on errors"
    )


def _device(text: str) -> str:
    from node.config import device_name

    try:
        return device_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _job_id(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a job id (a number, from `gradcam-node jobs`), got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a job id (1 or more), got {text!r}")
    return value


def _since(text: str) -> Any:
    from node.ops.commands import parse_since

    try:
        return parse_since(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _days(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of days above 0, got {text!r}")
    return value


def _add_operator_commands(sub: Any) -> None:
    """``resend``, ``reprocess`` and ``purge`` (:mod:`node.ops`): each recorded in the database's
    ``operations`` table and the log, with the OS user that ran it."""
    r = sub.add_parser(
        "resend",
        help="send the outputs of jobs again (JOB... or --failed)",
        description="Queue new sends of existing outputs: each job's send to its reply destination (as "
        "configured now) goes back to pending with its attempts from 0, or is made if the job has none; "
        "with --failed, every failed send is reset instead. The running node sends them within seconds. "
        "A job without outputs, or whose files were purged, is refused. One line per job; exit code 1 if "
        "any was refused.",
    )
    r.add_argument("jobs", nargs="*", type=_job_id, metavar="JOB", help="job ids (gradcam-node jobs)")
    r.add_argument("--failed", action="store_true", help="every job with a failed send")
    r.set_defaults(usage_error=r.error)

    rp = sub.add_parser(
        "reprocess",
        help="analyse the instances of jobs again (JOB... or --since DATE)",
        description="Queue a new analysis of each job's instance with the configuration the node runs "
        "now; where the results change they get new UIDs and the new SR supersedes the old one. Refused: "
        "an instance with a job already queued or running, one that was not analysable, one whose spool "
        "file was purged. One line per instance; exit code 1 if any was refused.",
    )
    rp.add_argument("jobs", nargs="*", type=_job_id, metavar="JOB", help="job ids (gradcam-node jobs)")
    rp.add_argument(
        "--since",
        type=_since,
        metavar="DATE",
        help="every analysable instance received since DATE (ISO: 2024-06-01 or 2024-06-01T08:30; UTC "
        "unless it names its zone)",
    )
    rp.set_defaults(usage_error=rp.error)

    pg = sub.add_parser(
        "purge",
        help="delete spool files of finished jobs and sent outputs older than N days",
        description="Delete received instances whose jobs are all finished, and outputs whose sends are "
        "all finished, older than DAYS (without --older-than: [retention] received_days and "
        "outputs_days). Never a file whose job is queued or running or whose send is pending. The "
        "database rows stay, marked purged.",
    )
    pg.add_argument("--older-than", type=_days, metavar="DAYS", help="age in days (fractions allowed)")
    pg.add_argument("--dry-run", action="store_true", help="only list what would be deleted")


def _operator_arguments(args: argparse.Namespace) -> str:
    """What an operator command was asked, as recorded with it; exits with a usage error if it is neither
    job ids nor the other selection."""
    other = {"resend": "failed", "reprocess": "since"}.get(args.command)
    if other is not None and bool(args.jobs) == bool(getattr(args, other)):
        flag = "--" + other
        args.usage_error(f"give job ids or {flag}, not both" if args.jobs else f"give job ids or {flag}")
    if args.command == "resend":
        return "--failed" if args.failed else " ".join(map(str, args.jobs))
    if args.command == "reprocess":
        return f"--since {args.since.isoformat()}" if args.since else " ".join(map(str, args.jobs))
    words = [f"--older-than {args.older_than:g}"] if args.older_than is not None else []
    return " ".join(words + (["--dry-run"] if args.dry_run else []))


def _dispatch(args: argparse.Namespace) -> int:
    from node.config import load_settings, resolve_config_path

    cmd = args.command
    if cmd == "phantoms":
        from gradcam.phantoms import generate_dataset

        generate_dataset(Path(args.out), args.count, args.seed, args.positive_fraction, args.format)
        print(f"phantoms written to {args.out} (labels.csv)")
        return 0
    settings = load_settings(args.config)
    # serve, and a worker of its own (not one that serve started), own the log file and rotate it
    owner = cmd == "serve" or (cmd == "work" and args.wake_fd is None)
    setup_logging(settings.logging, debug=args.debug, serving=owner, config_file=str(settings.path))
    if cmd == "analyze":
        from gradcam.analyze import analyze_paths

        paths = [Path(p) for p in args.paths]
        return analyze_paths(settings.core, paths, Path(args.out), args.model, force=args.force)
    if cmd == "train":
        from gradcam.training import train_command

        return train_command(settings.core, args)
    if cmd == "evaluate":
        from gradcam.evaluation import evaluate_command

        return evaluate_command(settings.core, args, resolve_config_path(args.config))
    if cmd == "serve":
        from node.service import serve

        return serve(settings)
    if cmd == "work":
        from node.work.process import run_worker

        return run_worker(settings, args.wake_fd, args.notify_fd, args.device, args.slot)
    if cmd == "jobs":
        from node.ops.report import print_jobs

        return print_jobs(settings, limit=args.limit, status=args.status, as_json=args.json)
    if cmd == "echo":
        from node.send.echo import echo_command

        return echo_command(settings, args.destination)
    if cmd == "demo":
        from node.ops.demo import run_demo

        return run_demo(settings, keep_running=not args.exit)
    if cmd in ("resend", "reprocess", "purge"):
        return _operate(settings, args)
    raise AssertionError(cmd)


def _operate(settings: Any, args: argparse.Namespace) -> int:
    from node.ops import commands

    arguments = _operator_arguments(args)
    if args.command == "resend":
        return commands.resend_command(settings, None if args.failed else args.jobs, arguments)
    if args.command == "reprocess":
        return commands.reprocess_command(settings, args.jobs or None, args.since, arguments)
    return commands.purge_command(settings, args.older_than, args.dry_run, arguments)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(debug=args.debug)  # stderr until the configuration says otherwise (_dispatch)
    try:
        code = _dispatch(args)
        sys.stdout.flush()  # here, so that a closed pipe is noticed below and not at interpreter exit
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader went away (`gradcam-node jobs | head`); Python's recipe: point stdout at /dev/null so
        # that the final flush at exit does not fail again, and stop without a message
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return _EXIT_BROKEN_PIPE
    except (GradcamError, OSError, ValueError) as exc:
        if args.debug:
            raise
        print(f"gradcam-node: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
