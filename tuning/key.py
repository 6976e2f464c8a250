"""What a tuned plan is valid for: the device, the software, the dtype, the head dims and a shape bucket.

A plan tuned on one GPU, or under other torch / triton / deltaflex versions, says nothing about
another, so all of them are part of the key. Shapes are bucketed (powers of two of T and B*H), so a
plan tuned at T = 4096 also serves T = 3000.
"""

from __future__ import annotations

import dataclasses
import functools
import platform

import torch

DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}


def bucket(n: int, smallest: int = 1) -> int:
    """The smallest power of two >= n (and >= smallest).

    Written as comparisons, so that under torch.compile with a symbolic n Dynamo guards on the
    bucket's range instead of on n itself.
    """
    b = smallest
    while b < n:
        b *= 2
    return b


def shape_buckets(B: int, T: int, H: int) -> tuple[int, int]:
    """(T bucket, B*H bucket); T below 64 shares one bucket."""
    return bucket(T, 64), bucket(B * H)


@dataclasses.dataclass(frozen=True)
class Environment:
    """The device and software a plan was tuned on."""

    device: str  # GPU name, or the CPU's model
    capability: str  # CUDA compute capability "9.0"; "" on CPU
    torch: str
    triton: str  # "" when triton is not importable
    deltaflex: str


@dataclasses.dataclass(frozen=True)
class CacheKey:
    env: Environment
    dtype: str  # "bf16", "fp16", "fp32", "fp64"
    K: int
    V: int
    T_bucket: int
    BH_bucket: int

    @classmethod
    def for_shape(cls, env: Environment, dtype: torch.dtype, B: int, T: int, H: int, K: int, V: int) -> CacheKey:
        return cls(env, DTYPE_NAMES[dtype], K, V, *shape_buckets(B, T, H))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> CacheKey:
        """Raises TypeError / ValueError on anything but a key written by to_dict."""
        if not isinstance(data, dict) or set(data) != {f.name for f in dataclasses.fields(cls)}:
            raise ValueError(f"not a plan cache key: {data!r}")
        env = data["env"]
        if not isinstance(env, dict) or set(env) != {f.name for f in dataclasses.fields(Environment)}:
            raise ValueError(f"not a plan cache environment: {env!r}")
        if not all(isinstance(x, str) for x in env.values()) or data["dtype"] not in DTYPE_NAMES.values():
            raise ValueError(f"not a plan cache key: {data!r}")
        if not all(isinstance(data[n], int) and data[n] >= 1 for n in ("K", "V", "T_bucket", "BH_bucket")):
            raise ValueError(f"not a plan cache key: {data!r}")
        return cls(**{**data, "env": Environment(**env)})

    def same_target(self, other: CacheKey) -> bool:
        """The same device, dtype and shapes, whatever the software versions."""
        return (self.env.device, self.env.capability) == (other.env.device, other.env.capability) and dataclasses.replace(
            self, env=other.env
        ) == other

    def describe(self) -> str:
        return f"{self.dtype} K={self.K} V={self.V} T<={self.T_bucket} B*H<={self.BH_bucket}"


@functools.cache
def _versions() -> tuple[str, str, str]:
    import deltaflex

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    return torch.__version__, triton_version, deltaflex.__version__


@functools.cache
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


@functools.cache
def environment(device_type: str, index: int | None = None) -> Environment:
    """The environment of a device ("cuda" with an index, or "cpu")."""
    torch_version, triton_version, deltaflex_version = _versions()
    if device_type == "cuda":
        index = torch.cuda.current_device() if index is None else index
        major, minor = torch.cuda.get_device_capability(index)
        name, capability = torch.cuda.get_device_name(index), f"{major}.{minor}"
    elif device_type == "cpu":
        name, capability = _cpu_model(), ""
    else:
        raise ValueError(f"plans are tuned for 'cuda' or 'cpu' devices, got {device_type!r}")
    return Environment(name, capability, torch_version, triton_version, deltaflex_version)


def device_environment(device: torch.device) -> Environment:
    return environment(device.type, device.index)
