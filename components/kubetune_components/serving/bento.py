"""Packaging a model version as a Bento: the model in BentoML's model store, plus this code.

    tag = build_bento("/store/team-a/support-router/v3", "support-bot", "tuned")
    # -> "support-bot-tuned:<version-id>"
    export_bento(tag, "/artifacts/support-bot-tuned.bento")    # a file for the artifact store
    import_bento("/artifacts/support-bot-tuned.bento")         # in a serving pod's init container

A Bento is named `<deployment>-<version>` (lowercase) and holds:

- the model, imported into the model store as `<deployment>-<version>:<content digest>` and
  referenced under the alias `kubetune-model` (which the service loads); an adapter's base model
  is copied into the model's `base/` directory, so the Bento needs nothing else to serve;
- the source of `kubetune_components` (the service imports it from the Bento when served from it);
- the Python requirements at the versions installed here, written down, never installed: a Bento
  build is offline.

The version id is a digest of the model files, the code and the requirements, so building the same
thing again returns the existing Bento (the build is idempotent) and anything that changes gets a
new tag. `bentoml_home` (default: $BENTOML_HOME, else ~/bentoml) chooses the stores used.

Command line (pipeline steps and init containers):

    python -m kubetune_components.serving.bento build --model-dir DIR --deployment D --version V
    python -m kubetune_components.serving.bento export --tag TAG --out FILE.bento
    python -m kubetune_components.serving.bento import --archive FILE.bento
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")

import bentoml
from bentoml._internal.bento import Bento, BentoStore
from bentoml._internal.configuration.containers import BentoMLContainer
from bentoml._internal.models import ModelStore
from bentoml.exceptions import BentoMLException, NotFound

import kubetune_components
from kubetune_components.common import storage
from kubetune_components.common.errors import ComponentError, ConfigError, ModelLoadError
from kubetune_components.serving.artifacts import BUNDLED_BASE_DIR, inspect_model_dir, quantization_format
from kubetune_components.serving.vllm_engine import check_servable
from kubetune_contract.serving import (
    DEPLOYMENT_LABEL,
    MODEL_ALIAS,
    MODEL_INVALID_EXIT_CODE,
    TERMINATION_LOG,
    TERMINATION_LOG_ENV,
    VERSION_LABEL,
)

SERVICE = "kubetune_components.serving.service:LLMService"
VLLM_SERVICE = "kubetune_components.serving.vllm_service:VLLMService"
SERVICES = {"transformers": SERVICE, "vllm": VLLM_SERVICE}
"""The Bento's service per spec.serving.engine (a vllm Bento needs vllm in the image that serves it)."""
PACKAGE = "kubetune_components"
RUNTIME_REQUIREMENTS = (
    "torch",
    "transformers",
    "peft",
    "torchao",
    "safetensors",
    "tokenizers",
    "fsspec",
    "prometheus-client",
    "starlette",
)
"""What the service imports besides BentoML (which BentoML adds itself)."""
NAME_PATTERN = re.compile(r"^[a-z0-9]([-._a-z0-9]*[a-z0-9])?$")
MAX_NAME_LENGTH = 63
VERSION_ID_LENGTH = 16
FORMAT_LABEL = "kubetune-format"
ENGINE_LABEL = "kubetune-engine"
_HOME_LOCK = threading.RLock()


class BentoBuildError(ComponentError):
    default_reason = "BentoBuildFailed"


def bento_name(deployment: str, version: str) -> str:
    """`<deployment>-<version>` in lower case, checked against BentoML's tag rules."""
    for field, value in (("deployment", deployment), ("version", version)):
        if not value or not NAME_PATTERN.match(value.lower()):
            raise ConfigError(
                f"{field} {value!r} must be lowercase letters, digits, '-', '_' or '.', "
                "starting and ending with a letter or digit"
            )
    name = f"{deployment}-{version}".lower()
    if len(name) > MAX_NAME_LENGTH:
        raise ConfigError(
            f"the Bento name {name!r} is {len(name)} characters long; BentoML allows {MAX_NAME_LENGTH}: "
            "shorten the deployment or version name"
        )
    return name


