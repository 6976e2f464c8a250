import dataclasses

import pytest
import torch

from deltaflex.tuning.key import CacheKey, Environment, bucket, environment

ENV = Environment("NVIDIA H200", "9.0", "2.11.0", "3.6.0", "0.1.0")


def test_bucket_is_the_next_power_of_two():
    assert [bucket(n) for n in (1, 2, 3, 64, 65, 4096, 4097)] == [1, 2, 4, 64, 128, 4096, 8192]
    assert bucket(10, 64) == 64


def test_keys_bucket_shapes():
    key = CacheKey.for_shape(ENV, torch.bfloat16, 4, 3000, 16, 128, 128)
    assert (key.dtype, key.K, key.V, key.T_bucket, key.BH_bucket) == ("bf16", 128, 128, 4096, 64)
    assert key == CacheKey.for_shape(ENV, torch.bfloat16, 2, 4096, 32, 128, 128)  # same buckets
    assert key != CacheKey.for_shape(ENV, torch.bfloat16, 4, 3000, 16, 64, 128)  # head dims are exact
    assert key != CacheKey.for_shape(ENV, torch.float32, 4, 3000, 16, 128, 128)


def test_key_round_trip_and_junk():
    key = CacheKey.for_shape(ENV, torch.float16, 8, 2048, 32, 64, 32)
    assert CacheKey.from_dict(key.to_dict()) == key
    for junk in (None, {}, {**key.to_dict(), "extra": 1}, {**key.to_dict(), "K": "64"}, {**key.to_dict(), "dtype": "int8"},
                 {**key.to_dict(), "env": {"device": "x"}}, {**key.to_dict(), "env": {**key.to_dict()["env"], "torch": 2}}):
        with pytest.raises((TypeError, ValueError)):
            CacheKey.from_dict(junk)


def test_same_target_ignores_versions_only():
    key = CacheKey.for_shape(ENV, torch.bfloat16, 8, 2048, 32, 64, 64)
    newer = dataclasses.replace(key, env=dataclasses.replace(ENV, torch="2.12.0"))
    other_gpu = dataclasses.replace(key, env=dataclasses.replace(ENV, device="NVIDIA H100"))
    assert newer != key and newer.same_target(key)
    assert not other_gpu.same_target(key)
    assert not dataclasses.replace(newer, K=128).same_target(key)


def test_cpu_environment():
    env = environment("cpu")
    assert env.device and env.capability == "" and env.torch == torch.__version__
    with pytest.raises(ValueError, match="'cuda' or 'cpu'"):
        environment("mps")
