"""The command line of the stand-in steps, the same as the real steps' (``python -m ... STEP --config
FILE|- --workspace DIR [--which baseline|final]``), so the pipelines run them unchanged."""

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def run_command_line(
    run: Callable[..., dict[str, Any]], argv: Sequence[str] | None = None, *, takes_which: bool = False
) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("step")
    parser.add_argument("--config", required=True)
    parser.add_argument("--workspace", required=True)
    if takes_which:
        parser.add_argument("--which", choices=["baseline", "final"])
    args = parser.parse_args(argv)
    config = json.loads(sys.stdin.read() if args.config == "-" else Path(args.config).read_text())
    options = {"which": args.which} if getattr(args, "which", None) else {}
    try:
        report = run(args.step, config, args.workspace, **options)
    except RuntimeError as error:
        print(f"{args.step} failed: {error}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2, sort_keys=True))
    return 0
