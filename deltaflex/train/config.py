"""`TrainConfig`: how a `CausalLM` is trained (steps, batch, schedule, optimiser, checkpoints), as a
JSON-serialisable dataclass.

The batch is global: `batch_size` sequences of `seq_len` tokens a step, whatever the number of ranks;
each rank takes batch_size / world_size of them, in micro-batches of `micro_batch_size` (gradient
accumulation when smaller). So a run's loss curve does not depend on how many ranks compute it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..validation import config_fields

# Fields a resumed run may change: they do not change what is computed at a step (steps extends or
# shortens the schedule, which the user asks for knowingly)
RESUMABLE_CHANGES = ("steps", "micro_batch_size", "log_every", "save_every", "keep_checkpoints", "compile")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 8  # global: sequences a step over all ranks
    seq_len: int = 2048
    micro_batch_size: int | None = None  # per rank and forward; None: batch_size / world_size
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio at the last step
    warmup_steps: int = 100  # linear warm-up from lr / warmup_steps
    weight_decay: float = 0.1  # on matrices and embeddings, not on norms and biases
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    seed: int = 0  # the initial weights and the data order
    bf16: bool | None = None  # bf16 autocast over fp32 weights; None: on CUDA
    compile: bool = False  # torch.compile the model (each block under FSDP)
    plan: str | None = None  # the DeltaNet layers' delta-rule plan (None: the library default)
    log_every: int = 10  # steps between metric records (and host syncs)
    save_every: int = 0  # steps between checkpoints; 0: only at the end
    keep_checkpoints: int = 2  # the newest ones kept

    def __post_init__(self):
        object.__setattr__(self, "betas", tuple(self.betas))
        for name in ("steps", "batch_size", "seq_len", "log_every", "keep_checkpoints"):
            _check_int(name, getattr(self, name), 1)
        for name in ("warmup_steps", "save_every", "seed"):
            _check_int(name, getattr(self, name), 0)
        if self.micro_batch_size is not None:
            _check_int("micro_batch_size", self.micro_batch_size, 1)
        if not _number(self.lr) or not self.lr > 0:
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not _number(self.min_lr_ratio) or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        for name in ("weight_decay", "grad_clip"):
            if not _number(getattr(self, name)) or not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {getattr(self, name)!r}")
        if not _number(self.eps) or not self.eps > 0:
            raise ValueError(f"eps must be a positive number, got {self.eps!r}")
        if len(self.betas) != 2 or not all(_number(b) and 0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        for name in ("bf16",):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be None or a bool, got {getattr(self, name)!r}")
        if not isinstance(self.compile, bool):
            raise TypeError(f"compile must be a bool, got {self.compile!r}")
        if self.plan is not None:
            from ..plan import PLAN_NAMES

            if self.plan not in PLAN_NAMES:
                raise ValueError(f"plan must be None or one of {PLAN_NAMES}, got {self.plan!r}")

    def micro_batches(self, world_size: int) -> tuple[int, int]:
        """(sequences a rank takes a step, micro-batch size); ValueError when the batch does not split."""
        if self.batch_size % world_size:
            raise ValueError(f"batch_size = {self.batch_size} must be a multiple of the world size {world_size}")
        local = self.batch_size // world_size
        micro = local if self.micro_batch_size is None else self.micro_batch_size
        if local % micro:
            raise ValueError(
                f"micro_batch_size = {micro} must divide the {local} sequences a rank takes a step "
                f"(batch_size {self.batch_size} over {world_size} ranks)"
            )
        return local, micro

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        return cls(**config_fields(cls, data, "TrainConfig"))

    @classmethod
    def from_json(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
