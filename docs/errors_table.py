"""Regenerate the "Python API" table of docs/errors.md from the real messages.

Runs every bad input of tests/test_errors_api.py and prints one Markdown row per case:
the call, the error type and the message fxprune gives. With ``--cli``, runs every bad
command line of tests/test_cli_errors.py instead and prints what the terminal shows. Usage:

    .venv/bin/python docs/errors_table.py > /tmp/rows.md
    .venv/bin/python docs/errors_table.py --cli > /tmp/cli_rows.md
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import torch
from test_errors_api import BAD_INPUTS, NeverTrace

import fxprune

logger = logging.getLogger(__name__)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


def main() -> None:
    print("| bad input tried | error type | message it now gets |")
    print("|---|---|---|")
    for name, call, _, _ in BAD_INPUTS:
        name = f"`{call.text}`" if hasattr(call, "text") else name
        try:
            call(NeverTrace())
        except Exception as exc:  # every row is meant to raise; print whatever it raised
            print(f"| {_cell(name)} | `{type(exc).__name__}` | {_cell(str(exc))} |")
        else:
            print(f"| {_cell(name)} | (no error) | |")

    # A TraceError's advice follows its cause: here a wrong channel count, not control flow.
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()).eval()
    try:
        fxprune.prune(model, torch.randn(1, 1, 8, 8))
    except fxprune.TraceError as exc:
        print("\n`fxprune.prune(conv_model, torch.randn(1, 1, 8, 8))` (a 3-channel model):\n")
        print("```text\n" + str(exc) + "\n```")


def main_cli() -> None:
    import tempfile

    from test_cli_errors import BAD_CLI, run_cli, scratch

    print("| command line | exit | what it prints (one line, on stderr) |")
    print("|---|---|---|")
    for argv, _ in BAD_CLI:
        with tempfile.TemporaryDirectory() as tmp:
            scratch(Path(tmp))
            code, err = run_cli(argv, Path(tmp))
            shown = err.strip().replace(tmp, "DIR")
        print(
            f"| `fxprune {_cell(' '.join(argv).replace('{tmp}', 'DIR'))}` | {code} | {_cell(shown)} |"
        )


if __name__ == "__main__":
    main_cli() if "--cli" in sys.argv else main()
