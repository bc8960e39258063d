"""The Dockerfiles under manifests/images: pinned, minimal, non-root, installed from the constraints.

Images cannot be built here (no registry access); these tests read the Dockerfiles and check each
instruction against what it must be, and that the entrypoints they name exist in the code.
"""

from __future__ import annotations

import ast
import fnmatch
import importlib.metadata
import importlib.util
import json
import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from kubetune.cli import build_parser

REPO = Path(__file__).resolve().parents[3]
IMAGES = REPO / "manifests" / "images"
DOCKERFILES = ("operator", "runtime", "serving")
PINNED_BASE = re.compile(r"^[\w./-]+:\d+(\.\d+)+[\w.-]*(@sha256:[0-9a-f]{64})?$")


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str

    def exec_form(self) -> list[str]:
        value = json.loads(self.arguments)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), self
        return value


def parse(path: Path) -> list[Instruction]:
    """Instructions with line continuations joined and comments dropped."""
    instructions: list[Instruction] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, arguments = (pending + line).partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, f"{path}: dangling line continuation"
    return instructions


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    result: list[list[Instruction]] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            result.append([])
        result[-1].append(instruction)
    return result


@pytest.fixture(params=DOCKERFILES)
def dockerfile(request: pytest.FixtureRequest) -> tuple[str, list[Instruction]]:
    name = str(request.param)
    return name, parse(IMAGES / f"{name}.Dockerfile")


def test_base_images_are_pinned_by_version(dockerfile: tuple[str, list[Instruction]]) -> None:
    name, instructions = dockerfile
    images = [i.arguments.split()[0] for i in instructions if i.keyword == "FROM"]
    assert len(images) == 2, f"{name}: a build stage and a slim final stage"
    for image in images:
        assert PINNED_BASE.match(image), f"{name}: {image} is not pinned to a version (or digest)"
        assert not image.endswith(":latest")
    assert "pin it by digest" in (IMAGES / f"{name}.Dockerfile").read_text()


def test_final_stage_runs_as_a_numeric_non_root_user(dockerfile: tuple[str, list[Instruction]]) -> None:
    name, instructions = dockerfile
    final = stages(instructions)[-1]
    users = [i.arguments for i in final if i.keyword == "USER"]
    assert users, f"{name}: no USER in the final stage"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0, f"{name}: USER {users[-1]} must be a numeric non-root uid"
    assert gid.isdigit() and int(gid) != 0
    # The chart runs the operator as this user too.
    assert f"runAsUser: {uid}" in (REPO / "charts" / "kubetune" / "templates" / "deployment.yaml").read_text()


def test_installs_cpu_torch_first_then_the_constraints(dockerfile: tuple[str, list[Instruction]]) -> None:
    name, instructions = dockerfile
    build = stages(instructions)[0]
    runs = [shlex.split(i.arguments) for i in build if i.keyword == "RUN"]
    installs = [run for run in runs if run[:2] == ["pip", "install"]]
    assert len(installs) == 2, f"{name}: torch, then the project"
    torch, project = installs
    assert "torch==2.13.0" in torch
    assert torch[torch.index("--index-url") + 1] == "https://download.pytorch.org/whl/cpu"
    assert project[project.index("--constraint") + 1] == "/src/requirements/constraints.txt"
    # Only the final stage ships: the environment built in the first, copied whole.
    final = stages(instructions)[-1]
    assert [i.arguments for i in final if i.keyword == "COPY"] == ["--from=build /opt/venv /opt/venv"]
    env = " ".join(i.arguments for i in final if i.keyword == "ENV")
    assert "PATH=/opt/venv/bin:$PATH" in env


def test_no_shell_tricks(dockerfile: tuple[str, list[Instruction]]) -> None:
    name, instructions = dockerfile
    for instruction in instructions:
        if instruction.keyword == "RUN":
            for trick in ("|", "&&", ";", "curl", "wget", "sudo", "chmod 777"):
                assert trick not in instruction.arguments, f"{name}: RUN {instruction.arguments}"
        if instruction.keyword in ("ENTRYPOINT", "CMD"):
            instruction.exec_form()  # exec form: no shell in between, signals reach the process
        assert instruction.keyword != "ADD", f"{name}: COPY, not ADD"


def test_every_copied_path_exists_and_is_in_the_build_context(
    dockerfile: tuple[str, list[Instruction]],
) -> None:
    name, instructions = dockerfile
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:
        verdict = False
        for pattern in patterns:
            negated = pattern.startswith("!")
            glob = pattern.lstrip("!").rstrip("/").removeprefix("**/")
            parts = Path(path).parts
            if any(fnmatch.fnmatch("/".join(parts[: i + 1]), glob) for i in range(len(parts))) or any(
                fnmatch.fnmatch(part, glob) for part in parts if pattern.lstrip("!").startswith("**/")
            ):
                verdict = not negated
        return verdict

    for instruction in instructions:
        if instruction.keyword != "COPY" or instruction.arguments.startswith("--from"):
            continue
        *sources, _ = instruction.arguments.split()
        for source in sources:
            assert (REPO / source).exists(), f"{name}: COPY {source}: no such path"
            assert not ignored(source), f"{name}: COPY {source} is excluded by .dockerignore"
    assert ignored("tests/unit") and ignored(".venv/bin/python") and ignored("operator/kubetune/__pycache__")


def test_operator_entrypoint_is_the_kubetune_cli() -> None:
    final = stages(parse(IMAGES / "operator.Dockerfile"))[-1]
    (entrypoint,) = [i.exec_form() for i in final if i.keyword == "ENTRYPOINT"]
    (cmd,) = [i.exec_form() for i in final if i.keyword == "CMD"]
    assert entrypoint + cmd == ["kubetune", "operator"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["kubetune"] == "kubetune.cli:main"
    assert build_parser().parse_args(cmd).command == "operator"


def test_serving_entrypoint_serves_the_llm_service() -> None:
    final = stages(parse(IMAGES / "serving.Dockerfile"))[-1]
    (entrypoint,) = [i.exec_form() for i in final if i.keyword == "ENTRYPOINT"]
    assert entrypoint == ["bentoml", "serve", "kubetune_components.serving.service:LLMService"]
    assert importlib.metadata.entry_points(group="console_scripts", name="bentoml")
    module, _, attribute = entrypoint[2].partition(":")
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None, f"{module} does not exist"
    tree = ast.parse(Path(spec.origin).read_text())
    services = [
        node
        for node in tree.body
        if isinstance(node, ast.ClassDef)
        and node.name == attribute
        and any("bentoml.service" in ast.unparse(d) for d in node.decorator_list)
    ]
    assert services, f"{entrypoint[2]}: no @bentoml.service class {attribute}"


def test_runtime_image_runs_what_kfp_starts() -> None:
    final = stages(parse(IMAGES / "runtime.Dockerfile"))[-1]
    assert not [i for i in final if i.keyword == "ENTRYPOINT"], "kfp sets the command; no entrypoint"
    component = yaml.safe_load(
        (REPO / "manifests" / "kubeflow" / "components" / "curate-dataset.yaml").read_text()
    )
    (executor,) = component["deploymentSpec"]["executors"].values()
    command = executor["container"]["command"]
    assert command[:4] == ["python", "-m", "kubetune_components.finetune.steps", "curate"]
    # kubetune_components is installed with kubetune in the runtime image
    assert importlib.util.find_spec("kubetune_components.finetune.steps") is not None
