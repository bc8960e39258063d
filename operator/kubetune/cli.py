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

DEBUG_ENV = "KUBETUNE_DEBUG"


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
    from kubetune.api.validation import format_issues, validate_paths

    issues = validate_paths([Path(p) for p in args.filename])
    if issues:
        print(format_issues(issues), file=sys.stderr)
        print(f"{len(issues)} problem(s) found", file=sys.stderr)
        return 1
    print("all kubetune resources valid")
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from kubetune.api.validation import (
        format_issues,
        is_kubetune_document,
        parse_resource,
        read_manifests,
        validate_paths,
    )
    from kubetune.pipelines.compile import NotCompilable, compile_resource

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
    issues = validate_paths([Path(args.filename)])
    if issues:
        print(format_issues(issues), file=sys.stderr)
        return 1
    documents = [d for d in read_manifests([Path(args.filename)]) if is_kubetune_document(d)]
    if len(documents) != 1:
        print(
            f"error: {args.filename} must hold exactly one resource, found {len(documents)}", file=sys.stderr
        )
        return 2
    try:
        compile_resource(parse_resource(documents[0]), _settings(args), Path(args.output))
    except NotCompilable as exc:
        print(f"error: {args.filename}: {exc}", file=sys.stderr)
        return 2
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
    from kubetune.local.liveness import settle_after_dead_up
    from kubetune.local.printer import printer_table
    from kubetune.local.store import LocalStore

    definition = _definition(args.kind)
    if definition is None:
        return 2
    home = _settings(args).home
    store = LocalStore(home)
    settle_after_dead_up(store, home)  # a killed `up` left claims of Running/Ready: correct them first
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
    from kubetune.local.store import DamagedEntry, LocalStore
    from kubetune.reconcile.jobs import Backends, cancel_job

    definition = _definition(args.kind)
    if definition is None:
        return 2
    settings = _settings(args)
    store = LocalStore(settings.home)
    try:
        obj = _stored(store, definition, args.name, args.namespace)
    except DamagedEntry as damaged:
        # The run it may have started cannot be read from it; removing it frees the name.
        print(f"warning: {damaged.path}: damaged, deleted without cancelling its run", file=sys.stderr)
    else:
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


HOME_HELP = "local state directory (default $KUBETUNE_HOME or ./.kubetune)"
DEBUG_HELP = f"print the Python traceback of an error (or set {DEBUG_ENV}=1)"


def _shared_options() -> argparse.ArgumentParser:
    """--home and --debug for every subcommand, so they may follow it too.

    Their default is SUPPRESS: a subcommand's parser copies every attribute it has over the main
    parser's, so a default there would undo ``kubetune --home DIR get ...``.
    """
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("--home", default=argparse.SUPPRESS, help=HOME_HELP)
    shared.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return shared


def _deployment_name(reference: str) -> str:
    """``mdep/NAME`` (or ``modeldeployment/NAME``, or ``NAME``) -> NAME."""
    kind, slash, name = reference.partition("/")
    if not slash:
        return reference
    if kind.lower() not in ("mdep", "modeldeployment", "modeldeployments"):
        raise ValueError(f"{reference!r}: keys and usage belong to a ModelDeployment: write mdep/NAME")
    if not name:
        raise ValueError(f"{reference!r}: the deployment's name is missing: write mdep/NAME")
    return name


def _key_file(args: argparse.Namespace) -> Path:
    from kubetune.gateway.access.keys import KEY_FILE_NAME, access_directory

    home = _settings(args).home
    return access_directory(home, args.namespace, _deployment_name(args.deployment)) / KEY_FILE_NAME


