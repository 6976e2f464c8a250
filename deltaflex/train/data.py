"""Training data addressed by position, so that any rank can read its share of any step's batch.

A source is a sequence of training examples (inputs [seq_len], labels [seq_len]) numbered 0, 1, ...;
step s's global batch is examples [s * B, (s + 1) * B) and rank r of W takes rows
[r * B / W, (r + 1) * B / W) of it. The data position is therefore the step: resuming needs nothing
else, and the same global batch comes out whatever the number of ranks.

  TokenFile  a flat array of uint16 or uint32 token ids on disk (nanoGPT's .bin files), memory-mapped;
             example i is window p(i) of seq_len + 1 tokens (inputs, and the next tokens as labels),
             windows tile the file, and p is a seeded permutation of them, new every epoch
  MQARData   the synthetic MQAR task (deltaflex.models.mqar): step s's batch drawn from seed and s
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from ..models.mqar import MQARTask, mqar_batch

TOKEN_DTYPES = {"uint16": torch.uint16, "uint32": torch.uint32}
_CHECKED_TOKENS = 1 << 20  # token ids checked against the vocabulary before training


def write_token_file(path: str | Path, ids: torch.Tensor, dtype: str = "uint16") -> Path:
    """Writes token ids (a 1-D integer tensor) as the flat array TokenFile reads; refuses to overwrite."""
    if dtype not in TOKEN_DTYPES:
        raise ValueError(f"token dtype must be one of {tuple(TOKEN_DTYPES)}, got {dtype!r}")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.numel() == 0 or ids.is_floating_point() or ids.is_complex():
        raise ValueError(f"ids must be a non-empty 1-D integer tensor, got {getattr(ids, 'shape', type(ids).__name__)}")
    top = (1 << (8 * TOKEN_DTYPES[dtype].itemsize)) - 1
    if int(ids.min()) < 0 or int(ids.max()) > top:
        raise ValueError(f"ids must lie in [0, {top}] to be stored as {dtype}, got [{int(ids.min())}, {int(ids.max())}]")
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{str(path)!r} exists; token files are not overwritten")
    mapped = torch.from_file(str(path), shared=True, size=ids.numel(), dtype=TOKEN_DTYPES[dtype])  # creates the file
    mapped.copy_(ids.to(torch.int64).to(TOKEN_DTYPES[dtype]))
    del mapped
    return path


class TokenFile:
    def __init__(self, path: str | Path, dtype: str = "uint16", seq_len: int = 2048, vocab_size: int | None = None,
                 seed: int = 0, shuffle: bool = True):
        if dtype not in TOKEN_DTYPES:
            raise ValueError(f"token dtype must be one of {tuple(TOKEN_DTYPES)}, got {dtype!r}")
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"token file {str(path)!r} does not exist (or is not a file)")
        width = TOKEN_DTYPES[dtype].itemsize
        size = os.path.getsize(path)
        if size % width:
            raise ValueError(f"token file {str(path)!r} is truncated: {size} bytes is not a whole number of "
                             f"{dtype} tokens ({width} bytes each)")
        self.num_tokens = size // width
        if self.num_tokens < seq_len + 1:
            raise ValueError(f"token file {str(path)!r} holds {self.num_tokens} tokens, fewer than one sequence "
                             f"of seq_len + 1 = {seq_len + 1}")
        self.path, self.dtype, self.seq_len, self.seed, self.shuffle = path, dtype, seq_len, seed, shuffle
        self.vocab_size = vocab_size
        # shared=False maps the file copy-on-write: pages are read on demand, the file is never written
        self.tokens = torch.from_file(str(path), shared=False, size=self.num_tokens, dtype=TOKEN_DTYPES[dtype])
        self.num_windows = (self.num_tokens - 1) // seq_len
        if vocab_size is not None:
            self._check_ids(0, min(self.num_tokens, _CHECKED_TOKENS))

    def describe(self) -> dict:
        """What a checkpoint records, to refuse resuming on other data."""
        return {"kind": "tokens", "path": str(self.path.resolve()), "dtype": self.dtype, "num_tokens": self.num_tokens,
                "shuffle": self.shuffle}

    def examples(self, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Examples [start, start + count): (inputs, labels), int64 [count, seq_len] on the CPU."""
        rows = [self._window(i) for i in range(start, start + count)]
        windows = torch.stack([self.tokens[w * self.seq_len : (w + 1) * self.seq_len + 1] for w in rows]).long()
        if self.vocab_size is not None and int(windows.max()) >= self.vocab_size:
            self._check_ids(rows[int(windows.max(dim=1).values.argmax())] * self.seq_len, self.seq_len + 1)
        return windows[:, :-1], windows[:, 1:]

    def _window(self, i: int) -> int:
        epoch, j = divmod(i, self.num_windows)
        if not self.shuffle:
            return j
        a, b = _affine_permutation(self.num_windows, self.seed, epoch)
        return (a * j + b) % self.num_windows

    def _check_ids(self, start: int, count: int) -> None:
        chunk = self.tokens[start : start + count].long()
        top = int(chunk.max())
        if top >= self.vocab_size:
            at = start + int(chunk.argmax())
            raise ValueError(f"token file {str(self.path)!r} holds token id {top} (at token {at}), outside the "
                             f"model's vocabulary of {self.vocab_size}; wrong --token-dtype or vocab_size?")


def _affine_permutation(n: int, seed: int, epoch: int) -> tuple[int, int]:
    """i -> (a i + b) mod n with gcd(a, n) = 1: a permutation of n windows in O(1) memory, new each epoch."""
    g = torch.Generator().manual_seed((seed << 20) + epoch)
    a, b = (int(v) for v in torch.randint(0, max(n, 2), (2,), generator=g))
    a = max(a, 1)
    while math.gcd(a, n) != 1:
        a += 1
    return a, b


class MQARData:
    def __init__(self, task: MQARTask, seed: int = 0):
        self.task, self.seed, self.seq_len = task, seed, task.seq_len

    def describe(self) -> dict:
        return {"kind": "mqar", **{k: getattr(self.task, k) for k in ("vocab_size", "seq_len", "num_pairs", "power_a", "random_fill")}}

    def batch(self, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Step `step`'s global batch (every rank draws it whole and keeps its rows: MQAR is cheap)."""
        g = torch.Generator().manual_seed((self.seed << 32) + step)
        b = mqar_batch(self.task, batch_size, g)
        return b.inputs, b.labels


def rank_batch(source, step: int, batch_size: int, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's rows of step `step`'s global batch of `batch_size` examples, on the CPU."""
    local = batch_size // world_size
    if isinstance(source, MQARData):
        inputs, labels = source.batch(step, batch_size)
        return inputs[rank * local : (rank + 1) * local], labels[rank * local : (rank + 1) * local]
    return source.examples(step * batch_size + rank * local, local)
