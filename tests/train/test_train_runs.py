"""Whole runs on a tiny hybrid LM (DeltaNet + sliding-window attention, tied head) on the CPU:
2 torchrun ranks (gloo, FSDP2) give the 1-process loss curve on the same global batch; a run killed
mid-way (SIGKILL) and restarted gives the uninterrupted curve; checkpoints written by 2 ranks load in
1 process and the other way round (with gradient accumulation there)."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from deltaflex.models import preset
from deltaflex.train import TokenFile, TrainConfig, train, write_token_file
from deltaflex.train.checkpoint import check_compatible

MODEL = preset("hybrid-sliding-window", 2, vocab_size=64, hidden_size=32, num_heads=2, window_size=16)
CONFIG = TrainConfig(steps=6, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2, log_every=1, save_every=3,
                     keep_checkpoints=3, seed=0)
CLI_ARGS = ["--preset", "hybrid-sliding-window", "--layers", "2", "--vocab", "64", "--hidden", "32", "--heads", "2",
            "--window", "16", "--steps", "6", "--batch-size", "4", "--seq-len", "32", "--lr", "3e-3", "--warmup", "2",
            "--log-every", "1", "--save-every", "3", "--keep", "3", "--device", "cpu"]


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    return write_token_file(tmp_path_factory.mktemp("data") / "tokens.bin", torch.randint(0, 64, (4000,), generator=g))


@pytest.fixture(scope="module")
def reference(tokens, tmp_path_factory):
    """The uninterrupted 1-process run: its folder (checkpoints at steps 3 and 6)."""
    out = tmp_path_factory.mktemp("reference")
    train(MODEL, CONFIG, TokenFile(tokens, "uint16", 32, 64), out, device="cpu")
    return out


def curve(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, CONFIG.steps + 1))
    return torch.tensor([[r["loss"], r["grad_norm"], r["lr"]] for r in records], dtype=torch.float64)


def assert_same_curve(out, reference):
    # float32 sums in another order (2 ranks' halves, then their mean) move the loss by ~1e-7
    torch.testing.assert_close(curve(out), curve(reference), rtol=1e-5, atol=1e-6)


def torchrun(tokens, out, *args):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "deltaflex.cli", "train", "--data", str(tokens), "--out", str(out), *CLI_ARGS, *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def resume_from_step_3(source, dest):
    shutil.copytree(source, dest)
    shutil.rmtree(dest / "checkpoints" / "step_00000006")


def test_two_ranks_give_the_one_process_curve_and_reshard_to_one(tokens, reference, tmp_path):
    out = tmp_path / "two"
    log = torchrun(tokens, out)
    assert "step 6 of 6 (complete)" in log and log.count("step 6 of 6") == 1  # rank 0 speaks
    run = json.loads((out / "run.json").read_text())
    check_compatible(run, json.loads((reference / "run.json").read_text()), out)  # the CLI made the same configs
    assert json.loads((out / "checkpoints" / "step_00000003" / "meta.json").read_text())["world_size"] == 2
    assert_same_curve(out, reference)

    # 2 -> 1: the 2-rank checkpoint of step 3 resumed in one process
    resume_from_step_3(out, tmp_path / "two_to_one")
    summary = train(MODEL, CONFIG, TokenFile(tokens, "uint16", 32, 64), tmp_path / "two_to_one", device="cpu")
    assert summary["start_step"] == 3 and summary["world_size"] == 1
    assert_same_curve(tmp_path / "two_to_one", reference)


def test_one_process_checkpoint_resumes_on_two_ranks_with_accumulation(tokens, reference, tmp_path):
    resume_from_step_3(reference, tmp_path / "one_to_two")
    log = torchrun(tokens, tmp_path / "one_to_two", "--micro-batch-size", "1")
    assert "resumed from" in log and "step_00000003" in log
    assert_same_curve(tmp_path / "one_to_two", reference)


KILLED_RUN = """
import os, signal, sys
from deltaflex.train import TokenFile, train
from {module} import CONFIG, MODEL
def on_log(record):
    if record["step"] == 5:  # after the checkpoint of step 4, before the one of step 6
        os.kill(os.getpid(), signal.SIGKILL)
config = CONFIG.__class__(**{{**CONFIG.to_dict(), "save_every": 2}})
train(MODEL, config, TokenFile(sys.argv[1], "uint16", 32, 64), sys.argv[2], device="cpu", on_log=on_log)
"""


def test_killed_and_restarted_run_continues_the_curve(tokens, reference, tmp_path):
    out = tmp_path / "killed"
    script = tmp_path / "killed_run.py"
    script.write_text(textwrap.dedent(KILLED_RUN.format(module="test_train_runs")))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(script), str(tokens), str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == -9, done.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 5
    (out / "checkpoints" / ".step_00000006.tmp").mkdir()  # as a kill during a save leaves it: ignored

    config = TrainConfig(**{**CONFIG.to_dict(), "save_every": 2})
    summary = train(MODEL, config, TokenFile(tokens, "uint16", 32, 64), out, device="cpu")
    assert summary["start_step"] == 4 and summary["complete"]
    assert_same_curve(out, reference)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002", "step_00000004", "step_00000006"]
