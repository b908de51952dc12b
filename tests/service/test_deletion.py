"""Deleting is real: rows go, and a file of the content-addressed store goes with the last row
that needs it, measured by the artifact directory's disk usage; finished audits keep a deleted
model or dataset as a tombstone unless the delete cascades; a tenant purge leaves every other
tenant's objects and files alone. PostgreSQL, Redis, a ``serve`` API process and, for audits,
a real worker."""

from __future__ import annotations

import io
import os
import secrets
import time
import zipfile
from collections.abc import Callable, Iterator
from typing import Any

import onnx
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from sqlalchemy import func, select

from saliency_audit.service import db as service_db
from saliency_audit.service import purge
from saliency_audit.service.artifacts import ArtifactStore
from saliency_audit.service.config import Config
from saliency_audit.service.db import Database
from saliency_audit.service.models import (
    Audit,
    AuditArtifact,
    DatasetFile,
    DatasetRecord,
    ModelRecord,
    ResultRow,
    VerdictRow,
)
from tests.servers import Api, Server, Worker, assert_problem, fast_lifecycle, new_key
from tests.service.test_end_to_end import DIGITS_MODEL, REFERENCE


# This module measures the artifact directory's disk usage, so it runs on an artifact store
# and queues of its own: audits other modules leave queued (on the session's shared queues)
# never run here and write their reports into the store mid-measurement.
@pytest.fixture(scope="module")
def pg_config(pg_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Config:
    config = Config(
        data_dir=tmp_path_factory.mktemp("pg-deletion"),
        database_url=pg_url,
        broker_url=redis_url,
        queue=f"gpu-deletion-{secrets.token_hex(3)}",
        cpu_queue=f"cpu-deletion-{secrets.token_hex(3)}",
        **fast_lifecycle(),
    )
    service_db.upgrade(config.resolved_database_url)
    return config


@pytest.fixture(scope="module")
def pg_database(pg_config: Config) -> Iterator[Database]:
    database = Database.from_config(pg_config)
    yield database
    database.dispose()


def unique_model() -> bytes:
    """The digits CNN with a random doc string: the same graph, bytes no other test uploads."""
    model = onnx.load_from_string(DIGITS_MODEL.read_bytes())
    model.doc_string = secrets.token_hex(16)
    return model.SerializeToString()


def unique_images(count: int = 4) -> bytes:
    """A zip of digit images no other test (or earlier run) uploads, down to their pixels: four
    pixels of each are set at random, so the maps, heatmaps and reports drawn from them are this
    test's own too (a file stays while any row in the database names it, and the database is
    shared by every test module); each also carries a random text chunk."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted((REFERENCE / "digits_images").glob("*.png"))[:count]:
            nonce = PngInfo()
            nonce.add_text("nonce", secrets.token_hex(8))
            image = Image.open(path)
            image.load()
            for corner in ((0, 0), (0, 1), (1, 0), (1, 1)):
                image.putpixel(corner, _random_pixel(image.mode))
            png = io.BytesIO()
            image.save(png, "PNG", pnginfo=nonce)
            archive.writestr(path.name, png.getvalue())
    return buffer.getvalue()


def _random_pixel(mode: str) -> int | tuple[int, ...]:
    bands = len(mode) if mode in ("RGB", "RGBA") else 1
    values = tuple(secrets.randbelow(256) for _ in range(bands))
    return values[0] if bands == 1 else values


def store_of(config: Config) -> ArtifactStore:
    return ArtifactStore(config.resolved_artifact_dir)


def disk_usage(config: Config) -> int:
    return sum(stat.st_size for _, stat in store_of(config).stored())


def upload(api: Api, kind: str, data: bytes) -> dict[str, Any]:
    name = "model.onnx" if kind == "models" else "images.zip"
    response = api.post(f"/v1/{kind}", files={"file": (name, data)})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def dataset_files(api: Api, dataset_id: str) -> set[str]:
    return {image["sha256"] for image in api.get(f"/v1/datasets/{dataset_id}").json()["images"]}


def stored(config: Config, files: set[str]) -> set[str]:
    store = store_of(config)
    return {sha for sha in files if store.exists(sha)}


def test_deleting_a_dataset_or_model_frees_its_files_and_rows(
    pg_config: Config, pg_server: Server, pg_database: Database
) -> None:
    api = Api(pg_server.url, new_key(pg_database))
    before = disk_usage(pg_config)
    dataset = upload(api, "datasets", unique_images(6))
    model = upload(api, "models", unique_model())
    images = dataset_files(api, dataset["id"])
    assert len(images) == 6 and stored(pg_config, images | {model["sha256"]}) == images | {
        model["sha256"]
    }
    assert disk_usage(pg_config) > before

    assert api.delete(f"/v1/datasets/{dataset['id']}").status_code == 204
    assert api.delete(f"/v1/models/{model['id']}").status_code == 204
    assert disk_usage(pg_config) == before
    assert stored(pg_config, images | {model["sha256"]}) == set()
    with pg_database.session() as session:
        assert session.get(DatasetRecord, dataset["id"]) is None
        assert session.get(ModelRecord, model["id"]) is None
        assert not session.scalars(
            select(DatasetFile).where(DatasetFile.dataset_id == dataset["id"])
        ).all()
    assert_problem(api.get(f"/v1/datasets/{dataset['id']}"), 404, "not_found")
    assert_problem(api.delete(f"/v1/models/{model['id']}"), 404, "not_found")
    assert_problem(api.delete("/v1/models/x?cascade=maybe"), 400, "invalid_parameter")


def test_a_file_two_tenants_share_stays_until_the_last_one_deletes_it(
    pg_config: Config, pg_server: Server, pg_database: Database
) -> None:
    first = Api(pg_server.url, new_key(pg_database))
    second = Api(pg_server.url, new_key(pg_database))
    archive, weights = unique_images(), unique_model()
    mine = [upload(first, "datasets", archive), upload(first, "models", weights)]
    theirs = [upload(second, "datasets", archive), upload(second, "models", weights)]
    files = dataset_files(first, mine[0]["id"]) | {mine[1]["sha256"]}
    usage = disk_usage(pg_config)

    assert first.delete(f"/v1/datasets/{mine[0]['id']}").status_code == 204
    assert first.delete(f"/v1/models/{mine[1]['id']}").status_code == 204
    assert stored(pg_config, files) == files and disk_usage(pg_config) == usage
    assert second.get(f"/v1/datasets/{theirs[0]['id']}").status_code == 200
    assert second.get(f"/v1/models/{theirs[1]['id']}").status_code == 200

    assert second.delete(f"/v1/datasets/{theirs[0]['id']}").status_code == 204
    assert second.delete(f"/v1/models/{theirs[1]['id']}").status_code == 204
    assert stored(pg_config, files) == set()


def test_uploading_deleted_bytes_again_makes_a_new_live_object(
    pg_server: Server, pg_database: Database
) -> None:
    api = Api(pg_server.url, new_key(pg_database))
    for kind, data in (("models", unique_model()), ("datasets", unique_images())):
        old = upload(api, kind, data)
        assert api.delete(f"/v1/{kind}/{old['id']}").status_code == 204
        new = upload(api, kind, data)  # 201: not the deleted row brought back
        assert new["id"] != old["id"] and new["sha256"] == old["sha256"]
        assert api.get(f"/v1/{kind}/{new['id']}").status_code == 200
        assert [item["id"] for item in api.get(f"/v1/{kind}").json()["items"]] == [new["id"]]
        assert_problem(api.get(f"/v1/{kind}/{old['id']}"), 404, "not_found")


def _submit(api: Api, model_id: str, dataset_id: str, seed: int) -> str:
    response = api.post(
        "/v1/audits",
        json={
            "model_id": model_id,
            "dataset_id": dataset_id,
            "methods": ["gradient"],
            "tests": ["cascading"],
            "seed": seed,
        },
    )
    assert response.status_code == 202, response.text
    audit_id: str = response.json()["id"]
    return audit_id


def _audit_files(database: Database, audit_id: str) -> set[str]:
    with database.session() as session:
        return purge.audit_files(session, [audit_id])


def _rows(database: Database, audit_id: str) -> int:
    with database.session() as session:
        return sum(
            session.scalar(select(func.count()).select_from(t).where(t.audit_id == audit_id)) or 0
            for t in (ResultRow, VerdictRow, AuditArtifact)
        ) + (1 if session.get(Audit, audit_id) is not None else 0)


def test_audits_keep_a_deleted_model_as_evidence_until_they_are_deleted(
    pg_config: Config,
    pg_server: Server,
    pg_database: Database,
    worker_factory: Callable[[Config], Worker],
) -> None:
    worker_factory(pg_config)
    api = Api(pg_server.url, new_key(pg_database))
    before = disk_usage(pg_config)
    weights = unique_model()
    model = upload(api, "models", weights)
    dataset = upload(api, "datasets", unique_images())
    first = _submit(api, model["id"], dataset["id"], seed=1)
    second = _submit(api, model["id"], dataset["id"], seed=2)
    for audit_id in (first, second):
        assert api.wait(audit_id)["state"] == "succeeded"
    for _ in range(400):  # the documents render on the CPU queue after success
        if api.get(f"/v1/audits/{first}").json()["documents_state"] == "ready":
            break
        time.sleep(0.3)
    assert api.get(f"/v1/audits/{first}/report.pdf").status_code == 200
    first_files, second_files = (_audit_files(pg_database, a) for a in (first, second))
    with pg_database.session() as session:
        kinds = set(
            session.scalars(select(AuditArtifact.kind).where(AuditArtifact.audit_id == first))
        )
    assert {"report_json", "maps_npz", "heatmap_png", "report_pdf", "report_html"} <= kinds
    # the trained model's maps do not depend on the seed: both audits share those PNGs
    assert first_files & second_files
    usage = disk_usage(pg_config)

    # a finished audit: DELETE deletes it, with the files no other audit shares
    assert api.delete(f"/v1/audits/{first}").status_code == 204
    assert _rows(pg_database, first) == 0
    assert_problem(api.get(f"/v1/audits/{first}"), 404, "not_found")
    assert stored(pg_config, first_files) == first_files & second_files
    assert disk_usage(pg_config) < usage

    # the model goes, the audit that used it keeps its report and the model as a tombstone
    assert api.delete(f"/v1/models/{model['id']}").status_code == 204
    assert stored(pg_config, {model["sha256"]}) == set()
    assert_problem(api.get(f"/v1/models/{model['id']}"), 404, "not_found")
    assert api.get(f"/v1/audits/{second}/report.json").status_code == 200
    with pg_database.session() as session:
        tombstone = session.get(ModelRecord, model["id"])
        assert tombstone is not None and tombstone.deleted_at is not None
    again = upload(api, "models", weights)
    assert again["id"] != model["id"]
    assert api.delete(f"/v1/models/{again['id']}").status_code == 204

    # the dataset with cascade: its audits go too, and the tombstone with the last of them
    assert api.delete(f"/v1/datasets/{dataset['id']}?cascade=true").status_code == 204
    assert_problem(api.get(f"/v1/audits/{second}"), 404, "not_found")
    assert _rows(pg_database, second) == 0
    with pg_database.session() as session:
        assert session.get(ModelRecord, model["id"]) is None
        assert session.get(DatasetRecord, dataset["id"]) is None
    assert stored(pg_config, first_files | second_files) == set()
    assert disk_usage(pg_config) == before


def test_purging_a_tenant_leaves_every_other_tenant_alone(
    pg_config: Config, pg_server: Server, pg_database: Database
) -> None:
    tenant = f"tenant-{secrets.token_hex(4)}"
    purged = Api(pg_server.url, new_key(pg_database, tenant))
    other = Api(pg_server.url, new_key(pg_database))
    shared, own = unique_images(), unique_model()
    kept = [upload(other, "datasets", shared), upload(other, "models", unique_model())]
    gone_dataset = upload(purged, "datasets", shared)
    gone_model = upload(purged, "models", own)
    queued = _submit(purged, gone_model["id"], gone_dataset["id"], seed=3)  # no worker here
    shared_files = dataset_files(other, kept[0]["id"])
    usage = disk_usage(pg_config)

    deleted = purge.purge_tenant(pg_database, store_of(pg_config), tenant)
    assert (deleted.audits, deleted.models, deleted.datasets) == (1, 1, 1)
    assert deleted.files == 1 and deleted.bytes_freed == len(own)
    assert disk_usage(pg_config) == usage - len(own)
    assert stored(pg_config, shared_files | {kept[1]["sha256"]}) == shared_files | {
        kept[1]["sha256"]
    }
    for kind, row in zip(("datasets", "models"), kept, strict=True):
        assert other.get(f"/v1/{kind}/{row['id']}").status_code == 200
    assert_problem(purged.get(f"/v1/audits/{queued}"), 404, "not_found")
    assert purged.get("/v1/models").json()["total"] == 0  # the key still works


def test_the_orphan_sweep_removes_old_unreferenced_files_only(
    pg_config: Config, pg_server: Server, pg_database: Database
) -> None:
    """What soft deletion left behind before real deletion, and files a purged audit's worker
    wrote: removed once older than the grace period; a file a row needs is never removed."""
    api = Api(pg_server.url, new_key(pg_database))
    store = store_of(pg_config)
    needed = upload(api, "models", unique_model())["sha256"]
    orphan = store.put_bytes(secrets.token_bytes(4096))
    young = store.put_bytes(secrets.token_bytes(4096))
    an_hour_ago = time.time() - 7200
    for sha in (needed, orphan):
        os.utime(store.path(sha), (an_hour_ago, an_hour_ago))

    deleted = purge.remove_orphan_files(pg_database, store, older_than_s=3600)
    assert stored(pg_config, {needed, orphan, young}) == {needed, young}
    assert deleted.files >= 1 and deleted.bytes_freed >= 4096
    store.delete(young)


def test_deletion_on_sqlite_counts_references_across_tenants(tmp_path: Any) -> None:
    """The embedded shape: the partial unique index, dataset_files and the reference query on
    SQLite; two tenants' datasets share an image, a tombstone and a live row share bytes."""
    from saliency_audit.service import db as service_db
    from saliency_audit.service.models import Tenant

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    service_db.upgrade(url)
    database, store = Database(url), ArtifactStore(tmp_path / "artifacts")
    shared, mine, weights = (store.put_bytes(secrets.token_bytes(1000)) for _ in range(3))

    def dataset(tenant: str, files: list[str]) -> DatasetRecord:
        images = [{"name": f"{i}.png", "sha256": sha} for i, sha in enumerate(files)]
        return DatasetRecord(
            tenant_id=tenant,
            name="d",
            sha256=secrets.token_hex(32),
            size_bytes=1,
            n_images=len(images),
            manifest={"images": images},
        )

    with database.session() as session:
        session.add_all([Tenant(id="a", name="a"), Tenant(id="b", name="b")])
        session.flush()
        session.add_all([dataset("a", [shared, mine]), dataset("b", [shared])])
        old = ModelRecord(tenant_id="a", name="m", format="onnx", sha256=weights, size_bytes=1000)
        session.add(old)
        session.flush()
        old.deleted_at = old.created_at  # a tombstone: the same bytes may be uploaded again
        session.add(
            ModelRecord(tenant_id="a", name="m", format="onnx", sha256=weights, size_bytes=1000)
        )
    with database.session() as session:
        assert session.scalar(select(func.count()).select_from(DatasetFile)) == 3
        assert purge.referenced(session, [shared, mine, weights]) == {shared, mine, weights}

    deleted = purge.purge_tenant(database, store, "a")
    assert (deleted.models, deleted.datasets, deleted.files) == (2, 1, 2)
    assert {sha for sha in (shared, mine, weights) if store.exists(sha)} == {shared}
    database.dispose()


def test_revision_0005_indexes_the_files_of_live_datasets_only(tmp_path: Any) -> None:
    """Datasets soft-deleted before real deletion become tombstones: their images are left
    out of dataset_files, so the orphan sweep may remove them."""
    from sqlalchemy import create_engine, text

    from saliency_audit.service import db as service_db

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    service_db.upgrade(url, "0004")
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO tenants (id, name, created_at) VALUES ('t', 't', '2026-01-01')")
        )
        for dataset_id, deleted in (("live", None), ("gone", "2026-01-01 00:00:00")):
            manifest = (
                f'{{"images": [{{"name": "x.png", "sha256": "{dataset_id[0] * 64}", '
                f'"mask_sha256": "{dataset_id[1] * 64}"}}]}}'
            )
            conn.execute(
                text(
                    "INSERT INTO datasets (id, tenant_id, name, sha256, size_bytes, n_images,"
                    " labeled, has_masks, has_boxes, manifest, created_at, deleted_at) VALUES"
                    " (:id, 't', 'd', :sha, 1, 1, 0, 1, 0, :manifest, '2026-01-01', :deleted)"
                ),
                {
                    "id": dataset_id,
                    "sha": dataset_id[0] * 64,
                    "manifest": manifest,
                    "deleted": deleted,
                },
            )
    service_db.upgrade(url)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT dataset_id, sha256 FROM dataset_files")).all()
    engine.dispose()
    assert sorted(rows) == [("live", "i" * 64), ("live", "l" * 64)]
