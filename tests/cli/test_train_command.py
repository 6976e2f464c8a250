"""`deltaflex train` on CPU at tiny sizes: a run, a second call that finds it complete, --max-minutes
stopping with a checkpoint; bad input refused before any training, with nothing written."""

import hashlib
import json

import pytest
import torch
from typer.testing import CliRunner

from deltaflex.cli import app
from deltaflex.train import write_token_file

runner = CliRunner()
TINY = ["train", "--quick", "--device", "cpu", "--steps", "4", "--log-every", "2", "--seq-len", "16"]


@pytest.fixture
def tokens(tmp_path):
    return write_token_file(tmp_path / "tokens.bin", torch.randint(0, 64, (500,)))


def snapshot(folder):
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_token_file_run_then_the_same_command_finds_it_complete(tmp_path, tokens):
    out = tmp_path / "run"
    result = runner.invoke(app, [*TINY, "--data", str(tokens), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "step 4 of 4 (complete)" in result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4] and all(r["loss"] > 0 and r["tokens_per_s"] > 0 for r in records)
    assert records[-1]["tokens"] == 4 * 4 * 16
    assert json.loads((out / "run.json").read_text())["data"]["num_tokens"] == 500
    before = snapshot(out)
    result = runner.invoke(app, [*TINY, "--data", str(tokens), "--out", str(out)])
    assert result.exit_code == 0 and "resumed from" in result.output and "step_00000004" in result.output
    assert snapshot(out) == before


def test_mqar_run_stopped_by_the_budget_resumes(tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, [*TINY, "--data", "mqar", "--mqar-pairs", "2", "--max-minutes", "1e-9", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "step 2 of 4 (stopped by --max-minutes" in result.output
    assert (out / "checkpoints" / "step_00000002" / "meta.json").is_file()
    result = runner.invoke(app, [*TINY, "--data", "mqar", "--mqar-pairs", "2", "--out", str(out)])
    assert result.exit_code == 0 and "step 4 of 4 (complete)" in result.output, result.output


def test_checkpoint_of_another_config_is_refused_and_left_alone(tmp_path, tokens):
    out = tmp_path / "run"
    assert runner.invoke(app, [*TINY, "--data", str(tokens), "--out", str(out)]).exit_code == 0
    before = snapshot(out)
    result = runner.invoke(app, [*TINY, "--data", str(tokens), "--out", str(out), "--hidden", "64", "--lr", "1e-3"])
    assert result.exit_code == 1
    assert "belongs to another run configuration" in result.output
    assert "model.hidden_size: saved 32, now 64" in result.output and "train.lr: saved 0.0003, now 0.001" in result.output
    assert snapshot(out) == before
    # a longer schedule is a change a resumed run may make
    result = runner.invoke(app, [*TINY, "--data", str(tokens), "--out", str(out), "--steps", "6"])
    assert result.exit_code == 0 and "step 6 of 6 (complete)" in result.output, result.output


def test_folder_of_something_else_is_refused(tmp_path, tokens):
    (tmp_path / "checkpoints").mkdir()
    result = runner.invoke(app, [*TINY, "--data", str(tokens), "--out", str(tmp_path)])
    assert result.exit_code == 1 and "no run.json" in result.output


def _truncated(tmp_path):
    path = tmp_path / "t.bin"
    path.write_bytes(b"\x00" * 201)
    return path


def _out_of_vocab(tmp_path):
    return write_token_file(tmp_path / "t.bin", torch.full((100,), 64))


@pytest.mark.parametrize(
    "data, args, message",
    [
        (lambda p: p / "missing.bin", [], "does not exist"),
        (_truncated, [], "is truncated: 201 bytes"),
        (_out_of_vocab, [], "token id 64 (at token 0), outside the model's vocabulary of 64"),
        (_truncated, ["--token-dtype", "int8"], "token dtype must be one of"),
        (lambda p: "mqar", ["--mqar-pairs", "2", "--heads", "5"], "num_heads = 5 must divide hidden_size = 32"),
        (lambda p: "mqar", ["--mqar-pairs", "8"], "seq_len = 16 must be at least 4 * num_pairs"),
        (lambda p: "mqar", ["--mqar-pairs", "2", "--micro-batch-size", "3"], "micro_batch_size = 3 must divide"),
        (lambda p: "mqar", ["--preset", "gpt"], "preset name must be one of"),
        (lambda p: "mqar", ["--mqar-pairs", "2", "--plan", "fast"], "plan must be None or one of"),
    ],
)
def test_bad_input_before_any_training(tmp_path, data, args, message):
    out = tmp_path / "run"
    result = runner.invoke(app, [*TINY, "--data", str(data(tmp_path)), "--out", str(out), *args])
    assert result.exit_code == 1, result.output
    assert message in " ".join(result.output.split())
    assert not out.exists()


def test_config_file_excludes_size_options(tmp_path):
    from deltaflex.models import preset

    path = tmp_path / "model.json"
    preset("deltanet", 2, vocab_size=64, hidden_size=32, num_heads=2).to_json(path)
    result = runner.invoke(app, [*TINY, "--data", "mqar", "--config", str(path), "--hidden", "64", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "--config sets the model; drop --hidden" in " ".join(result.output.split())
    result = runner.invoke(app, [*TINY, "--data", "mqar", "--mqar-pairs", "2", "--config", str(path), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0 and "2 layers x 32" in result.output, result.output
