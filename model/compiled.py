"""Compiled inference: the denoiser and the feature extractor under torch.compile at fixed
batch sizes (on CUDA with CUDA graphs), the ADS loop with its data-dependent control flow
left eager around them.

A call at another batch size is padded up to the next bucket with copies of its last
sample, and the padding is sliced off the result. Every part works per sample (group norm,
attention within a sample), so the padding changes nothing for the real samples.
"""

from __future__ import annotations

import torch
from torch import nn

from model.inspector import Inspector

BUCKETS = (1, 2, 4, 8, 16, 32)


def bucket(batch: int, buckets: tuple[int, ...] = BUCKETS) -> int | None:
    """The smallest bucket that holds `batch`; None above the largest."""
    return next((size for size in buckets if size >= batch), None)


def _padded(tensor: torch.Tensor, size: int) -> torch.Tensor:
    extra = size - tensor.shape[0]
    if extra == 0:
        return tensor
    return torch.cat([tensor, tensor[-1:].expand(extra, *tensor.shape[1:])])


class Bucketed(nn.Module):
    """A module compiled for fixed batch sizes; calls are padded up to the next bucket.

    Every tensor argument is batched along dim 0; the result is a tensor or a dict of
    tensors, each sliced back to the call's batch. Above the largest bucket it runs eager.
    """

    def __init__(self, module: nn.Module, mode: str | None, backend: str = "inductor") -> None:
        super().__init__()
        self.module = module
        self.compiled = torch.compile(module, mode=mode, backend=backend, dynamic=False)
        # CUDA graphs write every call's outputs into the same buffers, and the ADS loop
        # keeps some (the input's features) across later calls: those are copied out.
        self.copy_outputs = mode == "reduce-overhead"

    def forward(self, *args: torch.Tensor) -> torch.Tensor | dict[int, torch.Tensor]:
        batch = args[0].shape[0]
        size = bucket(batch)
        if size is None:
            return self.module(*args)
        out = self.compiled(*(_padded(a, size) for a in args))
        if isinstance(out, dict):
            return {key: self._own(value[:batch]) for key, value in out.items()}
        return self._own(out[:batch])

    def _own(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.clone() if self.copy_outputs else tensor


def compile_inspector(inspector: Inspector, max_batch: int, backend: str = "inductor") -> None:
    """Compile an Inspector's denoiser and feature extractor in place, and capture every
    bucket up to max_batch now, so that the first requests pay nothing. Where compiling
    fails, the eager parts are put back before the error is raised.

    backend: torch.compile's ("eager" traces without generating code: the tests' choice).
    """
    pipeline = inspector.pipeline
    mode = "reduce-overhead" if pipeline.device.type == "cuda" else None
    eager = pipeline.denoiser, pipeline.features
    pipeline.denoiser = Bucketed(pipeline.denoiser, mode, backend)
    pipeline.features = Bucketed(pipeline.features, mode, backend)
    largest = bucket(max_batch) or BUCKETS[-1]
    try:
        for size in BUCKETS:
            if size <= largest:
                pipeline.warm_up(size)
    except Exception:
        pipeline.denoiser, pipeline.features = eager
        raise
