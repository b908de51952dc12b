"""``saliency-audit``: the command line.

The parser for every command, and one small handler per command that imports what the command
needs when it runs: ``serve`` loads neither torch nor the HTTP client, ``run`` is
:mod:`workers.local` (the engine, beside the worker task it mirrors) and ``gate`` is
:mod:`service.gate` (the client).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from .arguments import add_gate_arguments, csv_list

EXIT_OK = 0
EXIT_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saliency-audit",
        description="Audit whether saliency methods depend on what an image classifier learned.",
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
        help="torchvision architecture name (e.g. resnet18); --model is then a .safetensors "
        "file or a state dict saved with torch.save",
    )
    run.add_argument("--images", required=True, type=Path, help="folder of images")
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
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--batch-size", type=int, default=16)
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
    run.add_argument("--quiet", action="store_true", help="no progress lines")
    add_method_plugin_argument(run)

    sub.add_parser("methods", help="list the saliency methods, tests and similarity measures")
    sub.add_parser("policy", help="print the default verdict policy (JSON)")

    serve = sub.add_parser(
        "serve",
        help="run the HTTP API (with no configuration: embedded SQLite, artifact folder and a "
        "worker process that needs no broker server)",
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000, help="0 picks a free port")
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
    create.add_argument("--tenant", required=True)
    create.add_argument("--label", default=None)
    revoke = keys.add_parser("revoke", help="revoke a key by its prefix (sak_PREFIX_...)")
    revoke.add_argument("prefix")
    secret = keys.add_parser(
        "webhook-secret",
        help="print the tenant's webhook signing secret (created if it has none)",
    )
    secret.add_argument("--tenant", required=True)
    secret.add_argument("--rotate", action="store_true", help="replace it with a new one")

    database = sub.add_parser("db", help="database schema (Alembic migrations)")
    db_sub = database.add_subparsers(dest="db_command", required=True)
    upgrade = db_sub.add_parser("upgrade", help="migrate to a revision (default: head)")
    upgrade.add_argument("revision", nargs="?", default="head")
    downgrade = db_sub.add_parser("downgrade", help="migrate down to a revision (e.g. base)")
    downgrade.add_argument("revision")
    db_sub.add_parser("current", help="print the current revision")

    reconcile = sub.add_parser(
        "reconcile",
        help="re-enqueue audits whose broker message was lost or whose worker died",
    )
    reconcile.add_argument("--once", action="store_true", help="one pass, then exit")
    reconcile.add_argument(
        "--interval", type=float, default=None, help="seconds between passes (default: config)"
    )

    gate = sub.add_parser(
        "gate",
        help="release gate for CI: audit a model on a running service; exit 0 PASS, 1 FAIL, 2 "
        "error / timeout / INCONCLUSIVE",
        description=(
            "Upload a model and images to a saliency-audit service (or reuse what it already "
            "holds, found by sha256), run an audit with an idempotency key derived from the "
            "files and the request (a re-run attaches to the same audit), wait with a progress "
            "bar, print the verdict table and exit 0 when every --require-d method PASSes "
            "every test, 1 when one FAILs, 2 on an error, a timeout or an INCONCLUSIVE verdict "
            "(see --inconclusive)."
        ),
    )
    add_gate_arguments(gate)
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    from workers.local import run_local

    return run_local(args)


def cmd_gate(args: argparse.Namespace) -> int:
    from .gate import run_gate

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
    from workers.engine.methods import METHODS
    from workers.engine.methods.plugins import is_plugin, load_entry_point_explainers

    load_entry_point_explainers()  # what the operator installed for the workers
    from workers.engine.sanity import TEST_INFO
    from workers.engine.spec import MEASURES

    print("methods:")
    for name, info in METHODS.items():
        kind = "control" if info.is_control else ("layer" if info.needs_conv_layer else "input")
        kind = "plugin" if is_plugin(info) else kind
        print(f"  {name:<22}{kind:<9}{info.reference}")
    print("tests (--tests):")
    for name, test in TEST_INFO.items():
        print(f"  {name:<22}{test.reference}")
    print("similarity measures (--measures): " + ", ".join(MEASURES))
    return EXIT_OK


def cmd_policy(args: argparse.Namespace) -> int:
    from workers.engine.policy import default_document

    print(json.dumps(default_document(), indent=2))
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


def cmd_keys(args: argparse.Namespace) -> int:
    from .auth import create_key, revoke_key
    from .db import Database

    config = _config()
    if config.embedded:
        # the embedded SQLite file may not exist yet: keys come before the first `serve`
        from . import db

        db.upgrade(config.resolved_database_url)
    database = Database.from_config(config)
    with database.session() as session:
        if args.keys_command == "create":
            key, tenant = create_key(session, args.tenant, args.label)
            print(key)
            print(
                f"(tenant {tenant.name}, id {tenant.id}; the key is shown only now)",
                file=sys.stderr,
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
        if not revoke_key(session, args.prefix):
            print(f"error: no active key with prefix {args.prefix!r}", file=sys.stderr)
            return EXIT_ERROR
    print(f"revoked {args.prefix}")
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
    }
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
