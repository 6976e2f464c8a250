"""Data by position: token windows and their next-token labels, a fresh permutation every epoch, the
same global batch whatever the number of ranks; bad token files refused up front."""

import pytest
import torch

from deltaflex.models.mqar import MQARTask
from deltaflex.train import MQARData, TokenFile, write_token_file
from deltaflex.train.data import rank_batch


def write_tokens(path, tokens: torch.Tensor, dtype="uint16"):
    return write_token_file(path, tokens.long(), dtype)


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_windows_and_labels(tmp_path, dtype):
    ids = torch.randint(0, 70000 if dtype == "uint32" else 60000, (8 * 5 + 3,))
    path = write_tokens(tmp_path / "t.bin", ids, dtype)
    assert path.stat().st_size == ids.numel() * (2 if dtype == "uint16" else 4)
    data = TokenFile(path, dtype, seq_len=8, shuffle=False)
    assert data.num_tokens == ids.numel() and data.num_windows == 5
    inputs, labels = data.examples(1, 3)
    for row, w in enumerate((1, 2, 3)):
        assert torch.equal(inputs[row], ids[8 * w : 8 * w + 8]) and torch.equal(labels[row], ids[8 * w + 1 : 8 * w + 9])
    assert inputs.dtype == torch.int64


def test_every_window_once_an_epoch_in_a_new_order(tmp_path):
    ids = torch.arange(7 * 4 + 1) % 50  # window w starts with token 4 w: its id names it
    data = TokenFile(write_tokens(tmp_path / "t.bin", ids), seq_len=4, vocab_size=50, seed=3)
    first = data.examples(0, 7)[0][:, 0] // 4
    second = data.examples(7, 7)[0][:, 0] // 4
    assert sorted(first.tolist()) == list(range(7)) == sorted(second.tolist())
    assert first.tolist() != second.tolist()


def test_ranks_split_the_global_batch(tmp_path):
    data = TokenFile(write_tokens(tmp_path / "t.bin", torch.randint(0, 100, (1000,))), seq_len=16, vocab_size=100)
    mqar = MQARData(MQARTask(vocab_size=64, seq_len=32, num_pairs=4), seed=1)
    for source in (data, mqar):
        whole = rank_batch(source, 5, 4, 0, 1)
        parts = [rank_batch(source, 5, 4, r, 2) for r in range(2)]
        for i in range(2):
            assert torch.equal(torch.cat([p[i] for p in parts]), whole[i])
        assert not torch.equal(rank_batch(source, 6, 4, 0, 1)[0], whole[0])


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TokenFile(tmp_path / "nope.bin")


def test_truncated_file(tmp_path):
    path = tmp_path / "t.bin"
    path.write_bytes(b"\x01\x00" * 40 + b"\x01")
    with pytest.raises(ValueError, match="truncated: 81 bytes is not a whole number of uint16 tokens"):
        TokenFile(path, seq_len=8)
    path.write_bytes(write_tokens(tmp_path / "u.bin", torch.randint(0, 10, (21,)), "uint32").read_bytes()[:-2])
    with pytest.raises(ValueError, match="truncated: 82 bytes is not a whole number of uint32"):
        TokenFile(path, "uint32", seq_len=8)


def test_too_short_file(tmp_path):
    with pytest.raises(ValueError, match="holds 8 tokens, fewer than one sequence of seq_len \\+ 1 = 9"):
        TokenFile(write_tokens(tmp_path / "t.bin", torch.zeros(8)), seq_len=8)


def test_ids_outside_the_vocabulary(tmp_path):
    ids = torch.randint(0, 32, (100,))
    ids[37] = 40
    with pytest.raises(ValueError, match="token id 40 \\(at token 37\\), outside the model's vocabulary of 32"):
        TokenFile(write_tokens(tmp_path / "t.bin", ids), seq_len=8, vocab_size=32)


def test_bad_dtype(tmp_path):
    with pytest.raises(ValueError, match="token dtype must be one of"):
        TokenFile(write_tokens(tmp_path / "t.bin", torch.zeros(100)), "int32")


def test_write_token_file_refuses_to_overwrite_and_out_of_range_ids(tmp_path):
    path = write_tokens(tmp_path / "t.bin", torch.tensor([1, 2, 3]))
    with pytest.raises(FileExistsError, match="not overwritten"):
        write_tokens(path, torch.tensor([4]))
    assert TokenFile(path, seq_len=2).tokens.tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="ids must lie in \\[0, 65535\\] to be stored as uint16"):
        write_tokens(tmp_path / "u.bin", torch.tensor([65536]))
    with pytest.raises(ValueError, match="non-empty 1-D integer tensor"):
        write_tokens(tmp_path / "u.bin", torch.zeros(2, 2, dtype=torch.long))
    assert not (tmp_path / "u.bin").exists()
