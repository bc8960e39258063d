"""The `kubetune` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

from kubetune.gateway.__main__ import add_arguments as add_gateway_arguments

if TYPE_CHECKING:
    from kubetune.api.definition import ResourceDefinition
    from kubetune.config import OperatorConfig
    from kubetune.kube.gateway_access import ClusterKeys
    from kubetune.local.store import LocalStore
    from kubetune_contract.deployment import ModelDeployment

T = TypeVar("T")
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

    out = args.out or f".kubetune/models/tiny-{args.size}"
    path = build_tiny_base(Path(out), force=args.force, size=args.size)
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


def _access_secret_name(args: argparse.Namespace) -> str:
    from kubetune.kube.children import gateway_access_secret_name

    return gateway_access_secret_name(_deployment_name(args.deployment))


def _key_file(args: argparse.Namespace) -> Path:
    from kubetune.gateway.access.keys import KEY_FILE_NAME, access_directory

    home = _settings(args).home
    return access_directory(home, args.namespace, _deployment_name(args.deployment)) / KEY_FILE_NAME


def _on_cluster(args: argparse.Namespace, work: Callable[[ClusterKeys], Awaitable[T]]) -> T:
    """``work`` on the keys of the deployment's Secret in the current cluster (kubeconfig or in-cluster)."""
    import asyncio

    from kubetune.kube.client import async_client, cluster_config
    from kubetune.kube.gateway_access import ClusterKeys

    name = _deployment_name(args.deployment)

    async def run() -> T:
        client = async_client(cluster_config())
        try:
            return await work(ClusterKeys(client, args.namespace, name))
        finally:
            await client.close()

    return asyncio.run(run())


def _cluster_failures() -> tuple[type[BaseException], ...]:
    import httpx
    import kopf

    from kubetune.kube.gateway_access import ClusterKeysError

    return (ClusterKeysError, kopf.LoginError, httpx.HTTPError)


def cmd_keys_create(args: argparse.Namespace) -> int:
    from kubetune.gateway.access.keys import create_key, parse_scopes

    warning = None
    try:
        scopes = parse_scopes(args.scopes)
        if args.cluster:
            created, warning = _on_cluster(
                args, lambda keys: keys.create(args.tenant, scopes, args.description or "")
            )
            where = f"Secret {args.namespace}/{_access_secret_name(args)}"
        else:
            path = _key_file(args)
            created = create_key(path, args.tenant, scopes, args.description or "")
            where = str(path)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except _cluster_failures() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if warning is not None:
        print(f"warning: {warning}", file=sys.stderr)
    record = created.record
    if args.output == "json":
        public = {k: v for k, v in record.to_json().items() if k not in ("salt", "hash")}
        print(json.dumps({"token": created.token, **public}))
        return 0
    print(created.token)
    print(
        f"key {record.id} for tenant {record.tenant!r} with scopes {', '.join(sorted(record.scopes))}; "
        f"shown once, only its hash is kept ({where}). The gateway requires keys from now on.",
        file=sys.stderr,
    )
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    from kubetune.gateway.access.keys import read_key_file

    try:
        keys = _on_cluster(args, lambda keys: keys.read()) if args.cluster else read_key_file(_key_file(args))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except _cluster_failures() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    records = list(keys.records.values())
    if args.output == "json":
        public = [{k: v for k, v in r.to_json().items() if k not in ("salt", "hash")} for r in records]
        print(json.dumps({"keys": public}, indent=2))
        return 0
    if not records:
        opened = "refuses every request" if args.cluster else "is open on loopback"
        print(f"No keys for mdep/{_deployment_name(args.deployment)}: its gateway {opened}.")
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
        if args.cluster:
            record = _on_cluster(args, lambda keys: keys.revoke(args.key_id))
        else:
            record = revoke_key(_key_file(args), args.key_id)
    except (KeyError, ValueError) as exc:
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 1
    except _cluster_failures() as exc:
        print(f"error: {exc}", file=sys.stderr)
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


def _deployment_gateway(args: argparse.Namespace) -> tuple[str, str] | int:
    """The ModelDeployment named by ``args.deployment`` and its gateway's URL, or the exit code after
    saying why there is none (2: a malformed name, 1: no gateway endpoint)."""
    try:
        name = _deployment_name(args.deployment)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    url = _gateway_url(args, name)
    return 1 if url is None else (name, url)


def cmd_usage(args: argparse.Namespace) -> int:
    import httpx

    from kubetune.gateway.access.usage import usage_rows, usage_table

    found = _deployment_gateway(args)
    if isinstance(found, int):
        return found
    name, url = found
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


API_KEY_ENV = "KUBETUNE_API_KEY"


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, not {text!r}")
    return value


