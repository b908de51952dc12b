"""``saliency-audit gate``: a release gate for CI pipelines.

With a service, it uploads a model and its images (or reuses what the service already holds:
the files' sha256 are looked up first), submits an audit with an ``Idempotency-Key`` derived
from the files and the request (so a re-run of the same CI job attaches to the same audit) and
waits for it with a progress bar on stderr. With ``--local`` it runs the same audit in this
process instead (:func:`saliency_audit.workers.local.audit_for_gate`, the engine call
``saliency-audit run``
makes, with the spec a service would run). Either way the images are what
:func:`saliency_audit.workers.engine.image_files.list_images` finds (a folder, an archive, image
files or a
glob; what is not an image is skipped and noted), and the gate then prints how many images
and which classes were audited, the verdict table, and exits with

* ``0`` when every ``--require``-d method PASSes every requested test,
* ``1`` when a required method FAILs a test,
* ``2`` on an error (bad arguments, an HTTP problem, a failed or canceled audit, a required
  method the audit has no verdict for), on ``--timeout``, and on an INCONCLUSIVE verdict of a
  required method (``--inconclusive fail`` makes that ``1``, ``--inconclusive pass`` lets it
  pass).

A FAIL decides before an INCONCLUSIVE: one conclusive failure fails the release whatever the
other verdicts are. ``--junit FILE`` writes every (method, test) verdict as a JUnit test case
counted the way CI tools count: a required method's FAIL is a ``<failure>``, its INCONCLUSIVE
follows ``--inconclusive`` (``<error>``, ``<failure>`` or passing), and every verdict of a
method the gate does not require (the controls included) is ``<skipped>`` with its verdict and
reason, so a passing gate has zero failures and zero errors. When the gate itself errs, the
document holds one ``<error>`` test case that says why. ``--json`` prints the decision and the
verdicts as one JSON object on stdout instead of the table.

The decision (:func:`decide`) and the JUnit document (:func:`junit_document`) are pure
functions of the report's verdicts; :func:`run_gate` does the I/O, and :func:`_conclude` turns
a report into output and an exit code the same way in both modes. This module never imports
torch (the gate of a service runs on CI machines that have only the client's dependencies):
the command line hands it the local audit.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO, get_args

import requests

from saliency_audit.workers.engine.catalogue import control_names
from saliency_audit.workers.engine.image_files import ImageListing
from saliency_audit.workers.engine.result import VerdictValue
from saliency_audit.workers.reports.text import (
    ProgressClock,
    explained_classes,
    few_images_note,
    format_duration,
    format_images_audited,
    format_verdicts,
)

from . import routes
from .arguments import INCONCLUSIVE_MODES, InconclusiveMode
from .client import ApiProblem, Client, zip_folder_deterministic, zip_members_deterministic
from .states import FINAL_STATES

EXIT_PASS = 0
EXIT_FAIL = 1
EXIT_ERROR = 2
VERDICTS: tuple[str, ...] = get_args(VerdictValue)
DEFAULT_POLL_S = 2.0
MAX_POLL_S = 30.0
JUNIT_SUITE = "saliency-audit"


class GateError(Exception):
    """An error of the gate itself (exit 2), with a short code for the JUnit document."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(message)


