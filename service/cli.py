"""``saliency-audit``: the command line.

The parser for every command, and one small handler per command that imports what the command
needs when it runs: ``serve`` loads neither torch nor the HTTP client, ``run`` is
:mod:`saliency_audit.workers.local` (the engine, beside the worker task it mirrors) and ``gate`` is
:mod:`saliency_audit.service.gate` (the client).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from .arguments import (
    add_gate_arguments,
    add_images_argument,
    add_json_argument,
    add_stages_argument,
    csv_list,
    report_formats,
)

EXIT_OK = 0
EXIT_ERROR = 2
PACKAGE = "saliency-audit"


def package_version() -> str:
    """The installed distribution's version (pyproject.toml's ``version``)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(PACKAGE)
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saliency-audit",
        description="Audit whether saliency methods depend on what an image classifier learned.",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s {package_version()}",
        help="print the version of saliency-audit and exit",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run",
        help="compute saliency maps for a model and an image folder locally; write report.json",
        description=(
            "Compute every requested saliency method (plus the control_sobel and "
            "control_random controls) on the images, check an ONNX model's converted graph "
            "against ONNX Runtime, run the requested sanity checks, decide a PASS / FAIL / "
            "INCONCLUSIVE verdict per (method, test) with the policy, and write "
            "DIR/report.json and DIR/maps.npz."
        ),
    )
    run.add_argument("--model", required=True, type=Path, help="ONNX file, or weights with --arch")
    run.add_argument(
        "--arch",
        default=None,
        help="the architecture of a weights file: a torchvision name (e.g. resnet18), or "
        "timm:NAME for a timm model (e.g. timm:convnext_atto, timm:resnet18.a1_in1k; needs "
        "pip install 'saliency-audit[timm]'; the input size, mean, std and interpolation "
        "default to timm's pretrained_cfg); --model is then a .safetensors file or a state "
        "dict saved with torch.save",
    )
    add_images_argument(run, required=True)
    run.add_argument(
        "--methods",
        type=csv_list,
        default=None,
        help="comma-separated method names (default: all; see `saliency-audit methods`)",
    )
    run.add_argument(
        "--layer", default=None, help="module name for CAM methods (default: last conv)"
    )
    run.add_argument(
        "--layers",
        type=csv_list,
        default=None,
        help="module names the `layers` analysis explains (default: the output of every block)",
    )
    run.add_argument(
        "--masks",
        type=Path,
        default=None,
        help="folder of ground-truth object masks (one per image, same file stem, nonzero = "
        "object): the `layers` analysis then scores localization (IoU, pointing game)",
    )
    run.add_argument(
        "--adaptive",
        nargs="?",
        type=int,
        const=32,
        default=None,
        metavar="ROUND",
        help="add images in rounds of ROUND (default 32) in a seeded random order and stop when "
        "every verdict is decided, on an anytime-valid 95%% confidence sequence "
        "(docs/policy.md); the report says how many images were used and why it stopped",
    )
    run.add_argument(
        "--max-images",
        type=int,
        default=None,
        metavar="N",
        help="with --adaptive: use at most N images (default: every image given)",
    )
    run.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    run.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="images per forward/backward pass (default 16; lower it when memory runs out)",
    )
    run.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    run.add_argument(
        "--input-spec",
        type=Path,
        default=None,
        help="JSON file overriding input spec fields (height, width, layout, mean, std, "
        "value_range, class_names, channels)",
    )
    run.add_argument(
        "--params",
        type=Path,
        default=None,
        help="JSON file of method parameters (ig_steps, noise_samples, noise_level, "
        "lrp_composite, ...)",
    )
    run.add_argument(
        "--tests",
        type=csv_list,
        default=["cascading"],
        help="comma-separated tests (default: cascading; 'none' for maps only; 'all' for every "
        "sanity check; 'layers' for the per-layer heatmap analysis; see `saliency-audit "
        "methods`)",
    )
    run.add_argument(
        "--granularity",
        choices=("block", "module"),
        default="block",
        help="stages of the model randomization tests: one per child block of the model "
        "(default) or one per parameterized module",
    )
    add_stages_argument(run, "rule")
    run.add_argument(
        "--measures",
        type=csv_list,
        default=None,
        help="similarity measures to score (default: all)",
    )
    run.add_argument(
        "--policy",
        type=Path,
        default=None,
        help="verdict policy JSON file (default: the shipped policy; `saliency-audit policy` "
        'prints it); a file with "extends": "default" overrides entries of the default',
    )
    run.add_argument(
        "--train",
        type=Path,
        default=None,
        help="labeled training set for data_randomization: one sub-folder of images per class",
    )
    run.add_argument(
        "--random-label-model",
        type=Path,
        default=None,
        help="for data_randomization: the same architecture already trained on random labels "
        "(ONNX, or weights with --arch), compared with --model instead of training here",
    )
    run.add_argument(
        "--train-recipe",
        type=Path,
        default=None,
        help="JSON file overriding the data randomization training recipe (target_accuracy, "
        "max_epochs, max_seconds, batch_size, learning_rate)",
    )
    run.add_argument("--out", type=Path, default=Path("out"), help="output folder (default ./out)")
    run.add_argument(
        "--report",
        type=report_formats,
        default=[],
        metavar="pdf,html",
        help="also write the reports the service serves: DIR/report.pdf and/or DIR/report.html "
        "(comma-separated formats)",
    )
    run.add_argument(
        "--quiet", action="store_true", help="no progress lines (elapsed time and ETA)"
    )
    add_json_argument(
        run, "report.json's content on stdout instead of the tables (notes go to stderr)"
    )
    add_method_plugin_argument(run)

    methods = sub.add_parser(
        "methods", help="list the saliency methods, tests and similarity measures"
    )
    add_json_argument(methods, "the methods, tests and measures as one JSON object")
    policy = sub.add_parser("policy", help="print the default verdict policy (JSON)")
    add_json_argument(policy, "the policy document compact, on one line")

    serve = sub.add_parser(
        "serve",
        help="run the HTTP API (with no configuration: embedded SQLite, artifact folder and a "
        "worker process that needs no broker server)",
    )
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)"
    )
    serve.add_argument(
        "--port",
        type=int,
        default=8000,
        help="port to listen on (default 8000; 0 picks a free one)",
    )
    serve.add_argument("--threads", type=int, default=8, help="request threads (default 8)")
    worker_flag = serve.add_mutually_exclusive_group()
    worker_flag.add_argument(
        "--worker",
        dest="with_worker",
        action="store_true",
        default=None,
        help="start a worker process beside the API (the default in embedded mode)",
    )
    worker_flag.add_argument(
        "--no-worker", dest="with_worker", action="store_false", help="the API alone"
    )

    keys = sub.add_parser("keys", help="API keys").add_subparsers(
        dest="keys_command", required=True
    )
    create = keys.add_parser("create", help="create a key for a tenant (created if new); prints it")
    create.add_argument("--tenant", required=True, help="tenant name (created if new)")
    create.add_argument("--label", default=None, help="a note to recognize the key by later")
    listing = keys.add_parser(
        "list", help="list the keys (id, tenant, prefix, label, created, revoked); never secrets"
    )
    listing.add_argument("--tenant", default=None, help="only this tenant's keys")
    listing.add_argument(
        "--all", action="store_true", help="revoked keys too (default: active keys only)"
    )
    add_json_argument(listing, "the keys as a JSON list")
    revoke = keys.add_parser(
        "revoke", help="revoke a key given in full (sak_...), by its prefix or by its id"
    )
    revoke.add_argument(
        "key",
        metavar="KEY_OR_ID",
        help="the whole key sak_PREFIX_SECRET, its PREFIX, or its id (from `keys list`)",
    )
    secret = keys.add_parser(
        "webhook-secret",
        help="print the tenant's webhook signing secret (created if it has none)",
    )
    secret.add_argument("--tenant", required=True, help="tenant name")
    secret.add_argument("--rotate", action="store_true", help="replace it with a new one")

    database = sub.add_parser("db", help="database schema (Alembic migrations)")
    db_sub = database.add_subparsers(dest="db_command", required=True)
    upgrade = db_sub.add_parser("upgrade", help="migrate to a revision (default: head)")
    upgrade.add_argument(
        "revision", nargs="?", default="head", help="Alembic revision (default: head)"
    )
    downgrade = db_sub.add_parser("downgrade", help="migrate down to a revision (e.g. base)")
    downgrade.add_argument("revision", help="Alembic revision, or base for an empty schema")
    db_sub.add_parser("current", help="print the current revision")

    reconcile = sub.add_parser(
        "reconcile",
        help="re-enqueue audits whose broker message was lost or whose worker died",
    )
    reconcile.add_argument("--once", action="store_true", help="one pass, then exit")
    reconcile.add_argument(
        "--interval", type=float, default=None, help="seconds between passes (default: config)"
    )

    tenants = sub.add_parser("tenants", help="tenant administration").add_subparsers(
        dest="tenants_command", required=True
    )
    purge = tenants.add_parser(
        "purge",
        help="delete every audit, model and dataset of a tenant and the files no other tenant "
        "needs; prints what went (JSON)",
    )
    purge.add_argument("tenant", metavar="TENANT", help="tenant name")
    purge.add_argument(
        "--drop-tenant",
        action="store_true",
        help="delete the tenant and its API keys too (default: they stay)",
    )
    store = sub.add_parser("store", help="artifact store maintenance").add_subparsers(
        dest="store_command", required=True
    )
    sweep = store.add_parser(
        "sweep",
        help="remove the store's files that no row needs (left by older deletions or by a "
        "purged audit's worker); prints what went (JSON)",
    )
    sweep.add_argument(
        "--older-than-s",
        type=float,
        default=3600.0,
        help="only files older than this many seconds (default 3600): younger ones may belong "
        "to an upload or audit not committed yet",
    )

    gate = sub.add_parser(
        "gate",
        help="release gate for CI: audit a model on a running service or here (--local); exit "
        "0 PASS, 1 FAIL, 2 error / timeout / INCONCLUSIVE",
        description=(
            "Upload a model and images to a saliency-audit service (or reuse what it already "
            "holds, found by sha256), run an audit with an idempotency key derived from the "
            "files and the request (a re-run attaches to the same audit) and wait with a "
            "progress bar; or, with --local, run the same audit in this process (no service, "
            "no key). Then print how many images and which classes were audited and the "
            "verdict table, and exit 0 when every --require-d method PASSes every test, 1 when "
            "one FAILs, 2 on an error, a timeout or an INCONCLUSIVE verdict (see "
            "--inconclusive)."
        ),
    )
    add_gate_arguments(gate)
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    from saliency_audit.workers.local import run_local

    return run_local(args)


