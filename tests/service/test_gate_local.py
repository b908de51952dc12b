"""``saliency-audit gate --local``: the release gate without a service, in the gate's own
process, on the bundled shapes CNN and 16 of its images (the case of tests/service/
test_gate.py: gradient PASSes cascading randomization, guided backprop FAILs it, the paper's
finding). That the local audit gives the service's verdicts on the same files, and the same
images and note as ``run`` and the service's gate, is checked there against a real service.

Here: the JUnit file of a passing local gate is green as CI tools count it (junitparser, and
GitLab's per-test-case rule), a failing one has the required method as its one failure, and
what makes no sense without a service is refused before anything is computed.
"""

from __future__ import annotations

import json
import shutil
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import junitparser
import pytest

from saliency_audit.service.cli import main
from tests.servers import REFERENCE
from tests.service.test_gate import case_props, gitlab_counts, junit

MODEL = REFERENCE / "shapes_small_cnn.onnx"
METHODS = "gradient,guided_backprop"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 shapes images: every 4th of the bundled 64 in name order (all six classes)."""
    folder = tmp_path_factory.mktemp("local-gate") / "images"
    folder.mkdir()
    for path in sorted((REFERENCE / "shapes_images").glob("*.png"))[::4]:
        shutil.copy(path, folder / path.name)
    return folder


def local_gate(images: Path, *options: str) -> int:
    return main(
        ["gate", "--local", "--model", str(MODEL), "--images", str(images), "--methods",
         METHODS, *options]
    )  # fmt: skip


def junitparser_counts(path: Path) -> tuple[int, int, int]:
    (suite,) = list(junitparser.JUnitXml.fromfile(str(path)))
    return suite.failures, suite.errors, suite.skipped


def test_a_passing_local_gate_writes_a_green_junit_file(
    images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    passing = tmp_path / "pass.xml"
    assert local_gate(images, "--require", "gradient", "--junit", str(passing)) == 0
    printed = capsys.readouterr()
    assert "audited in this process (--local)" in printed.out
    assert "16 images audited; explained classes: 0 (circle) x" in printed.out
    assert "gate PASS (exit 0): required gradient PASS" in printed.out
    # fewer images than the policy was calibrated for: said, as with a service
    few = "note: 16 images audited; the policy was calibrated to decide from 128 images"
    assert few in printed.out
    assert "input spec used" in printed.err and "[100.0%] running: done" in printed.err
    suite, cases, props = junit(passing)
    assert (suite.get("failures"), suite.get("errors"), suite.get("skipped")) == ("0", "0", "3")
    assert junitparser_counts(passing) == (0, 0, 3)
    tree = ET.parse(passing).getroot()
    assert gitlab_counts(tree) == {"success": 1, "failed": 0, "error": 0, "skipped": 3}
    assert case_props(cases[("saliency-audit.cascading", "gradient")])["verdict"] == "PASS"
    guided = cases[("saliency-audit.cascading", "guided_backprop")]
    assert case_props(guided)["verdict"] == "FAIL" and guided.find("skipped") is not None
    assert props["mode"] == "local" and "audit_id" not in props
    assert props["images"] == "16" and len(props["dataset_sha256"]) == 64
    assert props["gate_outcome"] == "PASS" and props["model_sha256"]


def test_a_failing_local_gate_has_the_required_method_as_its_one_failure(
    images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    failing = tmp_path / "fail.xml"
    code = local_gate(images, "--require", "gradient,guided_backprop", "--junit", str(failing),
                      "--json", "--quiet")  # fmt: skip
    assert code == 1
    printed = capsys.readouterr()
    decided = json.loads(printed.out)
    assert (decided["outcome"], decided["exit_code"], decided["mode"]) == ("FAIL", 1, "local")
    assert decided["summary"] == (
        "gate FAIL (exit 1): required gradient PASS; guided_backprop FAIL (cascading)"
    )
    assert decided["audit_id"] is None and decided["audit_url"] is None
    assert decided["per_method"] == {
        "gradient": {"cascading": "PASS"},
        "guided_backprop": {"cascading": "FAIL"},
    }
    assert decided["images"]["count"] == 16 and decided["images"]["skipped"] == []
    assert sum(c["images"] for c in decided["images"]["explained_classes"]) == 16
    assert {(v["method"], v["verdict"]) for v in decided["verdicts"]} == {
        ("gradient", "PASS"),
        ("guided_backprop", "FAIL"),
        ("control_sobel", "FAIL"),
        ("control_random", "PASS"),
    }
    # --quiet: no notes and no progress; the few-images warning and the reason still come
    lines = printed.err.strip().splitlines()
    assert lines[0] == (
        "note: 16 images audited; the policy was calibrated to decide from 128 images "
        "(docs/policy.md), so expect more INCONCLUSIVE verdicts"
    )
    assert len(lines) == 2 and lines[1].startswith("  guided_backprop FAILs cascading: ")

    _, cases, props = junit(failing)
    assert junitparser_counts(failing) == (1, 0, 2)
    # GitLab counts test cases: failed + error is what turns the merge request red
    counted = gitlab_counts(ET.parse(failing).getroot())
    assert counted == {"success": 1, "failed": 1, "error": 0, "skipped": 2}
    (red,) = [c for c in cases.values() if c.find("failure") is not None]
    assert red.get("name") == "guided_backprop" and case_props(red)["required"] == "true"
    failure = red.find("failure")
    assert failure is not None and "not below the threshold 0.473" in failure.get("message", "")
    assert props["gate_outcome"] == "FAIL" and props["gate_exit_code"] == "1"


@pytest.mark.parametrize(
    "option",
    [
        ["--server", "http://127.0.0.1:9"],
        ["--api-key", "sak_000000000000_x"],
        ["--idempotency-key", "k1"],
    ],
)
def test_what_needs_a_service_is_refused_with_local(
    images: Path, tmp_path: Path, option: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    junit_file = tmp_path / "refused.xml"
    started = time.monotonic()
    code = local_gate(images, "--require", "gradient", *option, "--junit", str(junit_file))
    assert code == 2 and time.monotonic() - started < 5  # refused before any audit
    printed = capsys.readouterr()
    assert f"error: {option[0]}: not with --local" in printed.err
    _, cases, _ = junit(junit_file)
    ((_, case),) = cases.items()
    error = case.find("error")
    assert error is not None and error.get("type") == "bad_arguments"


def test_a_dataset_id_is_refused_with_local(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["gate", "--local", "--model", str(MODEL), "--dataset-id", "d-1",
                 "--methods", METHODS, "--require", "gradient", "--json"])  # fmt: skip
    assert code == 2
    refused = json.loads(capsys.readouterr().out)
    assert (refused["outcome"], refused["code"], refused["mode"]) == (
        "ERROR",
        "bad_arguments",
        "local",
    )
    assert "--dataset-id: not with --local" in refused["message"]


def test_the_local_audit_stops_at_the_timeout(
    images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    junit_file = tmp_path / "late.xml"
    started = time.monotonic()
    code = local_gate(images, "--require", "gradient", "--timeout", "0.01", "--junit",
                      str(junit_file), "--quiet")  # fmt: skip
    assert code == 2 and time.monotonic() - started < 30
    printed = capsys.readouterr()
    assert "did not finish within --timeout 0.01 s" in printed.err
    assert "gate ERROR (exit 2): timeout" in printed.out
    _, cases, props = junit(junit_file)
    ((_, case),) = cases.items()
    error = case.find("error")
    assert error is not None and error.get("type") == "timeout"
    assert props["mode"] == "local"


def test_an_engine_error_is_a_gate_error_with_the_engines_code(
    images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not onnx")
    code = main(["gate", "--local", "--model", str(bad), "--images", str(images),
                 "--methods", METHODS, "--require", "gradient"])  # fmt: skip
    assert code == 2
    printed = capsys.readouterr()
    assert printed.err.startswith("error: ") and "Traceback" not in printed.err
    assert "gate ERROR (exit 2): model_load_error" in printed.out


@pytest.mark.parametrize("with_training_set", [False, True])
def test_tests_all_expands_as_a_service_expands_it(with_training_set: bool) -> None:
    from saliency_audit.service.api.audits import engine_spec
    from saliency_audit.workers.engine.spec import ANALYSES, TESTS, expand_tests

    body = {"methods": ["gradient"], "tests": "all"}
    if with_training_set:
        body["train_dataset_id"] = "d-1"
    expanded = expand_tests(["all"], training=with_training_set)
    assert expanded == list(engine_spec(body)["tests"])
    assert not set(expanded) & set(ANALYSES)
    assert ("data_randomization" in expanded) == with_training_set
    assert set(expanded) | set(ANALYSES) | {"data_randomization"} == set(TESTS)
    assert expand_tests(["cascading", "smprt"], training=False) == ["cascading", "smprt"]