# --- the decision ------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """What the gate concludes from the verdicts of the required methods.

    ``outcome`` is ``PASS``, ``FAIL``, ``INCONCLUSIVE`` or ``ERROR``; ``per_method`` gives each
    required method's verdict per test (``MISSING`` when the audit has none); ``summary`` is
    the one line printed after the verdict table.
    """

    exit_code: int
    outcome: str
    per_method: dict[str, dict[str, str]]
    problems: tuple[str, ...]
    summary: str


def decide(
    verdicts: Iterable[dict[str, Any]],
    required: Sequence[str],
    tests: Sequence[str],
    inconclusive: InconclusiveMode = "error",
) -> Decision:
    """The exit code for the verdicts of ``required`` methods over ``tests``.

    Rules, in order: a required (method, test) without a PASS / FAIL / INCONCLUSIVE verdict is
    an error (2); any FAIL is 1; any INCONCLUSIVE is 2 (``inconclusive="error"``), 1
    (``"fail"``) or counts as a PASS (``"pass"``); otherwise 0. With no required method or no
    test there is nothing to decide on, which is an error.
    """
    if inconclusive not in INCONCLUSIVE_MODES:
        raise ValueError(f"inconclusive must be one of {INCONCLUSIVE_MODES}")
    by_key = {(v.get("method"), v.get("test")): v for v in verdicts}
    per_method: dict[str, dict[str, str]] = {}
    missing: list[str] = []
    failed: list[str] = []
    unsure: list[str] = []
    for method in dict.fromkeys(required):
        row: dict[str, str] = {}
        for test in dict.fromkeys(tests):
            verdict = by_key.get((method, test))
            value = verdict.get("verdict") if verdict is not None else None
            if value not in VERDICTS:
                row[test] = "MISSING"
                missing.append(
                    f"{method}: no verdict for {test} (the audit did not run this method)"
                    if verdict is None
                    else f"{method}: unknown verdict {value!r} for {test}"
                )
                continue
            row[test] = str(value)
            assert verdict is not None
            reason = str(verdict.get("reason") or "")
            if value == "FAIL":
                failed.append(f"{method} FAILs {test}: {reason}")
            elif value == "INCONCLUSIVE":
                unsure.append(f"{method} is INCONCLUSIVE on {test}: {reason}")
        per_method[method] = row
    if not per_method or not tests:
        missing.append("nothing to decide on: no required method or no test with verdicts")

    if missing:
        code, outcome, problems = EXIT_ERROR, "ERROR", missing
    elif failed:
        code, outcome, problems = EXIT_FAIL, "FAIL", failed
    elif unsure and inconclusive != "pass":
        code = EXIT_ERROR if inconclusive == "error" else EXIT_FAIL
        outcome, problems = "INCONCLUSIVE", unsure
    else:
        code, outcome, problems = EXIT_PASS, "PASS", []

    parts = []
    for method, row in per_method.items():
        values = set(row.values())
        if values <= {"PASS"}:
            parts.append(f"{method} PASS")
            continue
        worst = next(v for v in ("MISSING", "FAIL", "INCONCLUSIVE") if v in values)
        bad = [t for t, v in row.items() if v == worst]
        parts.append(f"{method} {worst} ({', '.join(bad)})")
    note = ""
    if unsure and outcome in ("INCONCLUSIVE", "PASS"):
        note = f" [--inconclusive {inconclusive}]"
    summary = (
        f"gate {outcome} (exit {code}): required "
        + ("; ".join(parts) if parts else "nothing")
        + note
    )
    return Decision(code, outcome, per_method, tuple(problems), summary)


# --- JUnit XML ---------------------------------------------------------------------------


def _number(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _properties(parent: ET.Element, values: dict[str, Any]) -> None:
    properties = ET.SubElement(parent, "properties")
    for name, value in values.items():
        ET.SubElement(properties, "property", name=name, value=_number(value))


def _suite(
    root: ET.Element, cases: int, failures: int, errors: int, skipped: int, time_s: float
) -> ET.Element:
    counts = {
        "tests": str(cases),
        "failures": str(failures),
        "errors": str(errors),
        "skipped": str(skipped),
        "time": f"{time_s:.3f}",
    }
    root.attrib.update({"name": JUNIT_SUITE, **{k: v for k, v in counts.items() if k != "skipped"}})
    return ET.SubElement(root, "testsuite", {"name": JUNIT_SUITE, **counts})


_CASE_NUMBERS = ("measure", "stage", "mean", "ci_low", "ci_high", "n", "threshold", "pass_when")


def _outcome(verdict: Any, required: bool, inconclusive: InconclusiveMode) -> str:
    """How one (method, test) verdict shows in CI: ``passed``, ``failure``, ``error`` or
    ``skipped``. Only what decides the gate can turn a report red: a required method's FAIL is
    a failure and its INCONCLUSIVE follows ``--inconclusive``; every verdict of a method the
    gate does not require (the controls included) is reported as skipped, with its verdict."""
    if not required:
        return "skipped"
    if verdict == "PASS":
        return "passed"
    if verdict == "FAIL":
        return "failure"
    if verdict == "INCONCLUSIVE":
        return {"error": "error", "fail": "failure", "pass": "passed"}[inconclusive]
    return "error"


def junit_document(
    verdicts: Sequence[dict[str, Any]],
    *,
    required: Sequence[str],
    audit_id: str | None,
    model_sha256: str,
    policy_version: str,
    time_s: float,
    extra_properties: dict[str, Any] | None = None,
    inconclusive: InconclusiveMode = "error",
    tests: Sequence[str] | None = None,
) -> ET.Element:
    """A ``<testsuites>`` document with one ``<testcase classname="saliency-audit.<test>"
    name="<method>">`` per verdict, counted the way CI tools count (GitLab, GitHub test
    reporters): only what decides the gate is red, so a passing gate has zero failures and
    zero errors.

    * a required method's FAIL: ``<failure>`` (message: the verdict's reason);
    * a required method's INCONCLUSIVE: ``<error>`` (``--inconclusive error``), ``<failure>``
      (``fail``) or a passing case that says so in ``<system-out>`` (``pass``);
    * every verdict of a method the gate does not require, controls included:
      ``<skipped>`` whose message gives the verdict and its reason;
    * with ``tests``, a required (method, test) the audit has no verdict for: ``<error
      type="MISSING">``.

    Each test case's properties say whether the method is a control and whether it is
    required, and give the verdict and its deciding numbers."""
    required_set = set(required)
    rows: list[dict[str, Any]] = list(verdicts)
    if tests is not None:
        present = {(v.get("method"), v.get("test")) for v in verdicts}
        for method in dict.fromkeys(required):
            for test in dict.fromkeys(tests):
                if (method, test) not in present:
                    rows.append(
                        {
                            "method": method,
                            "test": test,
                            "verdict": "MISSING",
                            "reason": f"the audit has no {test} verdict for {method}",
                        }
                    )
    outcomes = [
        _outcome(v.get("verdict"), v.get("method") in required_set, inconclusive) for v in rows
    ]
    root = ET.Element("testsuites")
    suite = _suite(
        root,
        len(rows),
        outcomes.count("failure"),
        outcomes.count("error"),
        outcomes.count("skipped"),
        time_s,
    )
    _properties(
        suite,
        {
            **({"audit_id": audit_id} if audit_id is not None else {}),
            "model_sha256": model_sha256,
            "policy_version": policy_version,
            "required_methods": ",".join(required),
            "inconclusive": inconclusive,
            **(extra_properties or {}),
        },
    )
    for v, outcome in zip(rows, outcomes, strict=True):
        case = ET.SubElement(
            suite,
            "testcase",
            classname=f"{JUNIT_SUITE}.{v.get('test')}",
            name=str(v.get("method")),
            time="0",
        )
        verdict = str(v.get("verdict"))
        _properties(
            case,
            {
                "is_control": "true" if v.get("is_control") else "false",
                "required": "true" if v.get("method") in required_set else "false",
                "verdict": verdict,
                **{key: v.get(key) for key in _CASE_NUMBERS},
            },
        )
        reason = str(v.get("reason") or "")
        if outcome == "failure":
            element = ET.SubElement(case, "failure", message=reason, type=verdict)
            element.text = _explain(v)
        elif outcome == "error":
            element = ET.SubElement(case, "error", message=reason, type=verdict)
            element.text = _explain(v)
        elif outcome == "skipped":
            kind = "control" if v.get("is_control") else "method"
            ET.SubElement(
                case,
                "skipped",
                message=f"{verdict} ({kind} not required by the gate): {reason}",
                type=verdict,
            )
        note = (
            f"{verdict}, counted as a PASS (--inconclusive pass): "
            if verdict == "INCONCLUSIVE" and outcome == "passed"
            else f"{verdict}: "
        )
        ET.SubElement(case, "system-out").text = note + reason
    return root


def junit_error_document(
    code: str, message: str, time_s: float, properties: dict[str, Any] | None = None
) -> ET.Element:
    """The document of a gate that could not decide (exit 2): one ``<error>`` test case."""
    root = ET.Element("testsuites")
    suite = _suite(root, 1, 0, 1, 0, time_s)
    _properties(suite, properties or {})
    case = ET.SubElement(
        suite, "testcase", classname=f"{JUNIT_SUITE}.gate", name="release gate", time="0"
    )
    element = ET.SubElement(case, "error", message=message, type=code)
    element.text = message
    return root


def _explain(v: dict[str, Any]) -> str:
    lines = [f"{v.get('method')} on {v.get('test')}: {v.get('verdict')}", str(v.get("reason"))]
    if v.get("measure") is not None and v.get("threshold") is not None:
        lines.append(
            f"rule: {v.get('measure')} at {v.get('stage')}, PASS when "
            f"{v.get('pass_when')} {_number(v.get('threshold'))}"
        )
    return "\n".join(lines)


def write_junit(path: Path, root: ET.Element) -> None:
    """Write the document as UTF-8 with an XML declaration, indented."""
    ET.indent(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)


# --- progress ----------------------------------------------------------------------------


class Progress:
    """The audit's progress on a stream, with the elapsed time and an ETA: one line rewritten
    in place on a terminal, one line per change otherwise (CI logs), nothing when ``quiet``."""

    def __init__(
        self,
        stream: TextIO,
        quiet: bool = False,
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream
        self.quiet = quiet
        self.tty = stream.isatty() if tty is None else tty
        self.last: tuple[str, str, int] | None = None
        self.width = 0
        self.clock = clock
        self.timing = ProgressClock(clock())

    def predicted(self, seconds: float | None) -> None:
        """The cost model's prediction of the audit this process runs (``gate --local``)."""
        self.timing = ProgressClock(self.clock(), seconds)

    def update(self, audit: dict[str, Any]) -> None:
        if self.quiet:
            return
        fraction = float(audit.get("progress") or 0.0)
        state = str(audit.get("state"))
        step = str(audit.get("step") or "")
        key = (state, step, round(fraction * 1000))
        if key == self.last:
            return
        self.last = key
        eta_s = audit.get("eta_s")  # the service's ETA: its prediction and the rate
        timing = self.timing.text(
            fraction, self.clock(), float(eta_s) if eta_s is not None else None
        )
        if self.tty:
            filled = round(max(0.0, min(1.0, fraction)) * 30)
            line = (
                f"[{'#' * filled}{'.' * (30 - filled)}] {fraction * 100:5.1f}% {state}: {step} "
                f"({timing})"
            )
            columns = shutil.get_terminal_size((100, 20)).columns
            line = line[: max(20, columns - 1)]
            self.stream.write("\r" + line.ljust(self.width))
            self.width = len(line)
        else:
            self.stream.write(f"[{fraction * 100:5.1f}%] {state}: {step} ({timing})\n")
        self.stream.flush()

    def close(self) -> None:
        """End the rewritten line so that what follows starts on its own."""
        if self.tty and not self.quiet and self.width:
            self.stream.write("\n")
            self.stream.flush()
            self.width = 0


