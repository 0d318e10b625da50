"""`glad export`: a product's denoiser and feature extractor as ONNX files in its folder.

ONNX files hold a graph and tensors, no code, so the folder still runs nothing on load.
Each file has a dynamic batch axis and is stamped with the weights it came from.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from model.checkpoint import load_model_folder, rewrite_config
from model.ort import (
    FEATURES,
    FEATURES_KEY,
    LAYER_PREFIX,
    UNET,
    WEIGHTS_KEY,
    features_stamp,
    onnx_file,
)
from model.parts import folder_parts

# Example batch for tracing: 1 would be specialised as a constant.
_TRACE_BATCH = 2


class _LayersAsTuple(nn.Module):
    """ONNX graphs return tensors, not dicts: the layers in ascending order."""

    def __init__(self, features: nn.Module, layers: tuple[int, ...]) -> None:
        super().__init__()
        self.features = features
        self.layers = layers

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.features(images)
        return tuple(out[layer] for layer in self.layers)


def export_module(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    metadata: dict[str, str],
) -> None:
    """torch.export-based ONNX export with every input's first axis dynamic; atomic write."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(
        module,
        args,
        dynamo=True,
        input_names=input_names,
        output_names=output_names,
        dynamic_shapes=tuple({0: batch} for _ in args),
        external_data=False,
        optimize=True,
        verbose=False,
    )
    program.model.metadata_props.update(metadata)
    tmp = path.with_name(f".{path.name}.tmp")
    program.save(str(tmp), external_data=False)
    os.replace(tmp, path)


def export_model_folder(
    folder: Path, dtypes: tuple[torch.dtype, ...] = (torch.float32,), activate: bool = True
) -> list[Path]:
    """Write unet[.fp16].onnx and features[.fp16].onnx; `activate` makes ORT the backend."""
    loaded = load_model_folder(folder)
    config = loaded.config
    stamp = {WEIGHTS_KEY: loaded.training["weights_sha256"]}
    layers = tuple(sorted({config.features.ads_layer, *config.features.score_layers}))
    written = []
    for dtype in dtypes:
        torch_model = folder_parts(folder, loaded, torch.device("cpu"), dtype, "torch")
        size = config.image_size // torch_model.space.fold
        z = torch.zeros(_TRACE_BATCH, torch_model.space.channels, size, size, dtype=dtype)
        t = torch.full((_TRACE_BATCH,), 1, dtype=torch.long)
        path = onnx_file(folder, UNET, dtype)
        export_module(torch_model.denoiser, (z, t), path, ["z", "t"], ["eps"], stamp)
        written.append(path)

        images = torch.zeros(_TRACE_BATCH, 3, config.image_size, config.image_size, dtype=dtype)
        path = onnx_file(folder, FEATURES, dtype)
        export_module(
            _LayersAsTuple(torch_model.features, layers).eval(),
            (images,),
            path,
            ["images"],
            [f"{LAYER_PREFIX}{layer}" for layer in layers],
            {**stamp, FEATURES_KEY: features_stamp(config.features)},
        )
        written.append(path)
    if activate:
        # config.json last: a worker polling the folder switches once the files are there.
        runtime = config.with_overrides(runtime={"backend": "onnxruntime"})
        rewrite_config(folder, runtime)
    return written
