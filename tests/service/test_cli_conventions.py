"""The command line's conventions and its administration commands, on the embedded shape (a
SQLite file and an artifact folder under a temporary data directory): ``--version``, help text
on every option, ``--json``, ``keys list`` / ``revoke`` by key, prefix or id, ``tenants purge``
and ``store sweep``. In-process: no server, no torch."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from saliency_audit.service.artifacts import ArtifactStore
from saliency_audit.service.cli import build_parser, main
from saliency_audit.service.config import Config
from saliency_audit.service.db import Database
from saliency_audit.service.models import ModelRecord, Tenant
from tests.servers import REPO


@pytest.fixture
def embedded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Config]:
    """The environment of a fresh machine with its data under ``tmp_path``."""
    for name in list(os.environ):
        if name.startswith("SALIENCY_AUDIT_") or name in ("DATABASE_URL", "BROKER_URL"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("SALIENCY_AUDIT_DATA_DIR", str(tmp_path / "data"))
    config = Config.from_env()
    assert config.embedded
    yield config


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --- conventions -----------------------------------------------------------------------------


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"saliency-audit {declared}"


def _parsers(
    parser: argparse.ArgumentParser, path: str = "saliency-audit"
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _parsers(child, f"{path} {name}")


def test_every_option_of_every_command_has_help_text() -> None:
    seen = []
    undocumented = []
    for path, parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            seen.append(action)
            if not (action.help or "").strip() or action.help == argparse.SUPPRESS:
                undocumented.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
    assert not undocumented, undocumented
    assert len(seen) > 60  # the walk reached every sub-command


def test_json_is_offered_where_there_is_a_result_to_print() -> None:
    for path, parser in _parsers(build_parser()):
        name = path.removeprefix("saliency-audit ")
        if name in ("run", "gate", "methods", "policy", "keys list"):
            assert any("--json" in a.option_strings for a in parser._actions), path


def test_methods_and_policy_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    from saliency_audit.workers.engine.methods import METHODS
    from saliency_audit.workers.engine.policy import default_document
    from saliency_audit.workers.engine.spec import MEASURES

    code, out, _ = cli(capsys, "methods", "--json")
    assert code == 0
    listed = json.loads(out)
    assert [m["name"] for m in listed["methods"]] == list(METHODS)
    kinds = {m["name"]: m["kind"] for m in listed["methods"]}
    assert kinds["control_sobel"] == "control" and kinds["gradcam"] == "layer"
    assert kinds["gradient"] == "input"
    assert "cascading" in {t["name"] for t in listed["tests"]}
    assert listed["measures"] == list(MEASURES)
    code, text, _ = cli(capsys, "methods")
    assert all(m in text for m in METHODS)

    code, out, _ = cli(capsys, "policy", "--json")
    assert code == 0 and len(out.strip().splitlines()) == 1
    assert json.loads(out) == default_document()


# --- keys ------------------------------------------------------------------------------------


def test_keys_list_and_revoke_by_whole_key_prefix_or_id(
    embedded: Config, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = []
    for tenant, label in (("acme", "ci"), ("acme", "laptop"), ("globex", None), ("acme", "bot")):
        args = ["keys", "create", "--tenant", tenant] + (["--label", label] if label else [])
        code, out, _ = cli(capsys, *args)
        assert code == 0
        keys.append(out.strip())

    code, out, _ = cli(capsys, "keys", "list", "--json")
    assert code == 0
    rows = json.loads(out)
    assert [(r["tenant"], r["label"]) for r in rows] == [
        ("acme", "ci"),
        ("acme", "laptop"),
        ("acme", "bot"),
        ("globex", None),
    ]
    assert {r["prefix"] for r in rows} == {k.split("_")[1] for k in keys}
    assert not any(k.split("_", 2)[2] in out for k in keys)  # secrets are never listed
    by_prefix = {r["prefix"]: r for r in rows}
    code, out, _ = cli(capsys, "keys", "list", "--tenant", "globex")
    assert code == 0 and "globex" in out and "acme" not in out
    assert f"sak_{keys[2].split('_')[1]}" in out

    # the whole key, as the user holds it
    code, out, err = cli(capsys, "keys", "revoke", keys[0])
    assert code == 0, err
    assert by_prefix[keys[0].split("_")[1]]["id"] in out and keys[0] not in out
    # its id, as `keys list` shows it
    code, out, err = cli(capsys, "keys", "revoke", by_prefix[keys[1].split("_")[1]]["id"])
    assert code == 0, err
    # its prefix, as before
    code, out, err = cli(capsys, "keys", "revoke", keys[2].split("_")[1])
    assert code == 0, err

    code, out, _ = cli(capsys, "keys", "list", "--json")
    assert [r["label"] for r in json.loads(out)] == ["bot"]
    code, out, _ = cli(capsys, "keys", "list", "--all", "--json")
    revoked = {r["label"]: r["revoked_at"] is not None for r in json.loads(out)}
    assert revoked == {"ci": True, "laptop": True, None: True, "bot": False}

    # already revoked, a forged secret with a real prefix, nothing at all: errors
    code, _, err = cli(capsys, "keys", "revoke", keys[0])
    assert code == 2 and "no active key" in err and keys[0] not in err
    forged = keys[3].rsplit("_", 1)[0] + "_" + "x" * 43
    code, _, err = cli(capsys, "keys", "revoke", forged)
    assert code == 2 and forged not in err
    code, _, err = cli(capsys, "keys", "revoke", "nothing")
    assert code == 2 and "'nothing'" in err
    code, out, _ = cli(capsys, "keys", "list", "--json")
    assert [r["label"] for r in json.loads(out)] == ["bot"]


# --- tenants purge and store sweep -----------------------------------------------------------


def _add_model(config: Config, tenant: str, data: bytes) -> str:
    store = ArtifactStore(config.resolved_artifact_dir)
    sha = store.put_bytes(data)
    database = Database.from_config(config)
    with database.session() as session:
        tenant_id = session.query(Tenant.id).filter(Tenant.name == tenant).scalar()
        session.add(
            ModelRecord(
                tenant_id=tenant_id, name="m", format="onnx", sha256=sha, size_bytes=len(data)
            )
        )
    database.dispose()
    return sha


def test_tenants_purge_frees_the_tenants_files_and_keeps_the_others(
    embedded: Config, capsys: pytest.CaptureFixture[str]
) -> None:
    for tenant in ("acme", "globex"):
        assert cli(capsys, "keys", "create", "--tenant", tenant)[0] == 0
    mine = _add_model(embedded, "acme", secrets.token_bytes(2048))
    shared_bytes = secrets.token_bytes(1024)
    shared = _add_model(embedded, "acme", shared_bytes)
    assert _add_model(embedded, "globex", shared_bytes) == shared
    store = ArtifactStore(embedded.resolved_artifact_dir)

    code, out, err = cli(capsys, "tenants", "purge", "acme")
    assert code == 0, err
    deleted: dict[str, Any] = json.loads(out)
    assert deleted["models"] == 2 and deleted["files"] == 1 and deleted["bytes_freed"] == 2048
    assert not store.exists(mine) and store.exists(shared)  # globex still needs it
    code, out, _ = cli(capsys, "keys", "list", "--tenant", "acme", "--json")
    assert len(json.loads(out)) == 1  # the tenant and its key stay

    code, out, err = cli(capsys, "tenants", "purge", "acme", "--drop-tenant")
    assert code == 0, err
    assert json.loads(out)["models"] == 0
    code, out, _ = cli(capsys, "keys", "list", "--tenant", "acme", "--all", "--json")
    assert json.loads(out) == []
    code, out, err = cli(capsys, "tenants", "purge", "acme")
    assert code == 2 and out == "" and "no tenant 'acme'" in err


def test_store_sweep_removes_old_files_no_row_needs(
    embedded: Config, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(capsys, "keys", "create", "--tenant", "acme")[0] == 0
    needed = _add_model(embedded, "acme", secrets.token_bytes(512))
    store = ArtifactStore(embedded.resolved_artifact_dir)
    orphan = store.put_bytes(secrets.token_bytes(4096))
    young = store.put_bytes(secrets.token_bytes(256))
    two_hours_ago = time.time() - 7200
    for sha in (needed, orphan):
        os.utime(store.path(sha), (two_hours_ago, two_hours_ago))

    code, out, err = cli(capsys, "store", "sweep")
    assert code == 0, err
    assert json.loads(out)["files"] == 1 and json.loads(out)["bytes_freed"] == 4096
    assert [store.exists(sha) for sha in (needed, orphan, young)] == [True, False, True]
    code, out, _ = cli(capsys, "store", "sweep", "--older-than-s", "0")
    assert json.loads(out)["files"] == 1 and not store.exists(young)


# --- the explained class and the progress clock (pure text) ---------------------------------


def test_the_explained_class_shows_its_index_and_its_name_when_known() -> None:
    from saliency_audit.workers.reports.text import format_explained

    named = [
        {"name": f"img_{i:02d}.png", "target": i % 3, "target_name": ["cat", "dog", "owl"][i % 3],
         "predicted": i % 3, "probability": 0.9}
        for i in range(20)
    ]  # fmt: skip
    text = format_explained(named)
    rows = [line for line in text.splitlines() if line.startswith("img_")]
    assert len(rows) == 16 and rows[1].split()[1:3] == ["1", "(dog)"]
    assert "... and 4 more images" in text
    assert text.splitlines()[-1] == "explained classes: 0 (cat) x7, 1 (dog) x7, 2 (owl) x6"
    unnamed = [{"name": "a.png", "target": 10, "target_name": None, "predicted": 2,
                "probability": 0.25}]  # fmt: skip
    text = format_explained(unnamed)
    assert text.splitlines()[3].split() == ["a.png", "10", "2", "0.250"]
    assert text.splitlines()[-1] == "explained classes: 10 x1"


def test_the_eta_extrapolates_from_the_first_reading() -> None:
    from saliency_audit.workers.reports.text import ProgressClock, format_duration

    assert [format_duration(s) for s in (0, 59.6, 75.2, 3725)] == [
        "0:00",
        "1:00",
        "1:15",
        "1:02:05",
    ]
    clock = ProgressClock(now=0.0)
    assert clock.text(0.5, now=100.0) == "elapsed 1:40, ETA -"  # attached half done: no rate
    assert clock.text(0.75, now=130.0) == "elapsed 2:10, ETA 0:30"  # 25% in 30 s
    assert clock.text(1.0, now=131.0) == "elapsed 2:11, ETA 0:00"
