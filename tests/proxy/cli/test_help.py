"""Every flag's help says its default, and serve's says the default the settings have."""

from __future__ import annotations

import argparse
import re

import pytest

from proxy.cli.main import build_parser
from proxy.settings import Settings


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


SWITCHES = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._HelpAction)



@pytest.mark.parametrize("command", sorted(_subcommands()))
def test_every_flag_names_its_default(command: str) -> None:
    missing = [
        a.option_strings[0]
        for a in _subcommands()[command]._actions
        if a.option_strings and not isinstance(a, SWITCHES) and "default" not in (a.help or "")
    ]
    assert missing == []


def _as_help(value: object) -> set[str]:
    """How a help line may write a default: 4 or 4.0, a list comma-joined, on or off."""
    if isinstance(value, bool):
        return {"on" if value else "off"}
    if isinstance(value, float):
        return {f"{value:g}", repr(value)}
    if isinstance(value, list):
        return {",".join(map(str, value))}
    return {str(value)}


def test_serves_help_states_the_settings_defaults() -> None:
    """The default a help line states is the one the settings use (they cannot drift)."""
    fields = Settings.model_fields
    checked = 0
    for action in _subcommands()["serve"]._actions:
        field = fields.get(action.dest)
        if field is None or isinstance(action, SWITCHES):
            continue
        default = field.get_default(call_default_factory=True)
        if default is None or default == [] or action.dest == "db":
            continue
        said = re.search(r"\(default:? ([^ ,);]+(,[^ ,);]+)*)", action.help or "")
        assert said is not None and said.group(1).rstrip(":") in _as_help(default), (
            action.option_strings,
            default,
            action.help,
        )
        checked += 1
    assert checked >= 15
