"""``saliency-audit gate``, the release gate, run as a CI job runs it: a subprocess against a
real API process (PostgreSQL, Redis) and a real worker, on the bundled shapes CNN.

The audited case is chosen from the verdicts ``saliency-audit run`` gives on the same 16
images (every 4th of ``examples/reference/shapes_images``, seed 0, cascading, default policy
2.0.0: SSIM scaled by the controls, averaged over the first 25% of the stages): gradient
PASSes (0.16, 95% CI [-0.01, 0.32] below 0.462), guided backprop FAILs (0.94 [0.92, 0.95]:
the paper's finding), control_random PASSes and control_sobel FAILs. A policy deciding on the
first stage's SSIM with the threshold at 0.18 puts gradient's interval across it
(INCONCLUSIVE) while both controls still behave. The pure parts (the exit-code decision, the
JUnit document, the progress line, the image set the gate uploads) are tested without a
server. The same folder with a note, a hidden file and macOS metadata gives the same images
and one note through the service's gate, ``gate --local`` (whose verdicts are the service's)
and ``saliency-audit run``. ``gate --local`` itself: tests/service/test_gate_local.py; the CI
recipes: tests/service/test_ci_recipes.py.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
import zipfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests

import saliency_audit.service.gate as gate_module
from saliency_audit.service.client import retry_after_seconds, zip_folder_deterministic
from saliency_audit.service.config import Config
from saliency_audit.service.db import Database
from saliency_audit.service.gate import (
    Progress,
    _zip_image_set,
    decide,
    idempotency_key,
    image_set_archive,
    junit_document,
    write_junit,
)
from saliency_audit.workers.engine.image_files import list_images
from saliency_audit.workers.engine.policy import load_policy
from tests.servers import REFERENCE, REPO, Api, Server, Worker, new_key

MODEL = REFERENCE / "shapes_small_cnn.onnx"
METHODS = "gradient,guided_backprop"
CI = REPO / "examples" / "ci"

DEFAULT_VERSION = load_policy().version  # the shipped policy decided the audits here


# --- helpers ------------------------------------------------------------------------------


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """16 shapes images: every 4th of the bundled 64 in name order (all six classes)."""
    folder = tmp_path / "images"
    folder.mkdir()
    for path in sorted((REFERENCE / "shapes_images").glob("*.png"))[::4]:
        shutil.copy(path, folder / path.name)
    assert len(list(folder.iterdir())) == 16
    return folder


def gate(
    server: str, key: str, *options: str, timeout_s: float = 120.0
) -> subprocess.CompletedProcess[str]:
    """``python -m saliency_audit.service.cli gate`` as a CI job runs it (stdout and stderr
    captured)."""
    return subprocess.run(
        [sys.executable, "-m", "saliency_audit.service.cli", "gate", "--server", server,
         "--api-key", key, *options],
        cwd=REPO,
        env={k: v for k, v in os.environ.items() if not k.startswith("SALIENCY_AUDIT_")},
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )  # fmt: skip


def local_gate(*options: str, timeout_s: float = 300.0) -> subprocess.CompletedProcess[str]:
    """``python -m saliency_audit.service.cli gate --local``: the audit in the gate's own
    process."""
    return subprocess.run(
        [sys.executable, "-m", "saliency_audit.service.cli", "gate", "--local", *options],
        cwd=REPO,
        env={k: v for k, v in os.environ.items() if not k.startswith("SALIENCY_AUDIT_")},
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def junit(path: Path) -> tuple[ET.Element, dict[tuple[str, str], ET.Element], dict[str, str]]:
    """Parse a JUnit file and check its structure: ``<testsuites>`` around one
    ``<testsuite>`` whose counts match its test cases. Returns the suite, its test cases by
    (classname, name) and its properties."""
    root = ET.parse(path).getroot()
    assert root.tag == "testsuites"
    (suite,) = root.findall("testsuite")
    cases = suite.findall("testcase")
    assert int(suite.get("tests", "-1")) == len(cases) == int(root.get("tests", "-2"))
    failures = [c for c in cases if c.find("failure") is not None]
    errors = [c for c in cases if c.find("error") is not None]
    skipped = [c for c in cases if c.find("skipped") is not None]
    assert int(suite.get("failures", "-1")) == len(failures)
    assert int(suite.get("errors", "-1")) == len(errors)
    assert int(suite.get("skipped", "-1")) == len(skipped)
    outcomes = [
        sum(c.find(tag) is not None for tag in ("failure", "error", "skipped")) for c in cases
    ]
    assert max(outcomes, default=0) <= 1  # at most one of failure / error / skipped per case
    assert float(suite.get("time", "-1")) >= 0
    props = {p.get("name", ""): p.get("value", "") for p in suite.findall("properties/property")}
    by_key = {(c.get("classname", ""), c.get("name", "")): c for c in cases}
    assert len(by_key) == len(cases)
    return suite, by_key, props


def case_props(case: ET.Element) -> dict[str, str]:
    return {p.get("name", ""): p.get("value", "") for p in case.findall("properties/property")}


def total(api: Api, path: str) -> int:
    response = api.get(path, params={"limit": 1})
    assert response.status_code == 200, response.text
    value: int = response.json()["total"]
    return value


# --- the decision, the JUnit document, the progress line (no server) --------------------------


def v(method: str, test: str, verdict: str, **extra: Any) -> dict[str, Any]:
    return {
        "method": method,
        "test": test,
        "verdict": verdict,
        "reason": f"{method} {verdict.lower()} on {test}",
        "is_control": method.startswith("control_"),
        **extra,
    }


def test_the_exit_code_rules() -> None:
    tests = ["cascading", "random_logit"]
    both_pass = [v("gradcam", t, "PASS") for t in tests] + [v("lrp", t, "PASS") for t in tests]
    assert decide(both_pass, ["gradcam", "lrp"], tests).exit_code == 0
    # a method that is not required does not decide, whatever it gets
    others = [*both_pass, v("guided_backprop", "cascading", "FAIL")]
    assert decide(others, ["gradcam", "lrp"], tests).exit_code == 0
    assert decide(others, ["guided_backprop"], ["cascading"]).exit_code == 1

    one_fail = [*both_pass[:-1], v("lrp", "random_logit", "FAIL")]
    decision = decide(one_fail, ["gradcam", "lrp"], tests)
    assert (decision.exit_code, decision.outcome) == (1, "FAIL")
    assert decision.per_method["lrp"] == {"cascading": "PASS", "random_logit": "FAIL"}
    assert "lrp FAIL (random_logit)" in decision.summary and "gradcam PASS" in decision.summary

    unsure = [*both_pass[:-1], v("lrp", "random_logit", "INCONCLUSIVE")]
    assert decide(unsure, ["gradcam", "lrp"], tests).exit_code == 2
    assert decide(unsure, ["gradcam", "lrp"], tests, "error").outcome == "INCONCLUSIVE"
    assert decide(unsure, ["gradcam", "lrp"], tests, "fail").exit_code == 1
    assert decide(unsure, ["gradcam", "lrp"], tests, "pass").exit_code == 0
    assert decide(unsure, ["gradcam"], tests).exit_code == 0  # lrp is not required
    # a FAIL is conclusive: it decides before an INCONCLUSIVE elsewhere
    mixed = [
        v("gradcam", "cascading", "FAIL"),
        v("gradcam", "random_logit", "PASS"),
        v("lrp", "cascading", "PASS"),
        v("lrp", "random_logit", "INCONCLUSIVE"),
    ]
    assert decide(mixed, ["gradcam", "lrp"], tests).exit_code == 1

    # a required method without a verdict (not run), or a test it has none for: an error
    missing = decide(both_pass, ["gradcam", "lrp", "smoothgrad"], tests)
    assert (missing.exit_code, missing.outcome) == (2, "ERROR")
    assert any("smoothgrad" in p and "did not run" in p for p in missing.problems)
    assert decide(both_pass, ["gradcam"], [*tests, "smprt"]).exit_code == 2
    assert decide([v("gradcam", "cascading", "WEIRD")], ["gradcam"], ["cascading"]).exit_code == 2
    # a missing verdict is an error even next to a FAIL
    assert decide(one_fail, ["lrp", "smoothgrad"], tests).exit_code == 2
    assert decide(both_pass, [], tests).exit_code == 2
    assert decide(both_pass, ["gradcam"], []).exit_code == 2
    with pytest.raises(ValueError):
        decide(both_pass, ["gradcam"], tests, "maybe")  # type: ignore[arg-type]


def gitlab_counts(root: ET.Element) -> dict[str, int]:
    """Test cases by status as GitLab's JUnit parser counts them (from the test cases, not the
    suite's attributes): a ``<failure>`` is failed, an ``<error>`` is error, a ``<skipped>``
    is skipped, anything else success."""
    counts = {"success": 0, "failed": 0, "error": 0, "skipped": 0}
    for case in root.iter("testcase"):
        if case.find("failure") is not None:
            counts["failed"] += 1
        elif case.find("error") is not None:
            counts["error"] += 1
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["success"] += 1
    return counts


def _document(verdicts: list[dict[str, Any]], required: list[str], **options: Any) -> ET.Element:
    return junit_document(
        verdicts,
        required=required,
        audit_id="a-1",
        model_sha256="ab" * 32,
        policy_version="1.0.0",
        time_s=12.5,
        **options,
    )


def test_the_junit_document_keeps_failures_and_errors_apart() -> None:
    verdicts = [
        v("gradcam", "cascading", "PASS", measure="ssim", stage="fc", mean=0.2, ci_low=0.1,
          ci_high=0.3, n=16, threshold=0.51, pass_when="below"),
        v("guided_backprop", "cascading", "FAIL", measure="ssim", mean=0.97),
        v("lrp", "cascading", "INCONCLUSIVE", measure="ssim", mean=0.5),
        v("control_sobel", "cascading", "FAIL"),
        v("control_random", "cascading", "PASS"),
    ]  # fmt: skip
    root = _document(verdicts, ["gradcam", "lrp", "guided_backprop"])
    suite = root.find("testsuite")
    assert suite is not None
    counts = ("tests", "failures", "errors", "skipped")
    assert tuple(suite.get(c) for c in counts) == ("5", "1", "1", "2")
    assert gitlab_counts(root) == {"success": 1, "failed": 1, "error": 1, "skipped": 2}
    assert suite.get("time") == "12.500"
    props = {p.get("name"): p.get("value") for p in suite.findall("properties/property")}
    assert props["audit_id"] == "a-1" and props["model_sha256"] == "ab" * 32
    assert props["policy_version"] == "1.0.0"
    cases = {(c.get("classname"), c.get("name")): c for c in suite.findall("testcase")}
    assert set(cases) == {("saliency-audit.cascading", v["method"]) for v in verdicts}
    passing = cases[("saliency-audit.cascading", "gradcam")]
    assert passing.find("failure") is None and passing.find("error") is None
    assert case_props(passing)["required"] == "true" and case_props(passing)["mean"] == "0.2"
    failed = cases[("saliency-audit.cascading", "guided_backprop")].find("failure")
    assert failed is not None and failed.get("message") == "guided_backprop fail on cascading"
    assert cases[("saliency-audit.cascading", "guided_backprop")].find("error") is None
    unsure = cases[("saliency-audit.cascading", "lrp")]
    error = unsure.find("error")
    assert error is not None and unsure.find("failure") is None
    assert (error.get("type"), error.get("message")) == (
        "INCONCLUSIVE",
        "lrp inconclusive on cascading",
    )
    sobel = cases[("saliency-audit.cascading", "control_sobel")]
    assert case_props(sobel)["is_control"] == "true" and case_props(sobel)["required"] == "false"
    assert case_props(passing)["is_control"] == "false"
    # it serializes to a document that parses back
    assert ET.fromstring(ET.tostring(root)).find("testsuite") is not None


def test_a_passing_gate_gives_a_green_junit_report() -> None:
    """Controls and methods the gate does not require never fail the suite: they are skipped
    with their verdict and reason (control_sobel FAILs on every audit, by design)."""
    verdicts = [
        v("gradient", "cascading", "PASS"),
        v("guided_backprop", "cascading", "FAIL"),
        v("control_sobel", "cascading", "FAIL"),
        v("control_random", "cascading", "PASS"),
        v("lrp", "cascading", "INCONCLUSIVE"),
    ]
    root = _document(verdicts, ["gradient"])
    suite = root.find("testsuite")
    assert suite is not None
    assert (suite.get("failures"), suite.get("errors"), suite.get("skipped")) == ("0", "0", "4")
    assert gitlab_counts(root) == {"success": 1, "failed": 0, "error": 0, "skipped": 4}
    assert (root.get("failures"), root.get("errors")) == ("0", "0")
    cases = {c.get("name"): c for c in suite.findall("testcase")}
    sobel = cases["control_sobel"].find("skipped")
    assert sobel is not None and sobel.get("type") == "FAIL"
    assert sobel.get("message") == (
        "FAIL (control not required by the gate): control_sobel fail on cascading"
    )
    guided = cases["guided_backprop"].find("skipped")
    assert guided is not None and guided.get("message", "").startswith(
        "FAIL (method not required by the gate)"
    )
    assert case_props(cases["guided_backprop"])["verdict"] == "FAIL"
    assert cases["gradient"].findtext("system-out") == "PASS: gradient pass on cascading"


def test_junitparser_reads_a_passing_gate_as_green_and_a_failing_one_as_red(
    tmp_path: Path,
) -> None:
    """What CI reporters built on junitparser (and GitLab, above) count."""
    import junitparser

    verdicts = [
        v("gradient", "cascading", "PASS"),
        v("guided_backprop", "cascading", "FAIL"),
        v("control_sobel", "cascading", "FAIL"),
        v("control_random", "cascading", "PASS"),
    ]
    for required, expected in ((["gradient"], (0, 0, 3)), (["guided_backprop"], (1, 0, 3))):
        path = tmp_path / f"{required[0]}.xml"
        write_junit(path, _document(verdicts, required))
        (suite,) = list(junitparser.JUnitXml.fromfile(str(path)))
        assert (suite.failures, suite.errors, suite.skipped) == expected, required
        results = {case.name: [type(r).__name__ for r in case.result] for case in suite}
        assert results[required[0]] == (["Failure"] if expected[0] else [])
        assert results["control_sobel"] == ["Skipped"]


@pytest.mark.parametrize(
    ("mode", "tag", "failures", "errors"),
    [("error", "error", "0", "1"), ("fail", "failure", "1", "0"), ("pass", None, "0", "0")],
)
def test_a_required_inconclusive_verdict_follows_the_inconclusive_option(
    mode: str, tag: str | None, failures: str, errors: str
) -> None:
    root = _document(
        [v("gradient", "cascading", "INCONCLUSIVE"), v("control_sobel", "cascading", "FAIL")],
        ["gradient"],
        inconclusive=mode,
    )
    suite = root.find("testsuite")
    assert suite is not None
    assert (suite.get("failures"), suite.get("errors"), suite.get("skipped")) == (
        failures,
        errors,
        "1",
    )
    (gradient,) = [c for c in suite.findall("testcase") if c.get("name") == "gradient"]
    present = [t for t in ("failure", "error", "skipped") if gradient.find(t) is not None]
    assert present == ([tag] if tag else [])
    if tag is None:
        assert "counted as a PASS (--inconclusive pass)" in (gradient.findtext("system-out") or "")
    props = {p.get("name"): p.get("value") for p in suite.findall("properties/property")}
    assert props["inconclusive"] == mode


def test_a_required_verdict_the_audit_lacks_is_an_error_case() -> None:
    root = _document(
        [v("gradient", "cascading", "PASS")], ["gradient"], tests=["cascading", "independent"]
    )
    suite = root.find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("errors"), suite.get("failures")) == ("2", "1", "0")
    (missing,) = [c for c in suite.findall("testcase") if c.find("error") is not None]
    assert missing.get("classname") == "saliency-audit.independent"
    error = missing.find("error")
    assert error is not None and error.get("type") == "MISSING"


def test_progress_rewrites_one_line_on_a_terminal_and_writes_lines_otherwise() -> None:
    states = [
        {"state": "queued", "progress": 0.0, "step": "queued"},
        {"state": "queued", "progress": 0.0, "step": "queued"},  # no change: nothing
        {"state": "running", "progress": 0.25, "step": "maps"},
        {"state": "succeeded", "progress": 1.0, "step": "done"},
    ]
    lines = io.StringIO()
    now = [100.0]

    def clock() -> float:  # ten seconds between two readings (an unchanged line reads none)
        now[0] += 10.0
        return now[0] - 10.0

    progress = Progress(lines, tty=False, clock=clock)
    for state in states:
        progress.update(state)
    progress.close()
    assert lines.getvalue().splitlines() == [
        "[  0.0%] queued: queued (elapsed 0:10, ETA -)",
        "[ 25.0%] running: maps (elapsed 0:20, ETA 0:30)",  # 25% in 10 s: 75% in 30 s
        "[100.0%] succeeded: done (elapsed 0:30, ETA 0:00)",
    ]
    terminal = io.StringIO()
    progress = Progress(terminal, tty=True)
    for state in states:
        progress.update(state)
    progress.close()
    text = terminal.getvalue()
    assert text.count("\r") == 3 and text.count("\n") == 1 and text.endswith("\n")
    assert "[" + "#" * 30 + "] 100.0% succeeded: done (elapsed 0:00, ETA 0:00)" in text
    quiet = io.StringIO()
    progress = Progress(quiet, quiet=True, tty=True)
    progress.update(states[2])
    progress.close()
    assert quiet.getvalue() == ""


def test_polling_honours_retry_after_and_waits_out_a_restarting_service(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sleeps: list[float] = []
    now = [1000.0]

    def sleep(seconds: float) -> None:  # a fake clock: sleeping moves it on
        sleeps.append(seconds)
        now[0] += seconds

    monkeypatch.setattr(gate_module.time, "sleep", sleep)
    monkeypatch.setattr(gate_module.time, "monotonic", lambda: now[0])
    running = {"id": "a", "state": "running", "progress": 0.5, "step": "maps"}
    answers: list[Any] = [
        (None, 3.0),  # 503 with Retry-After: 3
        requests.ConnectionError("refused"),  # the service restarting
        (running, 5.0),
        ({**running, "state": "succeeded", "progress": 1.0}, None),
    ]

    class FakeClient:
        def audit_status(self, audit_id: str) -> tuple[dict[str, Any] | None, float | None]:
            answer = answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer

    args = argparse.Namespace(quiet=True, timeout=600.0)
    queued = {"id": "a", "state": "queued", "progress": 0.0, "step": "queued"}
    final = gate_module._wait(
        FakeClient(),  # type: ignore[arg-type]
        queued,
        2.0,
        now[0] + 600,
        args,
        lambda _: None,
    )
    assert final["state"] == "succeeded" and not answers
    # the submission's Retry-After, the 503's, the default after a connection error, then 5
    assert sleeps == [2.0, 3.0, gate_module.DEFAULT_POLL_S, 5.0]

    # never past the deadline: the sleep is cut short, then the gate stops
    sleeps.clear()
    answers[:] = [(running, 30.0)]
    with pytest.raises(gate_module.GateError) as raised:
        gate_module._wait(
            FakeClient(),  # type: ignore[arg-type]
            queued,
            30.0,
            now[0] + 0.5,
            args,
            lambda _: None,
        )
    assert raised.value.code == "timeout" and "still running (50%, maps)" in raised.value.message
    assert sleeps == [0.5] and not answers

    assert retry_after_seconds("7") == 7.0 and retry_after_seconds("-3") == 0.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None


def test_the_zipped_folder_and_the_idempotency_key_are_stable(images: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(images, copy)
    for i, path in enumerate(sorted(copy.iterdir())):
        os.utime(path, (1_000_000 + i, 1_000_000 + i))  # other timestamps, other order on disk
    (copy / ".DS_Store").write_bytes(b"hidden")
    first, second = zip_folder_deterministic(images), zip_folder_deterministic(copy)
    assert first == second
    with zipfile.ZipFile(io.BytesIO(first)) as archive:
        names = archive.namelist()
        assert names == sorted(p.name for p in images.iterdir())
        assert {i.date_time for i in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}
        assert archive.read(names[0]) == (images / names[0]).read_bytes()
    (copy / names[0]).write_bytes(b"changed")
    assert zip_folder_deterministic(copy) != first

    body = {"model_id": "m", "dataset_id": "d", "methods": ["gradient"], "tests": ["cascading"]}
    key = idempotency_key("a" * 64, "b" * 64, body)
    assert key == idempotency_key("a" * 64, "b" * 64, dict(reversed(list(body.items()))))
    assert key.startswith("gate-") and len(key) <= 200
    assert key != idempotency_key("a" * 64, "c" * 64, body)
    assert key != idempotency_key("a" * 64, "b" * 64, {**body, "methods": ["gradcam"]})
    assert key != idempotency_key("a" * 64, "b" * 64, body, train_sha256="d" * 64)


def with_extras(images: Path, root: Path) -> Path:
    """A copy of the images folder with what a user's folder also holds: a note, a hidden
    file, macOS metadata (the extras ``saliency-audit run``, the Python API and image-set
    uploads skip: tests/engine/test_python_api.py, tests/service/test_uploads.py)."""
    messy = root / "messy"
    shutil.copytree(images, messy)
    (messy / "notes.txt").write_text("taken on Tuesday\n")
    (messy / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (messy / "__MACOSX").mkdir()
    (messy / "__MACOSX" / "._a.png").write_bytes(b"\0\5\26\7")
    return messy


MESSY_NOTE = (
    "skipped 3 file(s) that are not images: .DS_Store (hidden), __MACOSX/ (macOS metadata), "
    "notes.txt (not an image)"
)


def test_the_gate_uploads_the_images_list_images_finds_whatever_form_they_come_in(
    images: Path, tmp_path: Path
) -> None:
    """A folder with notes, the glob of its images, a zip of it and the image files by name
    are one image set: the same deterministic zip (so one upload, one audit), whose members
    are exactly the images ``saliency-audit run`` reads."""
    messy = with_extras(images, tmp_path)
    archive = tmp_path / "messy.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(p for p in messy.rglob("*") if p.is_file()):
            z.write(path, path.relative_to(messy).as_posix())
    clean = image_set_archive(list_images(images))
    assert clean == zip_folder_deterministic(images)  # what earlier gates uploaded for a folder
    assert list_images(messy).note == MESSY_NOTE
    files = [str(p) for p in sorted(images.glob("*.png"))]
    for source in ([str(messy)], [str(messy / "*.png")], [str(archive)], files):
        assert image_set_archive(list_images(source)) == clean, source
    one = image_set_archive(list_images(files[:1]))
    with zipfile.ZipFile(io.BytesIO(one)) as z:
        assert z.namelist() == [Path(files[0]).name]


def test_a_training_folder_is_zipped_with_its_class_folders_without_its_notes(
    tmp_path: Path,
) -> None:
    train = tmp_path / "train"
    for label in ("circle", "square"):
        (train / label).mkdir(parents=True)
        for path in sorted((REFERENCE / "shapes_images").glob(f"{label}_*.png"))[:2]:
            shutil.copy(path, train / label / path.name)
    (train / "circle" / "notes.txt").write_text("taken on Tuesday\n")
    (train / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    notes: list[str] = []
    data = _zip_image_set(train, "training set", notes.append)
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        assert [n.split("/")[0] for n in z.namelist()] == ["circle"] * 2 + ["square"] * 2
    assert notes == [
        "training set: skipped 2 file(s) that are not images: .DS_Store (hidden), "
        "circle/notes.txt (not an image)"
    ]


# --- against the service -------------------------------------------------------------------


def test_a_passing_and_a_failing_gate_reuse_the_same_uploads_and_audit(
    pg_config: Config,
    pg_server: Server,
    pg_database: Database,
    worker_factory: Callable[[Config], Worker],
    images: Path,
    tmp_path: Path,
) -> None:
    worker_factory(pg_config)
    key = new_key(pg_database)
    api = Api(pg_server.url, key)
    options = ["--model", str(MODEL), "--images", str(images), "--methods", METHODS]

    first = gate(pg_server.url, key, *options, "--require", "gradient", "--junit",
                 str(tmp_path / "pass.xml"))  # fmt: skip
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"verdicts (policy saliency-audit default {DEFAULT_VERSION})" in first.stdout
    rows = {line.split()[0]: line.split()[1] for line in first.stdout.splitlines()
            if line.split()[:1] in (["gradient"], ["guided_backprop"], ["control_sobel"],
                                    ["control_random"])}  # fmt: skip
    assert rows == {
        "gradient": "PASS",
        "guided_backprop": "FAIL",
        "control_sobel": "FAIL",
        "control_random": "PASS",
    }
    assert "gate PASS (exit 0): required gradient PASS" in first.stdout
    assert "model: uploaded" in first.stderr and "images: uploaded" in first.stderr
    assert "audit: submitted" in first.stderr
    assert "succeeded: " in first.stderr  # the progress, one line per change (not a TTY)

    suite, cases, props = junit(tmp_path / "pass.xml")
    audit_id = props["audit_id"]
    assert props["model_sha256"] == api.get("/v1/models").json()["items"][0]["sha256"]
    assert props["policy_version"] == DEFAULT_VERSION
    assert set(cases) == {
        ("saliency-audit.cascading", m)
        for m in ("gradient", "guided_backprop", "control_sobel", "control_random")
    }
    passing = cases[("saliency-audit.cascading", "gradient")]
    assert passing.find("failure") is None and passing.find("error") is None
    assert case_props(passing)["required"] == "true"
    # not required: reported, never failing the suite (a passing gate is a green report)
    failing = cases[("saliency-audit.cascading", "guided_backprop")].find("skipped")
    assert failing is not None and "not below the threshold 0.473" in failing.get("message", "")
    assert failing.get("type") == "FAIL"
    assert case_props(cases[("saliency-audit.cascading", "control_random")])["is_control"] == (
        "true"
    )
    assert suite.get("errors") == "0" and suite.get("failures") == "0"
    assert suite.get("skipped") == "3"  # guided bp, sobel, random: not required
    counts = (total(api, "/v1/models"), total(api, "/v1/datasets"), total(api, "/v1/audits"))
    assert counts == (1, 1, 1)

    # the same job again: nothing uploaded, the same audit, the same answer
    again = gate(pg_server.url, key, *options, "--require", "gradient", "--junit",
                 str(tmp_path / "again.xml"))  # fmt: skip
    assert again.returncode == 0, again.stdout + again.stderr
    assert "model: reusing" in again.stderr and "images: reusing" in again.stderr
    assert f"audit: attached to {audit_id}" in again.stderr
    assert junit(tmp_path / "again.xml")[2]["audit_id"] == audit_id

    # --json: the decision and the verdicts as one JSON object, the same audit's report
    as_json = gate(pg_server.url, key, *options, "--require", "gradient", "--json", "--quiet")
    assert as_json.returncode == 0, as_json.stdout + as_json.stderr
    decided = json.loads(as_json.stdout)
    assert (decided["outcome"], decided["exit_code"], decided["audit_id"]) == ("PASS", 0, audit_id)
    assert decided["per_method"] == {"gradient": {"cascading": "PASS"}}
    report = api.get(f"/v1/audits/{audit_id}/report.json").json()
    assert decided["verdicts"] == report["verdicts"]
    assert decided["policy"]["version"] == DEFAULT_VERSION
    assert (total(api, "/v1/models"), total(api, "/v1/datasets"), total(api, "/v1/audits")) == (
        counts
    )

    # one input rule: the folder with a note, a hidden file and macOS metadata, and the glob of
    # its images, are the same image set (reused: the same audit); the service's gate, the
    # local gate and `saliency-audit run` list the same images and skip the same files, in
    # one note
    messy = with_extras(images, tmp_path)
    names = sorted(p.name for p in images.iterdir())
    skipped = [".DS_Store (hidden)", "__MACOSX/ (macOS metadata)", "notes.txt (not an image)"]
    same = ["--model", str(MODEL), "--methods", METHODS, "--require", "gradient", "--json"]
    for source in (str(messy), str(messy / "*.png")):
        remote = gate(pg_server.url, key, "--images", source, *same)
        assert remote.returncode == 0, remote.stdout + remote.stderr
        assert "images: reusing" in remote.stderr and f"attached to {audit_id}" in remote.stderr
        seen = json.loads(remote.stdout)["images"]
        assert seen["names"] == names and seen["count"] == 16
        assert seen["skipped"] == (skipped if source == str(messy) else [])
        assert (f"images: {MESSY_NOTE}" in remote.stderr.splitlines()) == (source == str(messy))
    # the classes the maps explain, counted from the report's images, in class order
    targets = Counter((i["target"], i["target_name"]) for i in report["images"])
    assert seen["explained_classes"] == [
        {"class": index, "name": name, "images": n} for (index, name), n in sorted(targets.items())
    ]
    assert sum(targets.values()) == 16 and len(targets) == 6  # every shape
    assert total(api, "/v1/datasets") == 1 and total(api, "/v1/audits") == 1
    here = local_gate("--images", str(messy), *same)
    assert here.returncode == 0, here.stdout + here.stderr
    assert f"images: {MESSY_NOTE}" in here.stderr.splitlines()
    local = json.loads(here.stdout)
    assert local["images"]["names"] == names and local["images"]["skipped"] == skipped
    assert (local["mode"], local["audit_id"], local["outcome"]) == ("local", None, "PASS")
    assert local["images"]["dataset_sha256"] == seen["dataset_sha256"]
    # the audit a service runs for the gate's request, run here: the same verdicts
    theirs = {(v["method"], v["test"]): v for v in report["verdicts"]}
    assert {(v["method"], v["test"]): v["verdict"] for v in local["verdicts"]} == {
        key: v["verdict"] for key, v in theirs.items()
    }
    for v in local["verdicts"]:
        assert v["mean"] == pytest.approx(theirs[(v["method"], v["test"])]["mean"], abs=1e-4)
    run = subprocess.run(
        [sys.executable, "-m", "saliency_audit.service.cli", "run", "--model", str(MODEL),
         "--images", str(messy), "--methods", "gradient", "--tests", "none", "--json", "--quiet",
         "--out", str(tmp_path / "run")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert [i["name"] for i in json.loads(run.stdout)["images"]] == names
    assert f"note: {MESSY_NOTE}" in run.stderr.splitlines()

    # requiring guided backprop fails the release (the paper's finding), on the same audit
    failed = gate(pg_server.url, key, *options, "--require", "gradient,guided_backprop",
                  "--junit", str(tmp_path / "fail.xml"), "--quiet")  # fmt: skip
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "gate FAIL (exit 1)" in failed.stdout and "guided_backprop FAIL (cascading)" in (
        failed.stdout
    )
    assert "verdicts (policy" in failed.stdout
    # --quiet: no progress lines and no notes (the reasons of the failure still come)
    assert not [line for line in failed.stderr.splitlines() if line.startswith("[")]
    assert "audit: " not in failed.stderr and "guided_backprop FAILs cascading" in failed.stderr
    fail_suite, fail_cases, fail_props = junit(tmp_path / "fail.xml")
    assert fail_props["audit_id"] == audit_id
    guided = fail_cases[("saliency-audit.cascading", "guided_backprop")]
    assert case_props(guided)["required"] == "true" and guided.find("failure") is not None
    assert (fail_suite.get("failures"), fail_suite.get("errors")) == ("1", "0")
    assert total(api, "/v1/audits") == 1

    # a required method the audit does not run: an error before anything is submitted
    absent = gate(pg_server.url, key, *options, "--require", "gradcam")
    assert absent.returncode == 2
    assert "gradcam not in --methods" in absent.stderr
    absent = gate(pg_server.url, key, *options, "--require", "gradcam", "--json")
    assert absent.returncode == 2
    refused = json.loads(absent.stdout)
    assert (refused["outcome"], refused["code"]) == ("ERROR", "required_not_audited")
    assert total(api, "/v1/audits") == 1


def test_an_inconclusive_verdict_is_an_error_unless_told_otherwise(
    pg_config: Config,
    pg_server: Server,
    pg_database: Database,
    worker_factory: Callable[[Config], Worker],
    images: Path,
    tmp_path: Path,
) -> None:
    worker_factory(pg_config)
    key = new_key(pg_database)
    api = Api(pg_server.url, key)
    policy = tmp_path / "policy.json"
    policy.write_text(
        json.dumps(
            {
                "extends": "default",
                "version": "straddle-1",
                "tests": {
                    "cascading": {
                        "measure": "ssim",
                        "stage": "first",
                        "threshold": 0.18,
                        "pass_when": "below",
                    }
                },
            }
        )
    )
    options = ["--model", str(MODEL), "--images", str(images), "--methods", METHODS,
               "--require", "gradient", "--policy", str(policy)]  # fmt: skip

    unsure = gate(pg_server.url, key, *options, "--junit", str(tmp_path / "unsure.xml"))
    assert unsure.returncode == 2, unsure.stdout + unsure.stderr
    assert "gate INCONCLUSIVE (exit 2)" in unsure.stdout
    assert "gradient is INCONCLUSIVE on cascading" in unsure.stderr
    suite, cases, props = junit(tmp_path / "unsure.xml")
    assert props["policy_version"] == "straddle-1"
    gradient = cases[("saliency-audit.cascading", "gradient")]
    error = gradient.find("error")
    assert error is not None and gradient.find("failure") is None
    assert error.get("type") == "INCONCLUSIVE"
    assert "straddles the threshold 0.18" in error.get("message", "")
    # guided backprop still FAILs, but the gate does not require it: skipped, not a failure
    guided = cases[("saliency-audit.cascading", "guided_backprop")]
    assert guided.find("skipped") is not None and guided.find("failure") is None
    assert (suite.get("failures"), suite.get("errors")) == ("0", "1")

    as_fail = gate(pg_server.url, key, *options, "--inconclusive", "fail", "--quiet")
    assert as_fail.returncode == 1, as_fail.stdout + as_fail.stderr
    assert "gate INCONCLUSIVE (exit 1)" in as_fail.stdout
    as_pass = gate(pg_server.url, key, *options, "--inconclusive", "pass", "--quiet")
    assert as_pass.returncode == 0, as_pass.stdout + as_pass.stderr
    assert "[--inconclusive pass]" in as_pass.stdout
    assert total(api, "/v1/audits") == 1  # --inconclusive is not part of the request


def test_errors_exit_2_with_the_services_problem(
    pg_server: Server, pg_database: Database, images: Path, tmp_path: Path
) -> None:
    """No worker runs here: a submitted audit stays queued."""
    key = new_key(pg_database)
    api = Api(pg_server.url, key)
    options = ["--model", str(MODEL), "--images", str(images), "--methods", METHODS,
               "--require", "gradient"]  # fmt: skip

    invalid = tmp_path / "invalid.json"
    invalid.write_text(json.dumps({"extends": "default", "tests": {"cascading": {"x": 1}}}))
    refused = gate(pg_server.url, key, *options, "--policy", str(invalid), "--junit",
                   str(tmp_path / "refused.xml"))  # fmt: skip
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "HTTP 422" in refused.stderr and "(code invalid_policy)" in refused.stderr
    assert "unknown fields ['x']" in refused.stderr  # the server's detail
    suite, cases, _ = junit(tmp_path / "refused.xml")
    ((_, case),) = cases.items()
    error = case.find("error")
    assert error is not None and error.get("type") == "invalid_policy"
    assert suite.get("errors") == "1" and suite.get("failures") == "0"
    assert total(api, "/v1/audits") == 0

    started = time.monotonic()
    late = gate(pg_server.url, key, *options, "--timeout", "1", "--junit",
                str(tmp_path / "late.xml"))  # fmt: skip
    assert late.returncode == 2, late.stdout + late.stderr
    assert time.monotonic() - started < 30
    assert "still queued" in late.stderr and "--timeout 1 s" in late.stderr
    _, cases, props = junit(tmp_path / "late.xml")
    ((_, case),) = cases.items()
    error = case.find("error")
    assert error is not None and error.get("type") == "timeout"
    audit_id = props["audit_id"]

    # canceled meanwhile: the re-run attaches to it and reports the canceled audit
    assert api.delete(f"/v1/audits/{audit_id}").status_code == 200
    canceled = gate(pg_server.url, key, *options)
    assert canceled.returncode == 2
    assert f"audit {audit_id} canceled" in canceled.stderr
    assert total(api, "/v1/audits") == 1

    wrong_key = gate(pg_server.url, "sak_000000000000_x", *options)
    assert wrong_key.returncode == 2
    assert "HTTP 401" in wrong_key.stderr and "(code invalid_key)" in wrong_key.stderr
    nothing = gate(pg_server.url, key, *options[:4], "--require", "gradient", "--quiet")
    assert nothing.returncode == 2  # argparse: --methods is required
    assert "--methods" in nothing.stderr