def cmd_feedback_export(args: argparse.Namespace) -> int:
    import httpx

    from kubetune.gateway.capture import dataset_rows, write_jsonl

    found = _deployment_gateway(args)
    if isinstance(found, int):
        return found
    name, url = found
    api_key = args.api_key or os.environ.get(API_KEY_ENV)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(f"{url}/v1/feedback/records", headers=headers, timeout=30, trust_env=False)
    except httpx.HTTPError as exc:
        print(f"error: cannot read {url}/v1/feedback/records: {exc}", file=sys.stderr)
        return 1
    if response.status_code != 200:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:500]
        print(f"error: {url}/v1/feedback/records answered {response.status_code}: {message}", file=sys.stderr)
        return 1
    records = response.json().get("data") or []
    of = f"mdep/{name}"
    if args.version:
        records = [record for record in records if record.get("version") in args.version]
        of = f"version(s) {', '.join(args.version)} of mdep/{name}"
    rows = dataset_rows(records, args.format)
    if len(rows) < args.min_rows:
        print(
            f"error: --min-rows: {len(rows)} {args.format} row(s) from {len(records)} rated completion(s) "
            f"of {of}, fewer than {args.min_rows}; {args.output} not written",
            file=sys.stderr,
        )
        return 1
    write_jsonl(Path(args.output), rows)
    print(
        f"wrote {len(rows)} {args.format} row(s) from {len(records)} rated completion(s) of {of} "
        f"to {args.output}"
    )
    return 0


def _json_option(text: str | None, option: str) -> Any:
    from kubetune.plan.prompt import RenderError

    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise RenderError(f"{option} is not JSON: {exc}") from exc


def _model_deployment(args: argparse.Namespace, name: str) -> ModelDeployment:
    """The ModelDeployment NAME in --namespace: from the -f manifests, else from the local store."""
    from kubetune.api.validation import format_issues, parse_resource, read_manifests, validate_paths
    from kubetune.local.store import LocalStore
    from kubetune.plan.prompt import RenderError
    from kubetune_contract.deployment import KIND, ModelDeployment

    if args.filename:
        paths = [Path(p) for p in args.filename]
        issues = validate_paths(paths)
        if issues:
            raise RenderError(format_issues(issues))
        found = [
            document
            for document in read_manifests(paths)
            if document.get("kind") == KIND
            and document.get("metadata", {}).get("name") == name
            and document.get("metadata", {}).get("namespace", "default") == args.namespace
        ]
        if not found:
            raise RenderError(f"no ModelDeployment {name!r} in namespace {args.namespace!r} in the -f files")
        return parse_resource(found[0], ModelDeployment)
    stored = LocalStore(_settings(args).home).get("modeldeployments", name, args.namespace)
    if stored is None:
        raise RenderError(
            f"ModelDeployment {name!r} is not in the local store (namespace {args.namespace!r}); "
            "give its manifest with -f"
        )
    return parse_resource(stored, ModelDeployment)


