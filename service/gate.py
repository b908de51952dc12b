"""``saliency-audit gate``: a release gate for CI pipelines.

It uploads a model and its images to a running service (or reuses what the service already
holds: the files' sha256 are looked up first), submits an audit with an ``Idempotency-Key``
derived from the files and the request (so a re-run of the same CI job attaches to the same
audit), waits for it with a progress bar on stderr, prints the verdict table, and exits with

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
functions of the report's verdicts; :func:`run_gate` does the I/O. This module never imports
torch (the gate runs on CI machines that have only the client's dependencies).
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
from saliency_audit.workers.engine.result import VerdictValue
from saliency_audit.workers.reports.text import ProgressClock, format_verdicts

from . import routes
from .arguments import INCONCLUSIVE_MODES, InconclusiveMode
from .client import ApiProblem, Client, zip_folder_deterministic
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
    audit_id: str,
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
            "audit_id": audit_id,
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
        timing = self.timing.text(fraction, self.clock())
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


@dataclass
class _Context:
    """What the gate learned so far (for messages and the JUnit properties of an error)."""

    started: float
    server: str = ""
    properties: dict[str, Any] = field(default_factory=dict)

    def elapsed(self) -> float:
        return time.monotonic() - self.started


def run_gate(args: argparse.Namespace) -> int:
    """The ``gate`` command: upload or reuse, submit, wait, print, decide; the exit code."""
    context = _Context(started=time.monotonic())
    note: Callable[[str], None] = (
        (lambda _: None) if args.quiet else (lambda text: print(text, file=sys.stderr))
    )
    try:
        return _gate(args, context, note)
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
                    **{k: v for k, v in context.properties.items() if k == "audit_id"},
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


def _check_arguments(args: argparse.Namespace) -> tuple[str, str, dict[str, Any] | None]:
    from saliency_audit.workers.engine.spec import ANALYSES

    server = args.server or os.environ.get("SALIENCY_AUDIT_URL")
    key = args.api_key or os.environ.get("SALIENCY_AUDIT_KEY")
    if not server:
        raise GateError("bad_arguments", "--server is required (or set SALIENCY_AUDIT_URL)")
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
    for option, path in (("--images", args.images), ("--train", args.train)):
        if path is not None and not path.exists():
            raise GateError("bad_arguments", f"{option} {path}: no such file or folder")
    policy = None
    if args.policy is not None:
        try:
            policy = json.loads(args.policy.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise GateError("bad_arguments", f"cannot read --policy {args.policy}: {exc}") from None
        if not isinstance(policy, dict):
            raise GateError("bad_arguments", f"--policy {args.policy} must hold a JSON object")
    return server, key, policy


def _dataset(
    client: Client,
    path: Path | None,
    dataset_id: str | None,
    metadata: dict[str, Any] | None,
    what: str,
    note: Callable[[str], None],
) -> dict[str, Any]:
    """The service's dataset row for a folder, an archive or an id: found by sha256 first,
    uploaded only when the service does not hold the bytes yet."""
    if dataset_id is not None:
        row = client.dataset(dataset_id)
        note(f"{what}: {row['id']} ({row.get('n_images')} images, given by id)")
        return row
    assert path is not None
    data: bytes | None = None
    if path.is_dir():
        data = _zip_image_set(path, what, note)
        sha = hashlib.sha256(data).hexdigest()
    else:
        sha = sha256_file(path)
    row_found = client.find_dataset_by_sha256(sha)
    if row_found is not None:
        note(
            f"{what}: reusing {row_found['id']} (sha256 {sha[:12]}, {row_found['n_images']} images)"
        )
        return row_found
    if data is not None:
        row = client.upload_dataset_bytes(data, f"{path.name}.zip", metadata)
    else:
        row = client.upload_dataset(path, metadata)
    note(f"{what}: uploaded {row['id']} (sha256 {sha[:12]}, {row['n_images']} images)")
    return row


def _zip_image_set(folder: Path, what: str, note: Callable[[str], None]) -> bytes:
    """The folder as a deterministic zip without the files that are not part of an image set
    (hidden files, ``__MACOSX``, ``.txt`` notes: the rule ``saliency-audit run`` and the
    upload apply, :func:`saliency_audit.workers.engine.image_files.skip_reason`), noted by name."""
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


def _gate(args: argparse.Namespace, context: _Context, note: Callable[[str], None]) -> int:
    from saliency_audit.workers.engine.spec import ANALYSES

    server, key, policy = _check_arguments(args)
    context.server = server
    deadline = context.started + args.timeout
    client = Client(server, key)

    model_sha = sha256_file(args.model)
    context.properties["model_sha256"] = model_sha
    model = client.find_model_by_sha256(model_sha)
    if model is not None:
        note(f"model: reusing {model['id']} (sha256 {model_sha[:12]})")
    else:
        metadata = {"architecture": args.arch} if args.arch else None
        model = client.upload_model(args.model, metadata)
        note(f"model: uploaded {model['id']} (sha256 {model_sha[:12]})")

    dataset = _dataset(client, args.images, args.dataset_id, None, "images", note)
    train = None
    if args.train is not None or args.train_dataset_id is not None:
        train = _dataset(
            client, args.train, args.train_dataset_id, {"purpose": "training"}, "training set", note
        )

    body: dict[str, Any] = {
        "model_id": model["id"],
        "dataset_id": dataset["id"],
        "methods": list(dict.fromkeys(args.methods)),
        "tests": list(dict.fromkeys(args.tests)),
    }
    if train is not None:
        body["train_dataset_id"] = train["id"]
    if policy is not None:
        body["policy"] = policy
    if getattr(args, "stages", None) is not None:  # left out: the service's default ("rule")
        body["stages"] = args.stages
    key_used = args.idempotency_key or idempotency_key(
        model_sha, dataset["sha256"], body, train["sha256"] if train is not None else None
    )
    submitted = client.submit_audit(body, key_used)
    audit = submitted.audit
    context.properties["audit_id"] = audit["id"]
    note(
        f"audit: {'attached to' if submitted.replayed else 'submitted'} {audit['id']} "
        f"({audit['state']}); {server.rstrip('/')}{routes.AUDIT.path(audit_id=audit['id'])}"
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

    report = client.report(audit["id"])
    verdicts = list(report.get("verdicts") or [])
    tests = [t for t in (report.get("spec") or {}).get("tests") or [] if t not in ANALYSES]
    policy_doc = report.get("policy") or {}
    url = f"{server.rstrip('/')}{routes.AUDIT.path(audit_id=audit['id'])}"
    decision = decide(verdicts, args.require, tests, args.inconclusive)
    if args.json:
        print(
            json.dumps(
                {
                    "outcome": decision.outcome,
                    "exit_code": decision.exit_code,
                    "summary": decision.summary,
                    "audit_id": audit["id"],
                    "audit_url": url,
                    "required": list(dict.fromkeys(args.require)),
                    "tests": tests,
                    "inconclusive": args.inconclusive,
                    "per_method": decision.per_method,
                    "problems": list(decision.problems),
                    "policy": {
                        "name": policy_doc.get("name"),
                        "version": policy_doc.get("version"),
                    },
                    "verdicts": verdicts,
                },
                indent=2,
            )
        )
    else:
        print(f"audit {audit['id']}: {url}")
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
                audit_id=audit["id"],
                model_sha256=(report.get("model") or {}).get("sha256") or model_sha,
                policy_version=str(policy_doc.get("version")),
                time_s=context.elapsed(),
                extra_properties={
                    "policy_name": policy_doc.get("name"),
                    "dataset_sha256": dataset["sha256"],
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