# --- the command -------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def idempotency_key(
    model_sha256: str,
    dataset_sha256: str,
    body: dict[str, Any],
    train_sha256: str | None = None,
) -> str:
    """``gate-`` and the sha256 of the files' sha256 and the request body: the same files and
    options give the same key (and so the same audit), any change a new one."""
    material = {
        "model_sha256": model_sha256,
        "dataset_sha256": dataset_sha256,
        "train_dataset_sha256": train_sha256,
        "request": body,
    }
    encoded = json.dumps(material, sort_keys=True, separators=(",", ":")).encode()
    return "gate-" + hashlib.sha256(encoded).hexdigest()


def image_set_archive(listing: ImageListing) -> bytes:
    """The images of a listing (:func:`saliency_audit.workers.engine.image_files.list_images`, the
    input rule
    of ``run``, both gates and the Python API) as a deterministic zip: what the gate uploads,
    and whose sha256 names the image set in the JUnit file in both modes."""
    return zip_members_deterministic((image.name, image.read) for image in listing.images)


@dataclass
class _Context:
    """What the gate learned so far (for messages and the JUnit properties of an error)."""

    started: float
    server: str = ""
    properties: dict[str, Any] = field(default_factory=dict)

    def elapsed(self) -> float:
        return time.monotonic() - self.started