def cmd_prompt_render(args: argparse.Namespace) -> int:
    from kubetune.gateway.errors import GatewayError
    from kubetune.plan.prompt import RenderError, render_request

    try:
        fields: dict[str, Any] = {}
        for option, value in (("--response-format", args.response_format), ("--metadata", args.metadata)):
            parsed = _json_option(value, option)
            if parsed is not None:
                fields[option.removeprefix("--").replace("-", "_")] = parsed
        deployment = _model_deployment(args, _deployment_name(args.deployment))
        body = render_request(deployment, args.version, args.input, fields)
    except RenderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except GatewayError as exc:  # what the gateway would answer with a 400
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    if args.output == "text":
        for message in body["messages"]:
            print(f"--- {message['role']}\n{message['content']}")
    else:
        print(json.dumps(body["messages"], indent=2, ensure_ascii=False))
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
        "loopback, and its first key turns authentication on without a restart. With --cluster they\n"
        "live in the Secret <name>-gateway-access, which every gateway replica watches: a created or\n"
        "revoked key applies within seconds (the first create also lets the gateway read it).",
    )
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    keys_create = _subcommand(
        keys_sub,
        "create",
        "Create a key; its token is printed once (stdout), its hash kept.",
        [
            "kubetune keys create mdep/support-router --tenant team-a --scopes inference,feedback",
            "kubetune keys create mdep/support-router --tenant ops --scopes admin -o json",
            "kubetune keys create mdep/support-router -n team-a --cluster --tenant team-a",
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
        [
            "kubetune keys list mdep/support-router",
            "kubetune keys list mdep/support-router -n team-a --cluster",
        ],
    )
    keys_list.add_argument("deployment", help="mdep/NAME")
    keys_list.set_defaults(func=cmd_keys_list)
    keys_revoke = _subcommand(
        keys_sub,
        "revoke",
        "Revoke a key by id; gateways refuse it within seconds.",
        [
            "kubetune keys revoke mdep/support-router 3f9a1c0d2b7e",
            "kubetune keys revoke mdep/support-router 3f9a1c0d2b7e -n team-a --cluster",
        ],
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
        command.add_argument(
            "--cluster",
            action="store_true",
            help="the deployment's key Secret in the current cluster (kubeconfig or in-cluster) "
            "instead of $KUBETUNE_HOME",
        )

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

    feedback = _subcommand(
        sub,
        "feedback",
        "Turn a ModelDeployment's rated completions into training data.",
        ["kubetune feedback export mdep/support-router --format kto -o feedback.jsonl"],
    )
    feedback_sub = feedback.add_subparsers(dest="feedback_command", required=True, metavar="COMMAND")
    feedback_export = _subcommand(
        feedback_sub,
        "export",
        "Write the completions that received feedback as a KTO or preference dataset (JSON lines).",
        [
            "kubetune feedback export mdep/support-router --format kto -o feedback.jsonl",
            "kubetune feedback export mdep/support-router --format preference -o pairs.jsonl "
            "--gateway http://localhost:8080",
        ],
        "Needs spec.feedback.capture: true. Read from the gateway's /v1/feedback/records (the local\n"
        "deployment's, or --gateway URL; a key with the admin scope when authentication is on).\n"
        "kto: prompt, completion, label (score >= 0.5). preference: prompt, chosen, rejected, pairing\n"
        "completions of the same prompt with opposite feedback. A chat prompt is a message list and its\n"
        "completions assistant messages (TRL's conversational format); content is PII-redacted.",
    )
    feedback_export.add_argument("deployment", help="mdep/NAME")
    feedback_export.add_argument(
        "--format", required=True, choices=["kto", "preference"], help="dataset format"
    )
    feedback_export.add_argument("-o", "--output", required=True, help="the JSONL file to write")
    feedback_export.add_argument("-n", "--namespace", default="default", help="namespace (default: default)")
    feedback_export.add_argument("--gateway", help="the gateway's base URL (default: the local deployment's)")
    feedback_export.add_argument("--api-key", help=f"an admin key (default: ${API_KEY_ENV})")
    feedback_export.add_argument(
        "--version",
        action="append",
        metavar="NAME",
        help="only the completions this version answered (may repeat; default: every version)",
    )
    feedback_export.add_argument(
        "--min-rows",
        type=_non_negative_int,
        default=1,
        metavar="N",
        help="fail, writing nothing, when the dataset would have fewer rows (default: 1)",
    )
    feedback_export.set_defaults(func=cmd_feedback_export)

    prompt = _subcommand(
        sub,
        "prompt",
        "Show what a ModelDeployment's prompts send.",
        ["kubetune prompt render mdep/support-router --version v2 --input 'I was charged twice'"],
    )
    prompt_sub = prompt.add_subparsers(dest="prompt_command", required=True, metavar="COMMAND")
    prompt_render = _subcommand(
        prompt_sub,
        "render",
        "Print the messages the gateway sends a version for an input, system message included.",
        [
            "kubetune prompt render mdep/support-router --version v2 --input 'I was charged twice'",
            "kubetune prompt render mdep/support-router --version v2 --input 'Hi' -f examples/prompts "
            '--response-format \'{"type": "json_object"}\'',
        ],
        "The gateway's own rendering (system parts, template, few-shot examples) of a chat request whose\n"
        "one user message is --input; the deployment comes from the -f manifests or the local store.",
    )
    prompt_render.add_argument("deployment", help="mdep/NAME")
    prompt_render.add_argument("--version", required=True, help="the version whose prompt to apply")
    prompt_render.add_argument("--input", required=True, help="the user message")
    prompt_render.add_argument("--response-format", help="the request's response_format (JSON)")
    prompt_render.add_argument("--metadata", help="the request's metadata (JSON): template variables")
    prompt_render.add_argument(
        "-f", "--filename", action="append", help="manifest file or directory holding the deployment"
    )
    prompt_render.add_argument("-n", "--namespace", default="default", help="namespace (default: default)")
    prompt_render.add_argument(
        "-o", "--output", choices=["json", "text"], default="json", help="output format (default: json)"
    )
    prompt_render.set_defaults(func=cmd_prompt_render)

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
        [
            "kubetune dev tiny-base",
            "kubetune dev tiny-base --out /tmp/tiny-base --force",
            "kubetune dev tiny-base --size small",
        ],
        "A complete build of the same recipe is reused. Every size shares the tokenizer and corpus.",
    )
    tiny.add_argument("--out", default=None, help="model directory (default: .kubetune/models/tiny-SIZE)")
    tiny.add_argument(
        "--size",
        choices=("base", "small"),
        default="base",
        help="base (the quickstart's) or small (a student for method distillation, under a third of "
        "base's parameters) (default: %(default)s)",
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