def cmd_gate(args: argparse.Namespace) -> int:
    from .gate import run_gate

    if (
        args.local
    ):  # the engine, in this process (saliency_audit.workers.local imports torch when it runs)
        from saliency_audit.workers.local import audit_for_gate

        return run_gate(args, audit_here=audit_for_gate)
    return run_gate(args)


def add_method_plugin_argument(run: argparse.ArgumentParser) -> None:
    """``run --method-plugin module:callable[=name]``: your own explainer, audited by name."""
    run.add_argument(
        "--method-plugin",
        dest="method_plugins",
        action="append",
        default=[],
        metavar="MODULE:CALLABLE[=NAME]",
        help="audit your own explainer, a callable (model, inputs, targets) -> maps, like a "
        "built-in method under NAME (default: the callable's name); repeatable; the module is "
        "imported from the Python path",
    )


def cmd_methods(args: argparse.Namespace) -> int:
    from saliency_audit.workers.engine.methods import METHODS
    from saliency_audit.workers.engine.methods.plugins import is_plugin, load_entry_point_explainers
    from saliency_audit.workers.engine.sanity import TEST_INFO
    from saliency_audit.workers.engine.spec import MEASURES

    load_entry_point_explainers()  # what the operator installed for the workers

    def kind(info: Any) -> str:
        if is_plugin(info):
            return "plugin"
        return "control" if info.is_control else ("layer" if info.needs_conv_layer else "input")

    if args.json:
        document = {
            "methods": [
                {"name": name, "kind": kind(info), "reference": info.reference}
                for name, info in METHODS.items()
            ],
            "tests": [{"name": name, "reference": t.reference} for name, t in TEST_INFO.items()],
            "measures": list(MEASURES),
        }
        print(json.dumps(document, indent=2))
        return EXIT_OK
    print("methods:")
    for name, info in METHODS.items():
        print(f"  {name:<22}{kind(info):<9}{info.reference}")
    print("tests (--tests):")
    for name, test in TEST_INFO.items():
        print(f"  {name:<22}{test.reference}")
    print("similarity measures (--measures): " + ", ".join(MEASURES))
    return EXIT_OK