@dataclass(frozen=True)
class GateInputs:
    """The gate's arguments, checked: what auditing on a service and in this process both
    start from. ``images`` is None only with ``--dataset-id``; ``server`` and ``key`` are set
    only for a service."""

    model_sha256: str
    policy: dict[str, Any] | None
    images: ImageListing | None
    server: str = ""
    key: str = field(default="", repr=False)


@dataclass(frozen=True)
class Audited:
    """A finished audit's report and where it came from: what the gate decides on.
    ``audit_id`` and ``audit_url`` are None for an audit run in this process (``--local``);
    ``skipped`` lists the files of the input that are not images."""

    report: dict[str, Any]
    model_sha256: str
    dataset_sha256: str | None
    skipped: tuple[str, ...] = ()
    audit_id: str | None = None
    audit_url: str | None = None

    @property
    def mode(self) -> str:
        return "service" if self.audit_id is not None else "local"


# How ``gate --local`` audits: (arguments, checked inputs, note, deadline on time.monotonic())
# -> the report. The command line passes :func:`saliency_audit.workers.local.audit_for_gate`; this
# module
# never imports the engine, so the gate of a service stays torch-free.
AuditHere = Callable[[argparse.Namespace, GateInputs, Callable[[str], None], float], Audited]


def run_gate(args: argparse.Namespace, audit_here: AuditHere | None = None) -> int:
    """The ``gate`` command: audit (on a service, or in this process with ``--local`` and
    ``audit_here``), print, decide; the exit code."""
    context = _Context(started=time.monotonic())
    note: Callable[[str], None] = (
        (lambda _: None) if args.quiet else (lambda text: print(text, file=sys.stderr))
    )
    try:
        return _gate(args, context, note, audit_here)
    except GateError as exc:
        return _error(args, context, exc.code, exc.message)
    except ApiProblem as exc:
        return _error(
            args,
            context,
            exc.code,
            f"the service answered HTTP {exc.status}: {exc.detail or '(no detail)'} "
            f"(code {exc.code})",
        )
    except requests.RequestException as exc:
        return _error(
            args, context, "unreachable", f"cannot talk to the service at {context.server}: {exc}"
        )