# --------------------------------------------------------------------------------------------------
# BentoML's stores, optionally under another home.


@contextlib.contextmanager
def bentoml_home_context(bentoml_home: str | os.PathLike[str] | None) -> Iterator[None]:
    """Point BentoML's model and Bento stores at `bentoml_home` for the duration (None: unchanged).

    BentoML reads BENTOML_HOME once per process into singletons; patching its container is how
    its own test utilities switch homes.
    """
    if bentoml_home is None:
        yield
        return

    home = Path(bentoml_home).expanduser().resolve()
    bentos, models_dir, tmp = home / "bentos", home / "models", home / "tmp"
    for directory in (bentos, models_dir, tmp):
        directory.mkdir(parents=True, exist_ok=True)
    overrides: list[tuple[Any, Any]] = [
        (BentoMLContainer.bentoml_home, str(home)),
        (BentoMLContainer.bento_store_dir, str(bentos)),
        (BentoMLContainer.model_store_dir, str(models_dir)),
        (BentoMLContainer.tmp_bento_store_dir, str(tmp)),
        (BentoMLContainer.bento_store, BentoStore(str(bentos))),
        (BentoMLContainer.model_store, ModelStore(str(models_dir))),
        (BentoMLContainer.tmp_bento_store, BentoStore(str(tmp))),
    ]
    with _HOME_LOCK, contextlib.ExitStack() as stack:
        for provider, value in overrides:
            stack.enter_context(provider.patch(value))
        yield


# --------------------------------------------------------------------------------------------------
# Digests and inputs.


def _files(root: Path) -> list[Path]:
    return sorted(
        path
        for path in root.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and not path.name.endswith((".pyc", ".pyo"))
    )


def tree_digest(root: Path, prefix: str = "") -> dict[str, str]:
    """{prefix + relative path: sha256} of every file under `root`."""
    return {prefix + path.relative_to(root).as_posix(): storage.sha256_of(str(path)) for path in _files(root)}


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def runtime_requirements() -> list[str]:
    """Each runtime requirement pinned to the version installed here (local labels like +cpu dropped)."""
    pinned: list[str] = []
    for name in RUNTIME_REQUIREMENTS:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pinned.append(name)
            continue
        pinned.append(f"{name}=={version.split('+', 1)[0]}")
    return pinned


def _package_dir() -> Path:
    return Path(kubetune_components.__file__).resolve().parent


def _not_a_directory(uri: str, what: str) -> str:
    """Why a local model URI is no directory here; a claim this pod does not mount is named."""
    if storage.scheme_of(uri) == "pvc":
        claim = uri[len("pvc://") :].split("/", 1)[0]
        mount = storage.pvc_root() / claim
        if not mount.is_dir():
            return (
                f"the {what} {uri} is on PersistentVolumeClaim {claim}, which is not mounted here "
                f"(nothing at {mount})"
            )
    return f"the {what} {uri} is not a directory"


FETCH_FAILED_REASON = "ModelFetchFailed"
"""A download from the hub that failed: retried, unlike a model that is not one."""


def _local_dir(uri: str, scratch: Path, what: str) -> Path:
    """A local directory holding the tree at `uri` (object stores and the hub are downloaded)."""
    if uri.startswith("hf://"):
        from huggingface_hub import snapshot_download

        from kubetune_components.common.models import hub_offline, parse_model_uri

        location = parse_model_uri(uri)
        try:
            return Path(
                snapshot_download(
                    location.ref,
                    revision=location.revision,
                    local_files_only=hub_offline(),
                    token=os.environ.get("HF_TOKEN") or None,
                )
            )
        except Exception as error:
            raise ModelLoadError(
                f"cannot fetch the {what} {uri}: {error}", reason=FETCH_FAILED_REASON
            ) from error
    if storage.is_local(uri):
        path = storage.resolve_local_path(uri)
        if not path.is_dir():
            raise ModelLoadError(_not_a_directory(uri, what))
        return path
    return storage.download_dir(uri, scratch / what.replace(" ", "-"))