def cmd_keys_create(args: argparse.Namespace) -> int:
    from kubetune.gateway.access.keys import create_key, parse_scopes

    try:
        scopes = parse_scopes(args.scopes)
        path = _key_file(args)
        created = create_key(path, args.tenant, scopes, args.description or "")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    record = created.record
    if args.output == "json":
        public = {k: v for k, v in record.to_json().items() if k not in ("salt", "hash")}
        print(json.dumps({"token": created.token, **public}))
        return 0
    print(created.token)
    print(
        f"key {record.id} for tenant {record.tenant!r} with scopes {', '.join(sorted(record.scopes))}; "
        f"shown once, only its hash is kept ({path}). The gateway requires keys from now on.",
        file=sys.stderr,
    )
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    from kubetune.gateway.access.keys import read_key_file

    try:
        keys = read_key_file(_key_file(args))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    records = list(keys.records.values())
    if args.output == "json":
        public = [{k: v for k, v in r.to_json().items() if k not in ("salt", "hash")} for r in records]
        print(json.dumps({"keys": public}, indent=2))
        return 0
    if not records:
        print(f"No keys for mdep/{_deployment_name(args.deployment)}: its gateway is open on loopback.")
        return 0
    rows = [["ID", "TENANT", "SCOPES", "CREATED", "REVOKED"]] + [
        [r.id, r.tenant, ",".join(sorted(r.scopes)), r.created, r.revoked or "-"] for r in records
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        print("   ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from kubetune.gateway.access.keys import revoke_key

    try:
        record = revoke_key(_key_file(args), args.key_id)
    except (KeyError, ValueError) as exc:
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 1
    print(f"key {record.id} revoked at {record.revoked}; every gateway replica refuses it within seconds")
    return 0


def _gateway_url(args: argparse.Namespace, name: str) -> str | None:
    if args.gateway:
        return str(args.gateway).rstrip("/")
    from kubetune.local.store import LocalStore

    obj = LocalStore(_settings(args).home).get("modeldeployments", name, args.namespace)
    if obj is None:
        print(f'error: ModelDeployment "{name}" not found (or pass --gateway URL)', file=sys.stderr)
        return None
    endpoint = (obj.get("status") or {}).get("endpoint")
    if not endpoint:
        print(
            f"error: mdep/{name} has no gateway endpoint yet (is `kubetune up` serving it?)", file=sys.stderr
        )
        return None
    return str(endpoint).removesuffix("/").removesuffix("/v1")


def cmd_usage(args: argparse.Namespace) -> int:
    import httpx

    from kubetune.gateway.access.usage import usage_rows, usage_table

    try:
        name = _deployment_name(args.deployment)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    url = _gateway_url(args, name)
    if url is None:
        return 1
    try:
        response = httpx.get(f"{url}/metrics", timeout=10, trust_env=False)
        response.raise_for_status()
    except httpx.HTTPError as exc:
        print(f"error: cannot read {url}/metrics: {exc}", file=sys.stderr)
        return 1
    rows = usage_rows(response.text, name)
    if args.output == "json":
        print(
            json.dumps({"deployment": name, "gateway": url, "usage": [r.to_json() for r in rows]}, indent=2)
        )
    elif not rows:
        print(f"No usage of mdep/{name} recorded by {url} yet.")
    else:
        print(usage_table(rows))
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from kubetune.gateway.access.audit import verify

    result = verify(Path(args.path))
    print(result.summary(), file=sys.stdout if result.ok else sys.stderr)
    return 0 if result.ok else 1


def _subcommand(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    summary: str,
    examples: Sequence[str],
    details: str = "",
) -> argparse.ArgumentParser:
    """A subcommand whose --help shows `summary`, `details` and `examples` (one command a line)."""
    description = f"{summary}\n\n{details}" if details else summary
    return sub.add_parser(
        name,
        help=summary[0].lower() + summary[1:].rstrip("."),
        description=description,
        epilog="examples:\n" + "\n".join(f"  {example}" for example in examples),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_shared_options()],
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubetune",
        description=__doc__,
        epilog="Run `kubetune COMMAND --help` for a command's options and examples.",
    )
    parser.add_argument("--home", help=HOME_HELP)
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    crds = _subcommand(
        sub,
        "crds",
        "Print the CustomResourceDefinitions generated from the API models.",
        ["kubetune crds | kubectl apply --server-side -f -", "kubetune crds --out-dir manifests/crds"],
    )
    crds.add_argument("--out-dir", help="write one file per CRD into this directory instead")
    crds.set_defaults(func=cmd_crds)

    validate = _subcommand(
        sub,
        "validate",
        "Check kubetune resources offline, as the operator and `kubetune up` will.",
        ["kubetune validate -f examples/quickstart", "kubetune validate -f job.yaml -f deployment.yaml"],
        "Every problem is reported at once: FILE:LINE: Kind/name: field.path: what is wrong.\n"
        "Documents of other API groups are skipped; a path holding no kubetune resource is a problem.\n"
        "Exit status 1 when there are problems.",
    )
    validate.add_argument(
        "-f",
        "--filename",
        action="append",
        required=True,
        help="manifest file, or directory searched for *.yaml, *.yml and *.json (may repeat)",
    )
    validate.set_defaults(func=cmd_validate)

    compile_ = _subcommand(
        sub,
        "compile",
        "Compile a FineTuneJob to a Kubeflow Pipelines package, or (--standard) the Kubeflow UI's "
        "pipelines and component specs.",
        [
            "kubetune compile -f examples/quickstart/01-finetune.yaml -o pipeline.yaml",
            "kubetune compile --standard --out-dir manifests/kubeflow",
        ],
    )
    compile_.add_argument("-f", "--filename", help="manifest file holding exactly one FineTuneJob")
    compile_.add_argument("-o", "--output", help="where to write the pipeline package (YAML)")
    compile_.add_argument(
        "--standard",
        action="store_true",
        help="write the standard pipelines and every component spec for upload in the Kubeflow UI",
    )
    compile_.add_argument("--out-dir", help="with --standard: where to write components/ and pipelines/")
    compile_.set_defaults(func=cmd_compile)

    up = _subcommand(
        sub,
        "up",
        "Run resources locally: jobs until they finish, ModelDeployments served until Ctrl+C.",
        ["kubetune up -f examples/quickstart", "kubetune up   # resume what the store holds"],
        "With another `up` running for the same --home, the files are applied for it to pick up.",
    )
    up.add_argument("-f", "--filename", action="append", help="manifest file or directory (may repeat)")
    up.set_defaults(func=cmd_up)

    gateway = _subcommand(
        sub,
        "gateway",
        "Run a ModelDeployment's OpenAI-compatible gateway (reloads its config file on change).",
        ["kubetune gateway --config gateway.json --port 8000"],
    )
    add_gateway_arguments(gateway)
    gateway.set_defaults(func=cmd_gateway)

    get = _subcommand(
        sub,
        "get",
        "List stored resources with their status, like kubectl get.",
        ["kubetune get ftj", "kubetune get mdep support-router -o yaml"],
    )
    get.add_argument("kind", help="kind, plural or short name (ftj, qj, mdep)")
    get.add_argument("name", nargs="?", help="one resource's name (default: all of the kind)")
    get.add_argument("-n", "--namespace", default="default", help="namespace (default: default)")
    get.add_argument(
        "-o",
        "--output",
        choices=["json", "yaml", "table", "wide"],
        default="table",
        help="output format (default: table; wide adds columns)",
    )
    get.set_defaults(func=cmd_get)

    delete = _subcommand(
        sub,
        "delete",
        "Delete a stored resource, cancelling its run.",
        ["kubetune delete ftj support-router"],
        "A damaged store entry is deleted too (its run, which cannot be read from it, is left alone).",
    )
    delete.add_argument("kind", help="kind, plural or short name (ftj, qj, mdep)")
    delete.add_argument("name", help="the resource's name")
    delete.add_argument("-n", "--namespace", default="default", help="namespace (default: default)")
    delete.set_defaults(func=cmd_delete)

    operator = _subcommand(
        sub,
        "operator",
        "Run the Kopf operator against the current cluster (kubeconfig or in-cluster).",
        ["kubetune operator", "kubetune operator -n team-a -n team-b --liveness-port 8080"],
    )
    operator.add_argument(
        "-n", "--namespace", action="append", help="watch only this namespace (may repeat; default: all)"
    )
    operator.add_argument(
        "--liveness-port", type=int, default=8080, help="port of the /healthz endpoint (default: 8080)"
    )
    operator.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    operator.set_defaults(func=cmd_operator)

    keys = _subcommand(
        sub,
        "keys",
        "Manage a ModelDeployment's API keys (create, list, revoke).",
        ["kubetune keys create mdep/support-router --tenant team-a --scopes inference,feedback"],
        "Keys are stored as salted hashes only. Locally, a deployment without keys is open on\n"
        "loopback, and its first key turns authentication on without a restart.",
    )
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    keys_create = _subcommand(
        keys_sub,
        "create",
        "Create a key; its token is printed once (stdout), its hash kept.",
        [
            "kubetune keys create mdep/support-router --tenant team-a --scopes inference,feedback",
            "kubetune keys create mdep/support-router --tenant ops --scopes admin -o json",
        ],
        "Scopes: inference (completions, chat, models), feedback, experiments (read), admin (all).",
    )
    keys_create.add_argument("deployment", help="mdep/NAME")
    keys_create.add_argument("--tenant", required=True, help="the team or product the key belongs to")
    keys_create.add_argument(
        "--scopes", default="inference", help="comma-separated scopes (default: %(default)s)"
    )
    keys_create.add_argument("--description", help="a note kept with the key")
    keys_create.set_defaults(func=cmd_keys_create)
    keys_list = _subcommand(
        keys_sub,
        "list",
        "List a deployment's keys (never their tokens).",
        ["kubetune keys list mdep/support-router"],
    )
    keys_list.add_argument("deployment", help="mdep/NAME")
    keys_list.set_defaults(func=cmd_keys_list)
    keys_revoke = _subcommand(
        keys_sub,
        "revoke",
        "Revoke a key by id; gateways refuse it within seconds.",
        ["kubetune keys revoke mdep/support-router 3f9a1c0d2b7e"],
    )
    keys_revoke.add_argument("deployment", help="mdep/NAME")
    keys_revoke.add_argument("key_id", help="the key's id (kubetune keys list)")
    keys_revoke.set_defaults(func=cmd_keys_revoke)
    for command in (keys_create, keys_list):
        command.add_argument(
            "-o", "--output", choices=["table", "json"], default="table", help="output format"
        )
    for command in (keys_create, keys_list, keys_revoke):
        command.add_argument("-n", "--namespace", default="default", help="namespace (default: default)")

    usage = _subcommand(
        sub,
        "usage",
        "Show a ModelDeployment's usage per version, key and tenant: requests, tokens, cost.",
        ["kubetune usage mdep/support-router", "kubetune usage mdep/support-router -o json"],
        "Read from the gateway's /metrics (the local deployment's, or --gateway URL).",
    )
    usage.add_argument("deployment", help="mdep/NAME")
    usage.add_argument("-n", "--namespace", default="default", help="namespace (default: default)")
    usage.add_argument("--gateway", help="the gateway's base URL (default: the local deployment's)")
    usage.add_argument("-o", "--output", choices=["table", "json"], default="table", help="output format")
    usage.set_defaults(func=cmd_usage)

    audit = _subcommand(sub, "audit", "Check a gateway's audit log.", ["kubetune audit verify audit.jsonl"])
    audit_sub = audit.add_subparsers(dest="audit_command", required=True, metavar="COMMAND")
    audit_verify = _subcommand(
        audit_sub,
        "verify",
        "Verify an audit log's hash chain (with its rotated files PATH.1, PATH.2, ...).",
        ["kubetune audit verify ~/.kubetune/serving/default/support-router/audit.jsonl"],
        "Prints OK, or names the first line that was altered, removed or reordered (exit 1).",
    )
    audit_verify.add_argument("path", help="the audit log file")
    audit_verify.set_defaults(func=cmd_audit_verify)

    dev = _subcommand(sub, "dev", "Developer utilities.", ["kubetune dev tiny-base"])
    dev_sub = dev.add_subparsers(dest="dev_command", required=True, metavar="COMMAND")
    tiny = _subcommand(
        dev_sub,
        "tiny-base",
        "Build the quickstart's tiny pretrained base model offline.",
        ["kubetune dev tiny-base", "kubetune dev tiny-base --out /tmp/tiny-base --force"],
        "A complete build of the same recipe is reused.",
    )
    tiny.add_argument(
        "--out", default=".kubetune/models/tiny-base", help="model directory (default: %(default)s)"
    )
    tiny.add_argument(
        "--force", action="store_true", help="rebuild, replacing the directory even if it is no tiny build"
    )
    tiny.set_defaults(func=cmd_tiny_base)
    return parser


def _expected_errors() -> tuple[type[BaseException], ...]:
    """What bad input or a damaged file raises: told in one line, without a traceback."""
    from kubetune.api.validation import ManifestError, ResourceInvalid
    from kubetune.local.store import ApplyError, DamagedEntry
    from kubetune.pipelines.compile import NotCompilable

    return (
        OSError,
        UnicodeError,
        yaml.YAMLError,
        ManifestError,
        ResourceInvalid,
        NotCompilable,
        ApplyError,
        DamagedEntry,
    )


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename is not None:
        files = f"{exc.filename} -> {exc.filename2}" if exc.filename2 is not None else f"{exc.filename}"
        message = f"{files}: {exc.strerror or exc}"
    else:
        message = str(exc) or type(exc).__name__
    return " ".join(message.split())


def _debugging(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except KeyboardInterrupt:
        code = 130
    except Exception as exc:
        if _debugging(args):
            raise
        if isinstance(exc, _expected_errors()):
            print(f"error: {_one_line(exc)}", file=sys.stderr)
        else:
            internal = f"{type(exc).__name__}: {_one_line(exc)}"
            print(f"internal error: {internal} (run with --debug for the traceback)", file=sys.stderr)
        code = 1
    sys.exit(code)