def cmd_policy(args: argparse.Namespace) -> int:
    from saliency_audit.workers.engine.policy import default_document

    print(json.dumps(default_document(), indent=None if args.json else 2))
    return EXIT_OK


def _config() -> Any:
    from .config import Config, ConfigError

    try:
        return Config.from_env()
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from .embedded import serve

    config = _config()
    logging.basicConfig(
        level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return serve(config, args.host, args.port, args.with_worker, args.threads)


def _database(config: Any) -> Any:
    """The configured database, migrated first when embedded: the SQLite file may not exist
    yet (keys and purges may come before the first ``serve``)."""
    from .db import Database

    if config.embedded:
        from . import db

        db.upgrade(config.resolved_database_url)
    return Database.from_config(config)


def _find_key(session: Any, given: str) -> Any:
    """The API key row ``given`` names: the whole key (its hash must match), its prefix, or
    its id; None when none matches."""
    import hmac

    from sqlalchemy import select

    from .auth import KEY_SCHEME, hash_key
    from .models import ApiKey

    parts = given.split("_", 2)
    if len(parts) == 3 and parts[0] == KEY_SCHEME:
        row = session.scalars(select(ApiKey).where(ApiKey.prefix == parts[1])).one_or_none()
        if row is None or not hmac.compare_digest(row.key_sha256, hash_key(given)):
            return None
        return row
    return session.scalars(
        select(ApiKey).where(ApiKey.prefix == given)
    ).one_or_none() or session.get(ApiKey, given)


def _key_rows(session: Any, tenant: str | None, include_revoked: bool) -> list[dict[str, Any]]:
    from sqlalchemy import select

    from .models import ApiKey, Tenant

    query = select(ApiKey, Tenant.name).join(Tenant, Tenant.id == ApiKey.tenant_id)
    if tenant is not None:
        query = query.where(Tenant.name == tenant)
    if not include_revoked:
        query = query.where(ApiKey.revoked_at.is_(None))
    query = query.order_by(Tenant.name, ApiKey.created_at, ApiKey.id)
    return [
        {
            "id": key.id,
            "tenant": name,
            "tenant_id": key.tenant_id,
            "prefix": key.prefix,
            "label": key.label,
            "created_at": key.created_at.isoformat(),
            "revoked_at": key.revoked_at.isoformat() if key.revoked_at else None,
        }
        for key, name in session.execute(query)
    ]


def cmd_keys(args: argparse.Namespace) -> int:
    from .auth import create_key
    from .models import utcnow

    database = _database(_config())
    with database.session() as session:
        if args.keys_command == "create":
            key, tenant = create_key(session, args.tenant, args.label)
            print(key)
            print(
                f"(tenant {tenant.name}, id {tenant.id}; the key is shown only now)",
                file=sys.stderr,
            )
            return EXIT_OK
        if args.keys_command == "list":
            rows = _key_rows(session, args.tenant, args.all)
            if args.json:
                print(json.dumps(rows, indent=2))
                return EXIT_OK
            header = f"{'id':<34}{'tenant':<20}{'prefix':<14}{'created':<22}{'revoked':<22}label"
            print(header)
            print("-" * len(header))
            for row in rows:
                print(
                    f"{row['id']:<34}{row['tenant']:<20}{'sak_' + row['prefix']:<14}"
                    f"{row['created_at'][:19]:<22}{(row['revoked_at'] or '-')[:19]:<22}"
                    f"{row['label'] or ''}"
                )
            return EXIT_OK
        if args.keys_command == "webhook-secret":
            from sqlalchemy import select

            from .models import Tenant
            from .webhooks import new_secret

            found = session.scalars(select(Tenant).where(Tenant.name == args.tenant)).first()
            if found is None:
                print(f"error: no tenant {args.tenant!r}", file=sys.stderr)
                return EXIT_ERROR
            if found.webhook_secret is None or args.rotate:
                found.webhook_secret = new_secret()
            print(found.webhook_secret)
            return EXIT_OK
        row = _find_key(session, args.key)
        # never echo a whole key back: it is a secret even when it is wrong
        shown = "the given key" if args.key.startswith("sak_") else repr(args.key)
        if row is None or row.revoked_at is not None:
            print(f"error: no active key matches {shown}", file=sys.stderr)
            return EXIT_ERROR
        row.revoked_at = utcnow()
        revoked = f"revoked key {row.id} (prefix {row.prefix})"
    print(revoked)
    return EXIT_OK


def cmd_tenants(args: argparse.Namespace) -> int:
    from .artifacts import ArtifactStore
    from .purge import purge_tenant

    config = _config()
    try:
        deleted = purge_tenant(
            _database(config),
            ArtifactStore(config.resolved_artifact_dir),
            args.tenant,
            drop_tenant=args.drop_tenant,
        )
    except LookupError as exc:
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return EXIT_ERROR
    print(json.dumps(deleted.to_dict()))
    return EXIT_OK


def cmd_store(args: argparse.Namespace) -> int:
    from .artifacts import ArtifactStore
    from .purge import remove_orphan_files

    config = _config()
    deleted = remove_orphan_files(
        _database(config), ArtifactStore(config.resolved_artifact_dir), args.older_than_s
    )
    print(json.dumps(deleted.to_dict()))
    return EXIT_OK


def cmd_db(args: argparse.Namespace) -> int:
    from . import db

    url = _config().resolved_database_url
    if args.db_command == "upgrade":
        db.upgrade(url, args.revision)
    elif args.db_command == "downgrade":
        db.downgrade(url, args.revision)
    print(f"database at revision {db.current_revision(url) or 'base'}")
    return EXIT_OK


def cmd_reconcile(args: argparse.Namespace) -> int:
    import logging

    from .db import Database
    from .jobs import Enqueuer, broker_probe, reconcile

    config = _config()
    logging.basicConfig(
        level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    database = Database.from_config(config)
    enqueue = Enqueuer(config)
    probe = broker_probe(config)
    interval = args.interval if args.interval is not None else config.reconcile_interval_s
    while True:
        report = reconcile(database, enqueue, probe)
        print(json.dumps(report.to_dict()), flush=True)
        if args.once:
            return EXIT_OK
        time.sleep(interval)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {
        "run": cmd_run,
        "methods": cmd_methods,
        "policy": cmd_policy,
        "serve": cmd_serve,
        "keys": cmd_keys,
        "db": cmd_db,
        "reconcile": cmd_reconcile,
        "gate": cmd_gate,
        "tenants": cmd_tenants,
        "store": cmd_store,
    }
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
