"""The README's Quickstart is exactly two commands, and CI runs the second one."""

from __future__ import annotations

import os
import re

from conftest import REPO


def _quickstart_commands() -> list[str]:
    text = open(os.path.join(REPO, "README.md")).read()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [b.strip() for b in blocks[:2]]


def test_quickstart_is_two_commands_and_ci_runs_the_second():
    train, tests = _quickstart_commands()
    assert "\n" not in train and "\n" not in tests, "each Quickstart step is one command"
    assert train.endswith("longctx train")
    ci = open(os.path.join(REPO, ".ci", "run")).read()
    ci_commands = [ln.strip() for ln in ci.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert ci_commands[-1] == tests, "the last command of .ci/run must be the README's test command"
