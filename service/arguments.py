"""Argument types and option sets of the ``saliency-audit`` command line.

Shared by :mod:`saliency_audit.service.cli` (which builds the parser for every command) and
:mod:`saliency_audit.service.gate` (which reads the ``gate`` options), so the parser can be built
without
importing what a command needs to run: ``saliency-audit serve`` never loads the HTTP client.
Standard library only.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Literal

InconclusiveMode = Literal["error", "fail", "pass"]
INCONCLUSIVE_MODES: tuple[InconclusiveMode, ...] = ("error", "fail", "pass")
# the spec's stage modes (contract/stage_plan.py STAGE_MODES; written here to keep this module
# standard library only, tests/engine/test_stage_plan.py compares the two)
STAGE_CHOICES = ("rule", "all")


def csv_list(value: str) -> list[str]:
    """``a, b,,c`` -> ``["a", "b", "c"]``."""
    return [v.strip() for v in value.split(",") if v.strip()]


REPORT_FORMATS = ("pdf", "html")


def report_formats(value: str) -> list[str]:
    """``pdf,html`` -> ``["pdf", "html"]``; an unknown format is an argument error."""
    formats = list(dict.fromkeys(v.lower() for v in csv_list(value)))
    unknown = [f for f in formats if f not in REPORT_FORMATS]
    if unknown or not formats:
        raise argparse.ArgumentTypeError(
            f"formats are {', '.join(REPORT_FORMATS)} (comma-separated), not {value!r}"
        )
    return formats


def positive_seconds(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError("must be a positive number of seconds")
    return number


IMAGES_HELP = (
    "the images: a folder (the images directly in it), a zip or tar archive, image files or a "
    "quoted glob ('photos/*.png'); files that are not images (hidden files, __MACOSX, .txt "
    "notes, sub-folders) are skipped and listed in one note"
)


def add_images_argument(parser: argparse._ActionsContainer, required: bool = False) -> None:
    """``--images PATH [PATH ...]``: one input rule for ``run`` and ``gate``
    (:func:`saliency_audit.workers.engine.image_files.list_images`)."""
    parser.add_argument("--images", metavar="PATH", nargs="+", required=required, help=IMAGES_HELP)


def add_gate_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``gate`` sub-command's options."""
    parser.add_argument(
        "--local",
        action="store_true",
        help="run the audit in this process with the engine (the `saliency-audit run` audit; "
        "needs the worker extra, no service and no key); the same decision, exit codes, "
        "table, --json and --junit as with a service",
    )
    parser.add_argument(
        "--server",
        metavar="URL",
        default=None,
        help="base URL of the service (default: $SALIENCY_AUDIT_URL; refused with --local)",
    )
    parser.add_argument(
        "--api-key",
        metavar="KEY",
        default=None,
        help="API key sak_... (default: $SALIENCY_AUDIT_KEY, which keeps it out of the process "
        "list and the CI log; refused with --local)",
    )
    parser.add_argument(
        "--model",
        metavar="FILE",
        required=True,
        type=Path,
        help="ONNX file, or weights with --arch",
    )
    parser.add_argument(
        "--arch",
        metavar="NAME",
        default=None,
        help="architecture of a weights file: a torchvision name (e.g. resnet18) or "
        "timm:NAME (e.g. timm:convnext_atto; timm installed in the workers)",
    )
    images = parser.add_mutually_exclusive_group(required=True)
    add_images_argument(images)
    images.add_argument(
        "--dataset-id", metavar="ID", help="a dataset the service already holds (not --local)"
    )
    train = parser.add_mutually_exclusive_group()
    train.add_argument(
        "--train",
        metavar="PATH",
        type=Path,
        help="labeled training set for data_randomization: a folder with one sub-folder per "
        "class, or (not --local) such an archive",
    )
    train.add_argument(
        "--train-dataset-id",
        metavar="ID",
        help="a labeled dataset the service already holds (not --local)",
    )
    parser.add_argument(
        "--methods",
        metavar="A,B",
        required=True,
        type=csv_list,
        help="comma-separated saliency methods to audit",
    )
    parser.add_argument(
        "--tests",
        metavar="A,B",
        type=csv_list,
        default=["cascading"],
        help="comma-separated tests (default: cascading; 'all' for every sanity check)",
    )
    parser.add_argument(
        "--require",
        metavar="A,B",
        required=True,
        type=csv_list,
        help="comma-separated methods that must PASS every test for the gate to pass (each "
        "must be in --methods, or be a control)",
    )
    parser.add_argument(
        "--policy",
        metavar="FILE",
        type=Path,
        default=None,
        help='verdict policy JSON file (a file with "extends": "default" overrides entries)',
    )
    parser.add_argument(
        "--junit", metavar="FILE", type=Path, default=None, help="write a JUnit XML report here"
    )
    parser.add_argument(
        "--timeout",
        metavar="S",
        type=positive_seconds,
        default=3600.0,
        help="seconds the whole gate may take (default 3600); past it: exit 2. With a service "
        "the audit goes on there and a re-run attaches to it; with --local the audit stops",
    )
    parser.add_argument(
        "--inconclusive",
        choices=INCONCLUSIVE_MODES,
        default="error",
        help="what an INCONCLUSIVE verdict of a required method does: error (exit 2, the "
        "default), fail (exit 1) or pass",
    )
    parser.add_argument(
        "--idempotency-key",
        metavar="K",
        default=None,
        help="default: derived from the model's and the images' sha256 and the request, so "
        "the same job attaches to the same audit; pass a new one to force a new audit (not "
        "--local)",
    )
    add_stages_argument(parser, None)
    parser.add_argument("--quiet", action="store_true", help="no progress bar or notes on stderr")
    add_json_argument(
        parser,
        "the decision, the required methods' verdicts per test and every "
        "verdict as one JSON object on stdout, instead of the table",
    )
    return parser


def add_stages_argument(parser: argparse.ArgumentParser, default: str | None) -> None:
    """The ``--stages`` option of ``run`` and ``gate``: which stages of the model randomization
    tests get maps (the spec's ``stages``)."""
    parser.add_argument(
        "--stages",
        choices=STAGE_CHOICES,
        default=default,
        help="which stages of the model randomization tests get maps: 'rule' (default: the "
        "stages the policy's rule reads, at most 8 over an area's span, and the last) or 'all' "
        "(every stage: the full per-unit curve)",
    )


def add_json_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """The ``--json`` option every command with a result to print has."""
    parser.add_argument("--json", action="store_true", help=f"machine-readable output: {what}")
