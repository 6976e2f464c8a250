from typer.testing import CliRunner

from deltaflex.cli import app
from deltaflex.tuning.cache import PlanCache


def test_info_names_device_versions_cache_and_plans():
    result = CliRunner().invoke(app, ["info"])
    assert result.exit_code == 0, result.output
    for text in ("torch", "deltaflex", str(PlanCache().path), "0 tuned plan(s)", "compiled", "mixed-state"):
        assert text in result.output, text


def test_info_help():
    result = CliRunner().invoke(app, ["info", "--help"])
    assert result.exit_code == 0 and "cache location" in result.output
