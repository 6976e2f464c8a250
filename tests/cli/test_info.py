import deltaflex
from typer.testing import CliRunner

from deltaflex.cli import app
from deltaflex.tuning.cache import PlanCache


def _rows(output: str) -> dict[str, str]:
    """The two-column cells of `info`'s first table, by their first cell."""
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in output.splitlines() if line.count("│") == 3]
    return {c[0]: c[1] for c in cells if c[0]}


def test_info_names_device_versions_cache_and_plans():
    result = CliRunner().invoke(app, ["info"])
    assert result.exit_code == 0, result.output
    for text in ("torch", "deltaflex", str(PlanCache().path), "0 tuned plan(s)", "compiled", "mixed-state"):
        assert text in result.output, text


def test_info_is_a_table_not_a_dict():
    import torch

    result = CliRunner().invoke(app, ["info"])
    assert result.exit_code == 0, result.output
    assert "{'" not in result.output
    rows = _rows(result.output)
    assert rows["deltaflex"] == deltaflex.__version__ and rows["torch"] == torch.__version__
    assert rows["plan cache"] == str(PlanCache().path) and rows["device"]


def test_info_help():
    result = CliRunner().invoke(app, ["info", "--help"])
    assert result.exit_code == 0 and "cache location" in result.output
