"""README.md and .ci/run stay in sync, and README documents the commands that exist."""

from __future__ import annotations

import pathlib
import re

from asa_export.cli.main import SUBCOMMANDS, build_parser

REPO = pathlib.Path(__file__).resolve().parents[2]


def setup_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_readme_has_exactly_two_setup_commands():
    commands = setup_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    assert commands[0].endswith("asa-export demo")
    assert "torch==2.13.0" in commands[0] and "torch==2.13.0" in commands[1]


def test_ci_runs_readme_test_command():
    script = (REPO / ".ci" / "run").read_text()
    lines = [line for line in script.splitlines() if line.strip() and not line.startswith("#")]
    assert script.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in lines
    assert lines[-1].strip() == setup_commands()[1]


def test_readme_documents_every_subcommand_and_option():
    text = (REPO / "README.md").read_text()
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for name in SUBCOMMANDS:
        assert f"asa-export {name}" in text
        for action in subparsers[name]._actions:
            long = [o for o in action.option_strings if o.startswith("--")]
            if long and long[0] not in ("--help", "--quiet"):
                assert long[0] in text, f"README does not mention {name} {long[0]}"
