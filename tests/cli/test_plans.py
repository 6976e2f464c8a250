import json

import pytest
import torch
from typer.testing import CliRunner

from deltaflex import Plan
from deltaflex.cli import app
from deltaflex.tuning.cache import Entry, PlanCache, dumps
from deltaflex.tuning.key import CacheKey, environment

runner = CliRunner()


def entry(K=16, plan=Plan(chunk_size=32, compile=False)) -> Entry:
    key = CacheKey.for_shape(environment("cpu"), torch.float32, 1, 64, 2, K, K)
    return Entry(key, plan, 1.0, 2.0, "fwdbwd", f"1x64x2x{K}", 1e-7, 3, "2026-11-28T00:00:00Z")


def invoke(*args, input=None):
    return runner.invoke(app, ["plans", *args], input=input)


def test_list():
    result = invoke("list")
    assert result.exit_code == 0 and "mixed-state" in result.output and "no tuned plans yet" in result.output
    PlanCache().save(entry())
    result = invoke("list")
    assert result.exit_code == 0 and "C32 eager" in result.output and "2.00" in result.output


def test_show():
    PlanCache().save(entry())
    result = invoke("show", "compiled")
    assert result.exit_code == 0 and Plan.from_dict(json.loads(result.output)) == Plan()
    result = invoke("show", "0")
    assert result.exit_code == 0 and Entry.from_dict(json.loads(result.output)) == entry()
    for bad in ("fastest", "1", "01x"):
        result = invoke("show", bad)
        assert result.exit_code == 1 and "no plan" in result.output


def test_clear_asks_first():
    PlanCache().save(entry(16), entry(32))
    result = invoke("clear", input="n\n")
    assert result.exit_code == 1 and len(PlanCache().entries()) == 2
    (PlanCache().directory / "studies").mkdir()
    result = invoke("clear", "--yes", "--studies")
    assert result.exit_code == 0 and "removed 2" in result.output
    assert PlanCache().entries() == [] and not (PlanCache().directory / "studies").exists()


def test_export_import_round_trip(tmp_path):
    PlanCache().save(entry(16), entry(32))
    exported = tmp_path / "plans.json"
    result = invoke("export", str(exported))
    assert result.exit_code == 0 and "exported 2" in result.output
    assert invoke("export", str(exported)).exit_code == 1  # no silent overwrite
    assert invoke("export", str(exported), "--force").exit_code == 0
    PlanCache().clear()
    result = invoke("import", str(exported))
    assert result.exit_code == 0 and "imported 2" in result.output
    assert {e.key.K for e in PlanCache().entries()} == {16, 32}


@pytest.mark.parametrize(
    "text,message",
    [
        (None, "cannot read"),
        ('{"format": "deltaflex-plan-cache", "sch', "corrupt or truncated"),
        ('{"plans": []}', "not a deltaflex plan cache"),
        (dumps([entry()]).replace('"chunk_size": 32', '"chunk_size": 33'), "1 invalid entries"),
    ],
)
def test_import_rejects_bad_files(tmp_path, text, message):
    path = tmp_path / "plans.json"
    if text is not None:
        path.write_text(text)
    result = invoke("import", str(path))
    assert result.exit_code == 1 and message in result.output
    assert text is None or "nothing imported" in result.output
    assert PlanCache().entries() == []


@pytest.mark.parametrize("command", ["list", "show", "clear", "export", "import"])
def test_help(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0 and "Usage" in result.output


def test_missing_arguments():
    assert invoke().exit_code == 2  # no subcommand: help, exit 2
    assert invoke("show").exit_code == 2
    assert invoke("import").exit_code == 2


def test_list_describes_each_named_plan_by_what_runs():
    result = invoke("list")
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in result.output.splitlines()
            if line.count("│") >= 3 and line.split("│")[1].strip()}
    assert rows["triton"] == "C64 triton stages" and rows["fused"] == "C64 fused"
    assert rows["mixed-state"] == "C64 compiled, triton state" and rows["eager"] == "C64 eager"
