"""The README's commands: every program and subcommand it shows exists, and accepts every flag it is shown with.

Each command of the README's code blocks (continuation lines joined, ``&&`` chains split, comments dropped) that
runs one of our programs is asked for ``--help`` through the same entry point, in a subprocess; the flags the
README writes must appear in that help. A renamed flag or subcommand fails here before a newcomer meets it.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: How the README starts our programs -> the module that ``python -m`` runs.
PROGRAMS = {".venv/bin/ffengine": "ffengine", "focusedfashion-bot": "bot", "ffengine-train": "train"}
#: Arguments that take no subcommand after them (the next word is an operand).
OPERAND_FLAGS = re.compile(r"^-")


def code_lines(text: str) -> list[str]:
    """Lines of indented and fenced code blocks, continuation lines joined."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        if fenced or line.startswith("    "):
            lines.append(line.strip())
    joined: list[str] = []
    for line in lines:
        if joined and joined[-1].endswith("\\"):
            joined[-1] = joined[-1][:-1].rstrip() + " " + line
        else:
            joined.append(line)
    return joined


def commands(text: str) -> list[list[str]]:
    """Our programs' invocations, as ``[module, words...]`` (brackets of synopsis lines removed)."""
    found = []
    for line in code_lines(text):
        for part in line.split("&&"):
            words = shlex.split(part.split(" #")[0].replace("[", " ").replace("]", " "))
            if words[:2] == [".venv/bin/python", "-m"] and len(words) > 2 and words[2] in {"ffengine", "bot", "train"}:
                found.append([words[2], *words[3:]])
            elif words and words[0] in PROGRAMS:
                found.append([PROGRAMS[words[0]], *words[1:]])
    return found


def subcommand(words: list[str]) -> list[str]:
    """The leading words that name (sub)commands: up to the first flag or path-like operand."""
    out = []
    for word in words:
        if OPERAND_FLAGS.match(word) or "/" in word or "." in word or word.isupper():
            break
        out.append(word)
    return out[:2]


README_COMMANDS = commands((REPO / "README.md").read_text(encoding="utf-8"))


def test_the_readme_shows_each_program() -> None:
    assert {c[0] for c in README_COMMANDS} == {"ffengine", "bot", "train"}
    assert len(README_COMMANDS) >= 10


@pytest.mark.parametrize("command", README_COMMANDS, ids=[" ".join(c[:3]) for c in README_COMMANDS])
def test_each_readme_command_exists_with_its_flags(command: list[str]) -> None:
    module, words = command[0], command[1:]
    sub = subcommand(words)
    done = subprocess.run([sys.executable, "-m", module, *sub, "--help"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, f"{module} {' '.join(sub)} --help failed:\n{done.stderr[-2000:]}"
    flags = {w.split("=")[0] for w in words if w.startswith("--") and w != "--help"}
    missing = sorted(f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", done.stdout))
    assert not missing, f"the README gives `{module} {' '.join(sub)}` flags its --help does not know: {missing}"
