"""``gradcam-node``: the command line of the node and of the imaging core.

Every subcommand explains itself with ``--help``. Errors go to stderr as one readable line; ``--debug``
adds the traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from gradcam.errors import GradcamError

__all__ = ["main", "build_parser"]

DESCRIPTION = """\
DICOM node for pneumonia classification of chest X-rays (CR/DX) with three CNNs and Grad-CAM.
Receives images by C-STORE, sends back Secondary Capture heatmaps and a Structured Report.
Every output is an AI research output, NOT for diagnostic use.

configuration: --config FILE, else $GRADCAM_NODE_CONFIG, else config/node.toml"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gradcam-node", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", metavar="FILE", help="configuration file (TOML)")
    p.add_argument("--debug", action="store_true", help="verbose logging and tracebacks on errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    a = sub.add_parser(
        "analyze",
        help="analyse DICOM/PNG/JPEG files on disk",
        description="Run every enabled model (or those named with --model) with Grad-CAM on "
        "each file and write DIR/<stem>/result.json, <model>.png overlays and <model>_cam.npy "
        "maps. A bad file gets one line on stderr; the others are still done; exit code 1 if "
        "any failed.",
    )
    a.add_argument("paths", nargs="+", metavar="PATH", help="input files (DICOM, PNG, JPEG)")
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
    return p


def _dispatch(args: argparse.Namespace) -> int:
    from node.config import load_settings, resolve_config_path

    cmd = args.command
    if cmd == "phantoms":
        from gradcam.phantoms import generate_dataset

        generate_dataset(Path(args.out), args.count, args.seed, args.positive_fraction, args.format)
        print(f"phantoms written to {args.out} (labels.csv)")
        return 0
    settings = load_settings(args.config)
    if cmd == "analyze":
        from gradcam.analyze import analyze_paths

        return analyze_paths(settings.core, [Path(p) for p in args.paths], Path(args.out), args.model)
    if cmd == "train":
        from gradcam.training import train_command

        return train_command(settings.core, args)
    if cmd == "evaluate":
        from gradcam.evaluation import evaluate_command

        return evaluate_command(settings.core, args, resolve_config_path(args.config))
    if cmd == "serve":
        from node.service import serve

        return serve(settings)
    if cmd == "jobs":
        from node.report import print_jobs

        return print_jobs(settings, limit=args.limit, status=args.status, as_json=args.json)
    if cmd == "echo":
        from node.sender import echo_command

        return echo_command(settings, args.destination)
    if cmd == "demo":
        from node.demo import run_demo

        return run_demo(settings, keep_running=not args.exit)
    raise AssertionError(cmd)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.debug:
        # Our own handlers log every association, store and send once; the libraries would repeat them.
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
        logging.getLogger("highdicom").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)  # node.migrations says what it upgraded
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        return 130
    except (GradcamError, OSError, ValueError) as exc:
        if args.debug:
            raise
        print(f"gradcam-node: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
