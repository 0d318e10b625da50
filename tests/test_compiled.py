"""How workers run their models: compiled at batch buckets (logic, on the CPU), CPU threads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from model.compiled import BUCKETS, Bucketed, bucket, compile_inspector
from model.inspector import Inspector
from service import registry as registry_module
from service.registry import Registry
from tests.conftest import TINY_PRODUCT


class _PerSample(nn.Module):
    """Records the batch sizes it sees; each output row depends on its own row only."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> dict[int, torch.Tensor]:
        self.seen.append(x.shape[0])
        return {1: x * t.view(-1, 1), 2: x.sum(1, keepdim=True)}


def test_a_batch_runs_at_the_smallest_bucket_that_holds_it() -> None:
    assert [bucket(b) for b in (1, 2, 3, 5, 8, 9, 32)] == [1, 2, 4, 8, 8, 16, 32]
    assert bucket(33) is None and BUCKETS[-1] == 32


def test_padding_is_sliced_off_and_changes_no_real_sample() -> None:
    module = _PerSample()
    wrapped = Bucketed(module, None, backend="eager")
    x, t = torch.randn(3, 5), torch.tensor([1.0, 2.0, 3.0])
    out = wrapped(x, t)
    assert module.seen == [4]
    expected = _PerSample()(x, t)
    assert set(out) == {1, 2}
    for key in out:
        torch.testing.assert_close(out[key], expected[key], rtol=0, atol=0)
    wrapped(torch.randn(40, 5), torch.ones(40))  # above the largest bucket: eager, unpadded
    assert module.seen[-1] == 40


def test_a_compiled_model_scores_as_the_eager_one(tiny_model_dir: Path) -> None:
    folder = tiny_model_dir / TINY_PRODUCT
    eager = Inspector.load(folder)
    compiled = Inspector.load(folder)
    compile_inspector(compiled, max_batch=4, backend="eager")
    images = torch.rand(3, 3, 64, 64) * 2 - 1
    a, b = eager.pipeline(images), compiled.pipeline(images)
    torch.testing.assert_close(b.scores, a.scores, rtol=1e-3, atol=1e-5)
    # The fused map, the memory's part in it included.
    assert compiled.pipeline.memory is not None
    torch.testing.assert_close(b.maps, a.maps, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(b.reconstruction.denoise_steps, a.reconstruction.denoise_steps)


def test_a_capture_that_fails_puts_the_eager_parts_back(tiny_model_dir: Path) -> None:
    inspector = Inspector.load(tiny_model_dir / TINY_PRODUCT)
    eager = inspector.pipeline.denoiser, inspector.pipeline.features

    def no_capture(batch_size: int = 1) -> None:
        raise RuntimeError("out of graph memory")

    inspector.pipeline.warm_up = no_capture  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="graph memory"):
        compile_inspector(inspector, max_batch=2, backend="eager")
    assert (inspector.pipeline.denoiser, inspector.pipeline.features) == eager


def test_the_registry_compiles_before_it_hands_a_model_out(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    captured: list[int] = []

    def traced(inspector: Inspector, max_batch: int) -> None:
        captured.append(max_batch)
        compile_inspector(inspector, max_batch, backend="eager")

    monkeypatch.setattr(registry_module, "compile_inspector", traced)
    registry = Registry(tiny_model_dir, "cpu", compile_up_to=2)
    loaded = registry.refresh()[TINY_PRODUCT].inspector
    assert captured == [2]
    parts = loaded.pipeline
    assert isinstance(parts.denoiser, Bucketed) and isinstance(parts.features, Bucketed)


def test_a_model_that_fails_to_compile_is_served_uncompiled(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(inspector: Inspector, max_batch: int) -> None:
        raise RuntimeError("no compiler on this host")

    monkeypatch.setattr(registry_module, "compile_inspector", broken)
    loaded = Registry(tiny_model_dir, "cpu", compile_up_to=2).refresh()[TINY_PRODUCT].inspector
    assert not isinstance(loaded.pipeline.denoiser, Bucketed)


def test_a_cpu_worker_shares_the_cores_out_between_its_lanes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cores = len(os.sched_getaffinity(0))
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        Registry(tmp_path, "cpu", lanes=2)
        assert torch.get_num_threads() == max(1, cores // 2)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(before)
        Registry(tmp_path, "cpu")  # the user's setting stands
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)
