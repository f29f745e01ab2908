"""The documents operators read stay true to the code."""

from __future__ import annotations

import re

from routstr_addon.settings import SETTINGS, parse_value

from .conftest import ROOT


def env_example() -> dict[str, str]:
    values = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name] = value
    return values


def test_env_example_lists_every_setting_with_its_default() -> None:
    listed = env_example()
    assert set(listed) == {s.env for s in SETTINGS}
    for s in SETTINGS:
        assert parse_value(s, listed[s.env]) == s.default, s.env


def test_readme_configuration_table_names_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`([A-Z][A-Z_]+)`", table))
    assert {s.env for s in SETTINGS} <= named


def test_readme_gives_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "./run.sh test" in readme and "\n./run.sh " in readme
    assert "./run.sh test" in (ROOT / ".ci" / "run").read_text()
