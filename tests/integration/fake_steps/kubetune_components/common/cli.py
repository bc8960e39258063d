"""The command line of the stand-in steps, the same as the real steps' (``python -m ... STEP --config
FILE|- | --config-json JSON --workspace DIR [--report FILE] [--workspace-report FILE]
[--which baseline|final] [--fold N] [--kfp-executor-input JSON]``), so the pipelines run them unchanged."""

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kubetune_contract.workspace import WorkspaceReport


def run_command_line(
    run: Callable[..., dict[str, Any]],
    argv: Sequence[str] | None = None,
    *,
    with_evaluate_flags: bool = False,
) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("step")
    config = parser.add_mutually_exclusive_group(required=True)
    config.add_argument("--config")
    config.add_argument("--config-json")
    parser.add_argument("--workspace", required=True)
    parser.add_argument("--report")
    parser.add_argument("--workspace-report")
    if with_evaluate_flags:
        parser.add_argument("--which", choices=["baseline", "final"])
        # Accepted and left alone: logging the evaluation's metrics to KFP is the real step's work, tested
        # with the real step in tests/unit/components/finetune/test_step_cli.py.
        parser.add_argument("--kfp-executor-input")
        parser.add_argument("--fold", type=int)  # crossvalidate: which fold
    args = parser.parse_args(argv)
    if args.config_json is not None:
        config = json.loads(args.config_json)
    else:
        config = json.loads(sys.stdin.read() if args.config == "-" else Path(args.config).read_text())
    options = {"which": args.which} if getattr(args, "which", None) else {}
    if getattr(args, "fold", None) is not None:
        options["fold"] = args.fold
    try:
        report = run(args.step, config, args.workspace, **options)
    except RuntimeError as error:
        print(f"{args.step} failed: {error}", file=sys.stderr)
        return 1
    text = json.dumps(report, indent=2, sort_keys=True) + "\n"
    if args.report:
        Path(args.report).write_text(text)
    print(text, end="")
    if args.workspace_report:  # as the real steps publish it: the whole workspace's report
        Path(args.workspace_report).write_text(WorkspaceReport.read(args.workspace).to_json())
    return 0
