import pytest

from deltaflex.chunk.stages import STAGES, available_backends, implementation


def test_every_stage_has_its_compiled_backend():
    for stage in STAGES:
        assert "compiled" in available_backends(stage)
        forward, backward = implementation(stage, "compiled")
        assert callable(forward) and callable(backward)


def test_missing_backend_is_a_clear_error():
    with pytest.raises(NotImplementedError, match="'nope'"):
        implementation("solve", "nope")