def _error(args: argparse.Namespace, context: _Context, code: str, message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    if getattr(args, "json", False):
        print(
            json.dumps(
                {
                    "outcome": "ERROR",
                    "exit_code": EXIT_ERROR,
                    "summary": f"gate ERROR (exit {EXIT_ERROR}): {code}",
                    "code": code,
                    "message": message,
                    **{k: v for k, v in context.properties.items() if k in ("audit_id", "mode")},
                },
                indent=2,
            )
        )
    else:
        print(f"gate ERROR (exit {EXIT_ERROR}): {code}")
    if args.junit is not None:
        try:
            write_junit(
                args.junit,
                junit_error_document(code, message, context.elapsed(), context.properties),
            )
        except OSError as exc:
            print(f"error: cannot write {args.junit}: {exc}", file=sys.stderr)
    return EXIT_ERROR


_SERVICE_ONLY = (
    ("--server", "server"),
    ("--api-key", "api_key"),
    ("--dataset-id", "dataset_id"),
    ("--train-dataset-id", "train_dataset_id"),
    ("--idempotency-key", "idempotency_key"),
)


def _check_arguments(
    args: argparse.Namespace, local: bool, note: Callable[[str], None]
) -> GateInputs:
    """Everything that can be refused before anything is uploaded or computed; the images
    listed by the one input rule (their skipped files noted)."""
    from saliency_audit.workers.engine.errors import ImageDecodeError
    from saliency_audit.workers.engine.image_files import list_images
    from saliency_audit.workers.engine.spec import ANALYSES

    server = key = ""
    if local:
        given = [option for option, name in _SERVICE_ONLY if getattr(args, name, None)]
        if given:
            raise GateError(
                "bad_arguments",
                f"{', '.join(given)}: not with --local (the audit runs in this process, on "
                "files; nothing is sent to a service)",
            )
    else:
        server = args.server or os.environ.get("SALIENCY_AUDIT_URL") or ""
        key = args.api_key or os.environ.get("SALIENCY_AUDIT_KEY") or ""
        if not server:
            raise GateError(
                "bad_arguments",
                "--server is required (or set SALIENCY_AUDIT_URL), or audit here with --local",
            )
        if not key:
            raise GateError("bad_arguments", "--api-key is required (or set SALIENCY_AUDIT_KEY)")
    if not args.methods:
        raise GateError("bad_arguments", "--methods must name at least one saliency method")
    if not args.require:
        raise GateError("bad_arguments", "--require must name at least one method")
    controls = control_names()
    not_audited = [m for m in args.require if m not in args.methods and m not in controls]
    if not_audited:
        raise GateError(
            "required_not_audited",
            f"required method(s) {', '.join(not_audited)} not in --methods "
            f"({', '.join(args.methods)}): the audit would not run them",
        )
    if not args.tests or "none" in args.tests:
        raise GateError("bad_arguments", "--tests must name at least one sanity test")
    if all(t in ANALYSES for t in args.tests):
        raise GateError(
            "bad_arguments",
            f"--tests {','.join(args.tests)} decides no verdict; add a sanity test "
            "(e.g. cascading)",
        )
    if not args.model.is_file():
        raise GateError("bad_arguments", f"--model {args.model}: no such file")
    if args.train is not None and not args.train.exists():
        raise GateError("bad_arguments", f"--train {args.train}: no such file or folder")
    if local and args.train is not None and not args.train.is_dir():
        raise GateError(
            "bad_arguments",
            f"--train {args.train}: with --local, a folder with one sub-folder of images per class",
        )
    policy = None
    if args.policy is not None:
        try:
            policy = json.loads(args.policy.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise GateError("bad_arguments", f"cannot read --policy {args.policy}: {exc}") from None
        if not isinstance(policy, dict):
            raise GateError("bad_arguments", f"--policy {args.policy} must hold a JSON object")
    images = None
    if args.images is not None:
        try:
            images = list_images(args.images)
        except ImageDecodeError as exc:
            raise GateError("bad_arguments", f"--images: {exc.message}") from None
        if images.note:
            note(f"images: {images.note}")
    return GateInputs(sha256_file(args.model), policy, images, server, key)


def _find_or_upload(
    client: Client,
    data: bytes | Path,
    filename: str,
    metadata: dict[str, Any] | None,
    what: str,
    note: Callable[[str], None],
) -> dict[str, Any]:
    """The service's dataset row for an archive (bytes, or a file sent as is): found by
    sha256 first, uploaded only when the service does not hold the bytes yet."""
    sha = hashlib.sha256(data).hexdigest() if isinstance(data, bytes) else sha256_file(data)
    found = client.find_dataset_by_sha256(sha)
    if found is not None:
        note(f"{what}: reusing {found['id']} (sha256 {sha[:12]}, {found['n_images']} images)")
        return found
    if isinstance(data, bytes):
        row = client.upload_dataset_bytes(data, filename, metadata)
    else:
        row = client.upload_dataset(data, metadata)
    note(f"{what}: uploaded {row['id']} (sha256 {sha[:12]}, {row['n_images']} images)")
    return row


def _dataset_by_id(
    client: Client, dataset_id: str, what: str, note: Callable[[str], None]
) -> dict[str, Any]:
    row = client.dataset(dataset_id)
    note(f"{what}: {row['id']} ({row.get('n_images')} images, given by id)")
    return row


def _train_dataset(client: Client, path: Path, note: Callable[[str], None]) -> dict[str, Any]:
    """A labeled training set: a folder (class sub-folders kept, zipped deterministically
    without what is not an image) or an archive sent as is."""
    metadata = {"purpose": "training"}
    if path.is_dir():
        data = _zip_image_set(path, "training set", note)
        return _find_or_upload(client, data, f"{path.name}.zip", metadata, "training set", note)
    return _find_or_upload(client, path, path.name, metadata, "training set", note)


def _zip_image_set(folder: Path, what: str, note: Callable[[str], None]) -> bytes:
    """A labeled folder as a deterministic zip with its class sub-folders, without the files
    that are not part of an image set (hidden files, ``__MACOSX``, ``.txt`` notes: the rule of
    :func:`saliency_audit.workers.engine.image_files.skip_reason`), noted by name."""
    from saliency_audit.workers.engine.image_files import IMAGE_SET_FILES, skip_reason, skipped_note

    skipped: list[str] = []

    def skip(parts: tuple[str, ...]) -> bool:
        reason = skip_reason(parts, keep=IMAGE_SET_FILES)
        if reason is not None:
            skipped.append(f"{'/'.join(parts)} ({reason})")
        return reason is not None

    data = zip_folder_deterministic(folder, skip)
    message = skipped_note(sorted(skipped))
    if message:
        note(f"{what}: {message}")
    return data


def _upload_name(sources: Sequence[str]) -> str:
    """``photos.zip`` for one folder ``photos/``, ``images.zip`` otherwise."""
    if len(sources) == 1 and Path(sources[0]).is_dir():
        return f"{Path(sources[0]).resolve().name}.zip"
    return "images.zip"


def _gate(
    args: argparse.Namespace,
    context: _Context,
    note: Callable[[str], None],
    audit_here: AuditHere | None,
) -> int:
    local = bool(getattr(args, "local", False))
    context.properties["mode"] = "local" if local else "service"
    inputs = _check_arguments(args, local, note)
    context.properties["model_sha256"] = inputs.model_sha256
    if not local:
        audited = _audit_on_service(args, inputs, context, note)
    elif audit_here is None:
        raise GateError(
            "bad_arguments", "--local audits with the engine: run it as `saliency-audit gate`"
        )
    else:
        audited = audit_here(args, inputs, note, context.started + args.timeout)
    return _conclude(args, audited, context, note)


def _audit_on_service(
    args: argparse.Namespace, inputs: GateInputs, context: _Context, note: Callable[[str], None]
) -> Audited:
    """Upload what the service does not hold, submit (or attach), wait; the report."""
    context.server = inputs.server
    deadline = context.started + args.timeout
    client = Client(inputs.server, inputs.key)

    model_sha = inputs.model_sha256
    model = client.find_model_by_sha256(model_sha)
    if model is not None:
        note(f"model: reusing {model['id']} (sha256 {model_sha[:12]})")
    else:
        metadata = {"architecture": args.arch} if args.arch else None
        model = client.upload_model(args.model, metadata)
        note(f"model: uploaded {model['id']} (sha256 {model_sha[:12]})")

    if inputs.images is not None:
        data = image_set_archive(inputs.images)
        dataset = _find_or_upload(client, data, _upload_name(args.images), None, "images", note)
        skipped = tuple(inputs.images.skipped)
    else:
        dataset = _dataset_by_id(client, args.dataset_id, "images", note)
        skipped = tuple(dataset.get("skipped") or ())
    train = None
    if args.train is not None:
        train = _train_dataset(client, args.train, note)
    elif args.train_dataset_id is not None:
        train = _dataset_by_id(client, args.train_dataset_id, "training set", note)

    body: dict[str, Any] = {
        "model_id": model["id"],
        "dataset_id": dataset["id"],
        "methods": list(dict.fromkeys(args.methods)),
        "tests": list(dict.fromkeys(args.tests)),
    }
    if train is not None:
        body["train_dataset_id"] = train["id"]
    if inputs.policy is not None:
        body["policy"] = inputs.policy
    if getattr(args, "stages", None) is not None:  # left out: the service's default ("rule")
        body["stages"] = args.stages
    key_used = args.idempotency_key or idempotency_key(
        model_sha, dataset["sha256"], body, train["sha256"] if train is not None else None
    )
    submitted = client.submit_audit(body, key_used)
    audit = submitted.audit
    context.properties["audit_id"] = audit["id"]
    url = f"{inputs.server.rstrip('/')}{routes.AUDIT.path(audit_id=audit['id'])}"
    note(
        f"audit: {'attached to' if submitted.replayed else 'submitted'} {audit['id']} "
        f"({audit['state']}); {url}"
    )
    estimate = audit.get("estimate") or {}
    if estimate.get("predicted_s") is not None:
        note(
            f"predicted worker time: about {format_duration(float(estimate['predicted_s']))} "
            f"({estimate.get('basis')})"
        )

    audit = _wait(client, audit, submitted.retry_after_s, deadline, args, note)
    if audit["state"] != "succeeded":
        error = audit.get("error") or {}
        detail = f": {error.get('message')} (code {error.get('code')})" if error else ""
        raise GateError(
            f"audit_{audit['state']}",
            f"audit {audit['id']} {audit['state']}{detail}; a re-run with the same options "
            "attaches to this audit again: pass a new --idempotency-key to start another",
        )
    return Audited(
        report=client.report(audit["id"]),
        model_sha256=model_sha,
        dataset_sha256=dataset["sha256"],
        skipped=skipped,
        audit_id=audit["id"],
        audit_url=url,
    )


def _conclude(
    args: argparse.Namespace, audited: Audited, context: _Context, note: Callable[[str], None]
) -> int:
    """Decide on the report's verdicts and say so: the table or JSON, the summary line, the
    JUnit file. The same for an audit on a service and one run here."""
    from saliency_audit.workers.engine.spec import ANALYSES

    report = audited.report
    verdicts = list(report.get("verdicts") or [])
    tests = [t for t in (report.get("spec") or {}).get("tests") or [] if t not in ANALYSES]
    policy_doc = report.get("policy") or {}
    images = list(report.get("images") or [])
    decision = decide(verdicts, args.require, tests, args.inconclusive)
    if args.json:
        print(
            json.dumps(
                {
                    "outcome": decision.outcome,
                    "exit_code": decision.exit_code,
                    "summary": decision.summary,
                    "mode": audited.mode,
                    "audit_id": audited.audit_id,
                    "audit_url": audited.audit_url,
                    "required": list(dict.fromkeys(args.require)),
                    "tests": tests,
                    "inconclusive": args.inconclusive,
                    "per_method": decision.per_method,
                    "problems": list(decision.problems),
                    "policy": {
                        "name": policy_doc.get("name"),
                        "version": policy_doc.get("version"),
                    },
                    "images": {
                        "count": len(images),
                        "names": [image.get("name") for image in images],
                        "explained_classes": explained_classes(images),
                        "skipped": list(audited.skipped),
                        "dataset_sha256": audited.dataset_sha256,
                    },
                    "verdicts": verdicts,
                },
                indent=2,
            )
        )
        few = few_images_note(report)
        if few:  # the table carries it otherwise
            print(few, file=sys.stderr)
    else:
        if audited.audit_id is not None:
            print(f"audit {audited.audit_id}: {audited.audit_url}")
        else:
            print("audited in this process (--local)")
        print(format_images_audited(report))
        print(format_verdicts(report))
    for problem in decision.problems:
        print(f"  {problem}", file=sys.stderr)
    if not args.json:
        print(decision.summary)
    if args.junit is not None:
        write_junit(
            args.junit,
            junit_document(
                verdicts,
                required=args.require,
                audit_id=audited.audit_id,
                model_sha256=(report.get("model") or {}).get("sha256") or audited.model_sha256,
                policy_version=str(policy_doc.get("version")),
                time_s=context.elapsed(),
                extra_properties={
                    "mode": audited.mode,
                    "policy_name": policy_doc.get("name"),
                    "dataset_sha256": audited.dataset_sha256,
                    "images": len(images),
                    "gate_outcome": decision.outcome,
                    "gate_exit_code": decision.exit_code,
                },
                inconclusive=args.inconclusive,
                tests=tests,
            ),
        )
        note(f"wrote {args.junit}")
    return decision.exit_code


def _wait(
    client: Client,
    audit: dict[str, Any],
    retry_after_s: float | None,
    deadline: float,
    args: argparse.Namespace,
    note: Callable[[str], None],
) -> dict[str, Any]:
    """Poll until the audit is final, every ``Retry-After`` seconds, never past ``deadline``.
    Connection errors and 503s while polling are waited out (a restarting service); anything
    else raises."""
    progress = Progress(sys.stderr, quiet=args.quiet)
    poll_s = retry_after_s if retry_after_s is not None else DEFAULT_POLL_S
    try:
        progress.update(audit)
        while audit["state"] not in FINAL_STATES:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise GateError(
                    "timeout",
                    f"audit {audit['id']} still {audit['state']} "
                    f"({float(audit.get('progress') or 0) * 100:.0f}%, {audit.get('step')}) "
                    f"after --timeout {args.timeout:g} s; a re-run with the same options "
                    "attaches to it",
                )
            time.sleep(min(max(poll_s, 0.1), MAX_POLL_S, remaining))
            try:
                polled, retry_after = client.audit_status(audit["id"])
            except (requests.ConnectionError, requests.Timeout) as exc:
                progress.close()
                note(f"note: polling failed ({type(exc).__name__}); trying again")
                poll_s = DEFAULT_POLL_S
                continue
            poll_s = retry_after if retry_after is not None else DEFAULT_POLL_S
            if polled is not None:
                audit = polled
                progress.update(audit)
    finally:
        progress.close()
    return audit
