"""The `kubetune` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from kubetune.gateway.__main__ import add_arguments as add_gateway_arguments

if TYPE_CHECKING:
    from kubetune.api.definition import ResourceDefinition
    from kubetune.config import OperatorConfig
    from kubetune.local.store import LocalStore


def _settings(args: argparse.Namespace) -> OperatorConfig:
    from kubetune.config import OperatorConfig

    if getattr(args, "home", None):
        os.environ["KUBETUNE_HOME"] = args.home
    return OperatorConfig.from_env()


def cmd_crds(args: argparse.Namespace) -> int:
    from kubetune.api.crd import render_crds_yaml, write_crds

    if args.out_dir:
        for path in write_crds(Path(args.out_dir)):
            print(f"wrote {path}")
    else:
        sys.stdout.write(render_crds_yaml())
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from kubetune.api.validation import validate_paths

    issues = validate_paths([Path(p) for p in args.filename])
    for issue in issues:
        print(str(issue), file=sys.stderr)
    if issues:
        print(f"{len(issues)} problem(s) found", file=sys.stderr)
        return 1
    print("all kubetune resources valid")
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from kubetune.api.validation import ResourceInvalid, parse_resource, read_manifests
    from kubetune.pipelines.compile import compile_resource

    if args.standard:
        if args.filename or args.output or not args.out_dir:
            print("error: --standard takes --out-dir only (not -f/-o)", file=sys.stderr)
            return 2
        from kubetune.pipelines.standard import compile_standard

        for path in compile_standard(Path(args.out_dir)):
            print(f"wrote {path}")
        return 0
    if not args.filename or not args.output or args.out_dir:
        print("error: compile needs -f FILE -o OUTPUT (or --standard --out-dir DIR)", file=sys.stderr)
        return 2
    documents = [d for d in read_manifests([Path(args.filename)]) if d.get("kind")]
    if len(documents) != 1:
        print(
            f"error: {args.filename} must hold exactly one resource, found {len(documents)}", file=sys.stderr
        )
        return 2
    try:
        resource = parse_resource(documents[0])
    except ResourceInvalid as invalid:
        for issue in invalid.issues:
            print(str(issue), file=sys.stderr)
        return 1
    compile_resource(resource, _settings(args), Path(args.output))
    print(f"wrote {args.output}")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from kubetune.local.up import up

    return up([Path(p) for p in args.filename or []], _settings(args))


def cmd_gateway(args: argparse.Namespace) -> int:
    from kubetune.gateway.__main__ import run

    return run(args)


def _definition(kind: str) -> ResourceDefinition | None:
    from kubetune.api.registry import UnknownResource, get_definition

    try:
        return get_definition(kind)
    except UnknownResource as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def _stored(
    store: LocalStore, definition: ResourceDefinition, name: str, namespace: str
) -> dict[str, Any] | None:
    obj = store.get(definition.plural, name, namespace)
    if obj is None:
        print(f'error: {definition.kind} "{name}" not found', file=sys.stderr)
    return obj


def cmd_get(args: argparse.Namespace) -> int:
    from kubetune.local.printer import printer_table
    from kubetune.local.store import LocalStore

    definition = _definition(args.kind)
    if definition is None:
        return 2
    store = LocalStore(_settings(args).home)
    if args.name:
        obj = _stored(store, definition, args.name, args.namespace)
        if obj is None:
            return 1
        objects = [obj]
    else:
        objects = store.list_objects(definition.plural, args.namespace)
    if args.output == "json":
        payload: Any = objects[0] if args.name else {"apiVersion": "v1", "kind": "List", "items": objects}
        print(json.dumps(payload, indent=2, sort_keys=True))
    elif args.output == "yaml":
        payload = objects[0] if args.name else {"apiVersion": "v1", "kind": "List", "items": objects}
        sys.stdout.write(yaml.safe_dump(payload, sort_keys=False))
    elif not objects:
        print(f"No resources found in {args.namespace} namespace.", file=sys.stderr)
    else:
        columns = [c for c in definition.printer_columns if c.priority == 0 or args.output == "wide"]
        print(printer_table(objects, columns))
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    from kubetune.local.store import LocalStore
    from kubetune.reconcile.jobs import Backends, cancel_job

    definition = _definition(args.kind)
    if definition is None:
        return 2
    settings = _settings(args)
    store = LocalStore(settings.home)
    obj = _stored(store, definition, args.name, args.namespace)
    if obj is None:
        return 1
    if definition.plural in ("finetunejobs", "quantizejobs"):
        run_id = cancel_job(obj, Backends(settings), lookup=store.finetune_job, base_dir=Path.cwd())
        if run_id:
            print(f"cancelled pipeline run {run_id}")
    store.delete(definition.plural, args.name, args.namespace)
    print(f'{definition.kind.lower()}.kubetune.dev "{args.name}" deleted')
    return 0


def cmd_operator(args: argparse.Namespace) -> int:
    from kubetune.handlers.main import run_operator

    return run_operator(
        namespaces=args.namespace or [],
        liveness_port=args.liveness_port,
        verbose=args.verbose,
    )


def cmd_tiny_base(args: argparse.Namespace) -> int:
    from kubetune_components.dev.tinylm import build_tiny_base

    path = build_tiny_base(Path(args.out), force=args.force)
    print(f"tiny base model ready at {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubetune", description=__doc__)
    parser.add_argument("--home", help="local state directory (default $KUBETUNE_HOME or ./.kubetune)")
    sub = parser.add_subparsers(dest="command", required=True)

    crds = sub.add_parser("crds", help="print the CustomResourceDefinitions generated from the API models")
    crds.add_argument("--out-dir", help="write one file per CRD into this directory instead")
    crds.set_defaults(func=cmd_crds)

    validate = sub.add_parser("validate", help="check resources offline")
    validate.add_argument("-f", "--filename", action="append", required=True, help="file or directory")
    validate.set_defaults(func=cmd_validate)

    compile_ = sub.add_parser(
        "compile",
        help="compile a job to a Kubeflow Pipelines YAML package, or (--standard) the Kubeflow UI "
        "pipelines and component specs",
    )
    compile_.add_argument("-f", "--filename")
    compile_.add_argument("-o", "--output")
    compile_.add_argument(
        "--standard",
        action="store_true",
        help="write the standard pipelines and every component spec for upload in the Kubeflow UI",
    )
    compile_.add_argument("--out-dir", help="with --standard: where to write components/ and pipelines/")
    compile_.set_defaults(func=cmd_compile)

    up = sub.add_parser(
        "up",
        help="run resources locally: jobs until they finish, ModelDeployments served until Ctrl+C "
        "(with another `up` running, apply the files for it to pick up)",
    )
    up.add_argument("-f", "--filename", action="append", help="file or directory (may repeat)")
    up.set_defaults(func=cmd_up)

    gateway = sub.add_parser(
        "gateway",
        help="run a ModelDeployment's OpenAI-compatible gateway (reloads its config file on change)",
    )
    add_gateway_arguments(gateway)
    gateway.set_defaults(func=cmd_gateway)

    get = sub.add_parser("get", help="list stored resources with their status")
    get.add_argument("kind", help="kind, plural or short name (ftj)")
    get.add_argument("name", nargs="?")
    get.add_argument("-n", "--namespace", default="default")
    get.add_argument("-o", "--output", choices=["json", "yaml", "table", "wide"], default="table")
    get.set_defaults(func=cmd_get)

    delete = sub.add_parser("delete", help="delete a stored resource, cancelling its run")
    delete.add_argument("kind")
    delete.add_argument("name")
    delete.add_argument("-n", "--namespace", default="default")
    delete.set_defaults(func=cmd_delete)

    operator = sub.add_parser("operator", help="run the Kopf operator against the current cluster")
    operator.add_argument("-n", "--namespace", action="append", help="watch only these namespaces")
    operator.add_argument("--liveness-port", type=int, default=8080)
    operator.add_argument("-v", "--verbose", action="store_true")
    operator.set_defaults(func=cmd_operator)

    dev = sub.add_parser("dev", help="developer utilities")
    dev_sub = dev.add_subparsers(dest="dev_command", required=True)
    tiny = dev_sub.add_parser("tiny-base", help="build the quickstart's tiny pretrained base model offline")
    tiny.add_argument("--out", default=".kubetune/models/tiny-base")
    tiny.add_argument("--force", action="store_true")
    tiny.set_defaults(func=cmd_tiny_base)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args))