# --------------------------------------------------------------------------------------------------
# Building.


def _import_model(name: str, source: Path, base: Path | None, labels: dict[str, str]) -> str:
    """The model store's tag for the model files (imported unless the same content is there)."""
    digest = tree_digest(source)
    if base is not None:
        digest.update(tree_digest(base, f"{BUNDLED_BASE_DIR}/"))
    tag = f"{name}:{_digest(digest)[:VERSION_ID_LENGTH]}"
    with contextlib.suppress(NotFound):
        bentoml.models.get(tag)
        return tag
    with bentoml.models.create(tag, labels=labels, metadata={"files": len(digest)}) as model:
        target = Path(model.path)
        for path in _files(source):
            relative = path.relative_to(source)
            if base is not None and relative.parts[0] == BUNDLED_BASE_DIR:
                continue  # an older bundled base is replaced by `base`
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target / relative)
        if base is not None:
            shutil.copytree(base, target / BUNDLED_BASE_DIR, dirs_exist_ok=True)
    return tag


def _build_context(directory: Path) -> None:
    """A build context holding only this package's source (never the environment it is installed in)."""
    shutil.copytree(
        _package_dir(), directory / PACKAGE, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo")
    )


def build_bento(
    model_dir: str | os.PathLike[str],
    deployment: str,
    version: str,
    *,
    bentoml_home: str | os.PathLike[str] | None = None,
    engine: str = "transformers",
) -> str:
    """Import the published model and build its Bento; returns the tag `<deployment>-<version>:<id>`.

    `engine` chooses the Bento's service (SERVICES): the same model with another engine is another Bento.
    """
    name = bento_name(deployment, version)
    if engine not in SERVICES:
        raise ConfigError(f"engine must be one of {', '.join(SERVICES)}, got {engine!r}")
    with (
        tempfile.TemporaryDirectory(prefix="kubetune-bento-") as scratch_dir,
        bentoml_home_context(bentoml_home),
    ):
        scratch = Path(scratch_dir)
        source = _local_dir(str(model_dir), scratch, "model")
        artifact = inspect_model_dir(source)
        if engine == "vllm":  # refused here, the init container exits MODEL_INVALID_EXIT_CODE
            check_servable(source, artifact.kind, quantization_format(artifact))
        base: Path | None = None
        if artifact.kind == "peft-adapter":
            assert artifact.base_uri is not None
            bundled = source / BUNDLED_BASE_DIR
            if Path(artifact.base_uri) != bundled:
                base = _local_dir(artifact.base_uri, scratch, "base model")
        labels = {DEPLOYMENT_LABEL: deployment, VERSION_LABEL: version, FORMAT_LABEL: artifact.kind}
        model_tag = _import_model(name, source, base, labels)

        context = scratch / "context"
        _build_context(context)
        requirements = runtime_requirements()
        version_id = _digest(
            {
                "model": model_tag,
                "code": tree_digest(context),
                "requirements": requirements,
                "bentoml": bentoml.__version__,
                **({"engine": engine} if engine != "transformers" else {}),
            }
        )[:VERSION_ID_LENGTH]
        tag = f"{name}:{version_id}"
        with contextlib.suppress(NotFound):
            bentoml.bentos.get(tag)
            return tag
        # Building sets the process-wide model aliases to this Bento's; leave them as they were.
        aliases = BentoMLContainer.model_aliases
        try:
            with aliases.patch(dict(aliases.get())):
                bento = bentoml.bentos.build(
                    SERVICES[engine],
                    name=name,
                    version=version_id,
                    labels={**labels, ENGINE_LABEL: engine},
                    description=(
                        f"kubetune model server for version {version} of ModelDeployment {deployment} "
                        f"({artifact.kind} model {model_tag})."
                    ),
                    include=[f"{PACKAGE}/**"],
                    python={"packages": requirements, "lock_packages": False},
                    models=[{"tag": model_tag, "alias": MODEL_ALIAS}],
                    build_ctx=str(context),
                )
        except BentoMLException as error:
            raise BentoBuildError(f"building the Bento {tag} failed: {error}") from error
        return str(bento.tag)


