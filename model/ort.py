"""ONNX Runtime sessions of a product's exported model, wrapped as its denoiser and features.

The wrappers take and return torch tensors, so the sampler and scoring run unchanged. Inputs
and outputs are bound in place (I/O binding): on a GPU the tensors never leave it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from model.checkpoint import CheckpointError
from model.config import FeatureConfig

UNET = "unet"
FEATURES = "features"
# Stamped into each file by `glad export`, checked on load: a retrained model or changed
# features never run with stale ONNX files.
WEIGHTS_KEY = "glad.weights_sha256"
FEATURES_KEY = "glad.features"
LAYER_PREFIX = "layer_"

_TORCH = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16}
_TORCH["tensor(int64)"] = torch.int64
_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}


def onnx_file(folder: Path, part: str, dtype: torch.dtype) -> Path:
    """Where `glad export` writes a part (UNET or FEATURES) in a dtype."""
    return folder / (f"{part}.fp16.onnx" if dtype == torch.float16 else f"{part}.onnx")


def features_stamp(config: FeatureConfig) -> str:
    return json.dumps(config.model_dump(mode="json"), sort_keys=True)


def session_options(threads: int | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # The graphs are chains of large ops: all cores inside each op, one op at a time.
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Torch runs between the sessions' calls (sampler, scoring): idle ORT threads that spin
    # would take its cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def providers(device: torch.device) -> list[str | tuple[str, dict[str, int]]]:
    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise RuntimeError(
            "this onnxruntime has no CUDA execution provider: install onnxruntime-gpu"
        )
    return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]


class OrtModule:
    """One ONNX session called with torch tensors; outputs have a dynamic batch axis only."""

    def __init__(self, path: Path, device: torch.device, threads: int | None = None) -> None:
        self.path = path
        self.device = device
        self.session = ort.InferenceSession(
            str(path), session_options(threads), providers=providers(device)
        )
        self.inputs = [(i.name, _TORCH[i.type]) for i in self.session.get_inputs()]
        self.outputs = [(o.name, _TORCH[o.type], o.shape) for o in self.session.get_outputs()]
        if any(not isinstance(d, int) for _, _, shape in self.outputs for d in shape[1:]):
            raise CheckpointError(f"{path} has dynamic axes other than the batch")
        self.metadata: dict[str, str] = self.session.get_modelmeta().custom_metadata_map

    def __call__(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        binding = self.session.io_binding()
        kind, index = self.device.type, self.device.index or 0
        inputs = [
            t.to(self.device, dtype).contiguous()
            for (_, dtype), t in zip(self.inputs, tensors, strict=True)
        ]
        for (name, dtype), x in zip(self.inputs, inputs, strict=True):
            binding.bind_input(name, kind, index, _NUMPY[dtype], tuple(x.shape), x.data_ptr())
        batch = inputs[0].shape[0]
        outputs = []
        for name, dtype, shape in self.outputs:
            out = torch.empty((batch, *shape[1:]), device=self.device, dtype=dtype)
            binding.bind_output(name, kind, index, _NUMPY[dtype], tuple(out.shape), out.data_ptr())
            outputs.append(out)
        if kind == "cuda":
            # ORT runs on its own stream: the inputs torch wrote must be there first.
            torch.cuda.current_stream(self.device).synchronize()
        self.session.run_with_iobinding(binding)
        return outputs


class OrtDenoiser:
    """eps(z_t, t) from an exported denoiser; t is a (B,) int64 tensor."""

    def __init__(self, module: OrtModule) -> None:
        self.module = module

    def __call__(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.module(z, t)[0].to(z.dtype)


class OrtFeatures:
    """Images in [-1, 1] -> {layer: (B, C, h, w)} from an exported feature extractor."""

    def __init__(self, module: OrtModule) -> None:
        self.module = module
        self.layers = [int(name.removeprefix(LAYER_PREFIX)) for name, _, _ in module.outputs]

    def __call__(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        outs = self.module(images)
        return {layer: out.to(images.dtype) for layer, out in zip(self.layers, outs, strict=True)}


def load_onnx_parts(
    folder: Path,
    weights_sha256: str,
    features: FeatureConfig,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[OrtDenoiser, OrtFeatures]:
    """The folder's ONNX denoiser and features; CheckpointError if missing or stale."""
    modules = {}
    for part in (UNET, FEATURES):
        path = onnx_file(folder, part, dtype)
        if not path.is_file():
            flag = " --dtypes fp16" if dtype == torch.float16 else ""
            raise CheckpointError(f"{path} is missing: run `glad export --model {folder}{flag}`")
        modules[part] = OrtModule(path, device)
        if modules[part].metadata.get(WEIGHTS_KEY) != weights_sha256:
            raise CheckpointError(f"{path} was exported from other weights: export again")
    if modules[FEATURES].metadata.get(FEATURES_KEY) != features_stamp(features):
        raise CheckpointError(
            f"{onnx_file(folder, FEATURES, dtype)} has other features: export again"
        )
    return OrtDenoiser(modules[UNET]), OrtFeatures(modules[FEATURES])
