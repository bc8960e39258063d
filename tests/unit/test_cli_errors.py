"""No traceback reaches a user: bad input and damaged files are told in one line naming the file, and
every subcommand's --help explains it (description, option help, an example)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubetune import cli
from kubetune.cli import build_parser, main
from kubetune.local.store import LocalStore

REPO = Path(__file__).resolve().parents[2]
FINETUNE = REPO / "examples" / "quickstart" / "01-finetune.yaml"
DEPLOYMENT = REPO / "examples" / "quickstart" / "03-deployment.yaml"
JOB = {
    "apiVersion": "kubetune.dev/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "tune"},
    "spec": {"baseModel": {"uri": "m"}, "dataset": {"uri": "d.jsonl"}},
}


@pytest.fixture(autouse=True)
def own_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test's own KUBETUNE_HOME (the CLI exports --home there), restored afterwards."""
    home = tmp_path / "default-home"
    monkeypatch.setenv("KUBETUNE_HOME", str(home))
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    return home


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        main(list(argv))
    out, err = capsys.readouterr()
    return int(exit_.value.code or 0), out, err


def one_line_error(err: str) -> str:
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


# -- compile -----------------------------------------------------------------------------------------


def test_compile_names_the_file_and_line_of_a_yaml_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "job.yaml"
    broken.write_text("apiVersion: kubetune.dev/v1alpha1\nkind: [FineTuneJob\n")
    code, _, err = run(capsys, "compile", "-f", str(broken), "-o", str(tmp_path / "out.yaml"))
    assert code == 1
    assert one_line_error(err) == (
        f"{broken}: invalid YAML: expected ',' or ']', but got '<stream end>' (line 3, column 1)"
    )


def test_compile_of_a_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.yaml"
    code, _, err = run(capsys, "compile", "-f", str(missing), "-o", str(tmp_path / "out.yaml"))
    assert code == 1
    assert one_line_error(err) == f"{missing}: no such file or directory"


def test_compile_of_a_binary_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    binary = tmp_path / "model.safetensors"
    binary.write_bytes(b"\x93NUMPY\x01\x00")
    code, _, err = run(capsys, "compile", "-f", str(binary), "-o", str(tmp_path / "out.yaml"))
    assert code == 1
    assert one_line_error(err) == f"{binary}: not a UTF-8 text file (byte 0x93 at offset 0)"


def test_compile_of_a_kind_without_a_pipeline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "compile", "-f", str(DEPLOYMENT), "-o", str(tmp_path / "out.yaml"))
    assert code == 2
    assert one_line_error(err) == (
        f"error: {DEPLOYMENT}: a ModelDeployment has no pipeline to compile; only a FineTuneJob has one"
    )
    assert not (tmp_path / "out.yaml").exists()


def test_compile_to_an_unwritable_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a-file").write_text("")
    output = tmp_path / "a-file" / "pipeline.yaml"  # below a file: no user may write it, root included
    code, _, err = run(capsys, "compile", "-f", str(FINETUNE), "-o", str(output))
    assert code == 1
    line = one_line_error(err)
    assert line.startswith(f"error: {tmp_path / 'a-file'}"), line
    assert line.endswith(": File exists") or line.endswith(": Not a directory"), line


# -- validate and up -----------------------------------------------------------------------------------


@pytest.mark.parametrize("content", ["", "---\n", "# nothing yet\n", "apiVersion: v1\nkind: ConfigMap\n"])
def test_validate_and_up_say_when_a_file_holds_no_kubetune_resource(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str
) -> None:
    manifest = tmp_path / "resources.yaml"
    manifest.write_text(content)
    code, out, err = run(capsys, "validate", "-f", str(manifest))
    assert (code, out) == (1, "")
    assert err.splitlines() == [f"{manifest}: no kubetune resource found", "1 problem(s) found"]
    code, _, err = run(capsys, "--home", str(tmp_path / "home"), "up", "-f", str(manifest))
    assert code == 2
    assert f"{manifest}: no kubetune resource found" in err.splitlines()


def test_validate_refuses_a_resource_defined_in_two_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = FINETUNE.read_text()
    (tmp_path / "a.yaml").write_text(text)
    (tmp_path / "b.yaml").write_text(text)
    code, _, err = run(capsys, "validate", "-f", str(tmp_path))
    assert code == 1
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    # a document is named by the line it starts on, after the file's leading comments
    start = 1 + next(i for i, line in enumerate(text.splitlines()) if line.startswith("apiVersion:"))
    assert err.splitlines() == [
        f"{second}:{start}: FineTuneJob/support-router: metadata.name: FineTuneJob default/support-router is "
        f"also defined at {first}:{start}; define each resource once",
        "1 problem(s) found",
    ]


# -- the local store ----------------------------------------------------------------------------------


