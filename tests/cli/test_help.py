"""Every command's --help reads on its own: it names nothing a user of the package lacks (the
project's design notes), and the shape defaults say what the shapes are."""

import re

import pytest
from typer.testing import CliRunner

from deltaflex.cli import app
from deltaflex.cli.plans import app as plans_app

runner = CliRunner()
COMMANDS = [[c.name or c.callback.__name__] for c in app.registered_commands]
COMMANDS += [["plans", c.name or c.callback.__name__] for c in plans_app.registered_commands]


def help_text(args: list[str]) -> str:
    result = runner.invoke(app, [*args, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return re.sub(r"[\s│╭╮╰╯─]+", " ", result.output)  # rich's boxes and line wrapping gone


def test_every_command_is_covered():
    assert {c[0] for c in COMMANDS} >= {"bench", "tune", "compare", "info", "mqar", "plans"}


@pytest.mark.parametrize("args", COMMANDS, ids=" ".join)
def test_help_names_no_file_the_user_lacks(args):
    text = help_text(args)
    assert "DESIGN.md" not in text and "METHOD.md" not in text


@pytest.mark.parametrize("command", ["bench", "tune", "compare"])
def test_default_shapes_are_named(command):
    text = help_text([command])
    assert "the paper's kernel benchmark: d_model 2048, 16K tokens a batch" in text
    assert "head dims 64, 128, 256" in text