def export_bento(
    tag: str, out_path: str | os.PathLike[str], *, bentoml_home: str | os.PathLike[str] | None = None
) -> str:
    """Write the Bento `tag` (code and model) as one archive; returns where it was written.

    `out_path` is a file (`.bento`, or `.tar.gz`, `.zip` for those formats) or an existing directory
    (the file is then named `<name>-<version>.bento`); an fsspec URL such as s3://... works too.
    """
    target = str(out_path)
    if storage.is_local(target):
        local = storage.resolve_local_path(target)
        if not local.is_dir():
            local.parent.mkdir(parents=True, exist_ok=True)
        target = str(local)
    with bentoml_home_context(bentoml_home):
        try:
            return str(bentoml.bentos.export_bento(tag, target))
        except NotFound as error:
            raise ConfigError(f"there is no Bento {tag} to export: {error}") from error


def import_bento(
    archive: str | os.PathLike[str], *, bentoml_home: str | os.PathLike[str] | None = None
) -> str:
    """Import an exported Bento (with its model) into the stores; returns its tag. Idempotent."""
    source = str(archive)
    if storage.is_local(source):
        local = storage.resolve_local_path(source)
        if not local.exists():
            raise ConfigError(f"the Bento archive {source} does not exist")
        source = str(local)
    with bentoml_home_context(bentoml_home):
        bento = Bento.import_from(source)
        with contextlib.suppress(NotFound):
            return str(bentoml.bentos.get(bento.tag).tag)
        return str(bento.save().tag)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kubetune_components.serving.bento", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--bentoml-home", default=None, help="BentoML home (default: $BENTOML_HOME or ~/bentoml)"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build a Bento from a published model; prints its tag")
    build.add_argument("--model-dir", required=True)
    build.add_argument("--deployment", required=True)
    build.add_argument("--version", required=True)
    build.add_argument(
        "--engine", choices=sorted(SERVICES), default="transformers", help="the Bento's service"
    )
    export = commands.add_parser("export", help="write a Bento as an archive; prints the path")
    export.add_argument("--tag", required=True)
    export.add_argument("--out", required=True)
    imported = commands.add_parser("import", help="import an exported Bento; prints its tag")
    imported.add_argument("--archive", required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            tag = build_bento(
                args.model_dir,
                args.deployment,
                args.version,
                bentoml_home=args.bentoml_home,
                engine=args.engine,
            )
            print(tag)
        elif args.command == "export":
            print(export_bento(args.tag, args.out, bentoml_home=args.bentoml_home))
        else:
            print(import_bento(args.archive, bentoml_home=args.bentoml_home))
    except ComponentError as error:
        print(f"{args.command} failed ({error.reason}): {error.message}", file=sys.stderr)
        _write_termination_message(f"{error.reason}: {error.message}")
        # A fetch may work next time; anything else is about the model itself (see MODEL_INVALID_EXIT_CODE).
        return 1 if error.reason == FETCH_FAILED_REASON else MODEL_INVALID_EXIT_CODE
    return 0


def _write_termination_message(message: str) -> None:
    """Kubernetes shows the file's content in the pod's status. The kubelet mounts the file into every
    container; outside a pod there is none, and none is made (unless TERMINATION_LOG_ENV names one)."""
    configured = os.environ.get(TERMINATION_LOG_ENV)
    path = Path(configured or TERMINATION_LOG)
    if configured or path.is_file():
        with contextlib.suppress(OSError):
            path.write_text(message, encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