def damaged_entry(home: Path) -> Path:
    LocalStore(home).apply("finetunejobs", JOB, immutable_spec=True)
    path = home / "store" / "finetunejobs" / "default" / "tune.json"
    path.write_text('{"metadata": {"name": "tu')
    return path


def test_get_names_a_damaged_entry_and_delete_removes_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = damaged_entry(tmp_path)
    told = (
        f"error: {path}: damaged store entry (invalid JSON: Unterminated string starting at at line 1); "
        "remove it with `kubetune delete finetunejobs tune -n default`"
    )
    for argv in (["get", "ftj"], ["get", "ftj", "tune"]):
        code, _, err = run(capsys, "--home", str(tmp_path), *argv)
        assert (code, one_line_error(err)) == (1, told)
    code, out, err = run(capsys, "--home", str(tmp_path), "delete", "finetunejobs", "tune")
    assert code == 0
    assert out == 'finetunejob.kubetune.dev "tune" deleted\n'
    assert one_line_error(err) == f"warning: {path}: damaged, deleted without cancelling its run"
    assert not path.exists()
    code, _, err = run(capsys, "--home", str(tmp_path), "get", "ftj")
    assert (code, err) == (0, "No resources found in default namespace.\n")


# -- unexpected errors ----------------------------------------------------------------------------------


def fail_unexpectedly(args: argparse.Namespace) -> int:
    raise RuntimeError("boom\nwith a second line")


def test_an_unexpected_error_is_one_line_unless_debugging(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "cmd_crds", fail_unexpectedly)
    code, _, err = run(capsys, "crds")
    assert code == 1
    assert one_line_error(err) == (
        "internal error: RuntimeError: boom with a second line (run with --debug for the traceback)"
    )
    for argv in (["--debug", "crds"], ["crds", "--debug"]):
        with pytest.raises(RuntimeError, match="boom"):
            main(argv)
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(RuntimeError, match="boom"):
        main(["crds"])


# -- options and help ---------------------------------------------------------------------------------


def test_home_is_accepted_before_and_after_the_subcommand(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, own_home: Path
) -> None:
    LocalStore(tmp_path / "elsewhere").apply("finetunejobs", JOB, immutable_spec=True)
    for argv in (
        ["--home", str(tmp_path / "elsewhere"), "get", "ftj", "-o", "json"],
        ["get", "ftj", "-o", "json", "--home", str(tmp_path / "elsewhere")],
        [
            "--home",
            str(tmp_path / "unused"),
            "get",
            "--home",
            str(tmp_path / "elsewhere"),
            "ftj",
            "-o",
            "json",
        ],
    ):
        code, out, _ = run(capsys, *argv)
        assert code == 0 and '"name": "tune"' in out, argv
    monkeypatch.setenv("KUBETUNE_HOME", str(own_home))  # the CLI exported the last --home
    code, out, _ = run(capsys, "get", "ftj", "-o", "json")  # the default: $KUBETUNE_HOME
    assert code == 0 and '"items": []' in out
    assert build_parser().parse_args(["get", "ftj"]).home is None


def subcommands(
    parser: argparse.ArgumentParser, prefix: str = "kubetune"
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, subparser in action.choices.items():
                command = f"{prefix} {name}"
                yield command, subparser
                yield from subcommands(subparser, command)


SUBCOMMANDS = dict(subcommands(build_parser()))


def test_every_command_is_walked() -> None:
    top = ("crds", "validate", "compile", "up", "gateway", "get", "delete", "operator", "dev")
    groups = ("keys", "usage", "audit", "prompt", "feedback")
    assert set(SUBCOMMANDS) == {f"kubetune {name}" for name in (*top, *groups)} | {
        "kubetune dev tiny-base",
        "kubetune prompt render",
        "kubetune keys create",
        "kubetune keys list",
        "kubetune keys revoke",
        "kubetune audit verify",
        "kubetune feedback export",
    }


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_every_subcommand_explains_itself(command: str) -> None:
    parser = SUBCOMMANDS[command]
    assert parser.description and parser.description.splitlines()[0].endswith("."), command
    assert parser.formatter_class is argparse.RawDescriptionHelpFormatter
    examples = (parser.epilog or "").splitlines()
    assert examples[0] == "examples:" and len(examples) > 1, command
    assert all(line.startswith(f"  {command}") for line in examples[1:]), examples
    undocumented = [
        action.dest
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction | argparse._SubParsersAction) and not action.help
    ]
    assert undocumented == [], command


def test_help_shows_description_options_and_examples(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "validate", "--help")
    assert code == 0
    assert "Check kubetune resources offline" in out
    assert "manifest file, or directory searched for" in out
    assert "examples:\n  kubetune validate -f examples/quickstart\n" in out
    assert "--home HOME" in out and "--debug" in out
