"""docs/commands.md is kept true to --help: every verb and action is documented, and every flag a
documented command line names exists on that verb."""

import argparse
import re
from pathlib import Path

from lmforge.cli import VERBS, build_parser

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def documented_commands() -> list[tuple[str, list[str], set[str]]]:
    """(verb, actions, flags) for every `lmforge ...` command line in backticks."""
    text = (DOCS / "commands.md").read_text(encoding="utf-8")
    out = []
    for span in re.findall(r"`(lmforge [^`]+)`", text):
        words = span.split()
        verb = words[1]
        actions = words[2].split("|") if len(words) > 2 and re.fullmatch(r"[a-z|]+", words[2]) else []
        out.append((verb, actions, set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", span))))
    return out


def test_every_documented_flag_exists():
    verbs = _subparsers(build_parser())
    commands = documented_commands()
    assert len(commands) > 20
    for verb, actions, flags in commands:
        assert verb in verbs, f"docs name an unknown verb: lmforge {verb}"
        parsers = [verbs[verb]]
        nested = _subparsers(verbs[verb])
        if nested:
            assert actions and all(a in nested for a in actions), f"lmforge {verb}: unknown action in {actions}"
            parsers = [nested[a] for a in actions]
        for p in parsers:
            missing = flags - _flags(p) - {"--help"}
            assert not missing, f"docs name flags that `{p.prog}` lacks: {sorted(missing)}"


def test_every_verb_and_action_is_documented():
    documented = {(verb, action) for verb, actions, _ in documented_commands() for action in actions or [None]}
    verbs = _subparsers(build_parser())
    for verb in VERBS:
        nested = _subparsers(verbs[verb])
        for action in nested or [None]:
            assert (verb, action) in documented, f"lmforge {verb} {action or ''} is not in docs/commands.md"


def test_architecture_doc_names_files_that_exist():
    text = (DOCS / "architecture.md").read_text(encoding="utf-8")
    root = DOCS.parent
    named = set(re.findall(r"`((?:lmforge|tests)/[\w/]+\.py)`", text))
    assert len(named) > 10
    assert sorted(p for p in named if not (root / p).is_file()) == []
