"""DINO ViT-B/8 as a frozen feature extractor, and a loader for the official weights file.

The network is torchvision's VisionTransformer; the official `dino_vitbase8_pretrain.pth`
uses other key names, which `dino_to_torchvision` maps one by one.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import VisionTransformer

from model.checkpoint import read_state_dict

PATCH_SIZE = 8
DEPTH = 12
WIDTH = 768
# The official weights were trained at 224 px: a 28 x 28 grid of position embeddings.
PRETRAIN_SIZE = 224
HEAD_WIDTH = 64

_BLOCK_KEYS = {
    "norm1.": "ln_1.",
    "attn.qkv.weight": "self_attention.in_proj_weight",
    "attn.qkv.bias": "self_attention.in_proj_bias",
    "attn.proj.": "self_attention.out_proj.",
    "norm2.": "ln_2.",
    "mlp.fc1.": "mlp.0.",
    "mlp.fc2.": "mlp.3.",
}
_TOP_KEYS = {
    "cls_token": "class_token",
    "pos_embed": "encoder.pos_embedding",
    "patch_embed.proj.": "conv_proj.",
    "norm.": "encoder.ln.",
}


def _rename(key: str, table: dict[str, str]) -> str | None:
    for old, new in table.items():
        if key == old or (old.endswith(".") and key.startswith(old)):
            return new + key[len(old) :]
    return None


def dino_to_torchvision(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an official DINO ViT state dict to torchvision VisionTransformer's keys.

    Raises KeyError on a key it does not know, so a wrong file never loads half-way.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("blocks."):
            _, index, rest = key.split(".", 2)
            renamed = _rename(rest, _BLOCK_KEYS)
            name = None if renamed is None else f"encoder.layers.encoder_layer_{index}.{renamed}"
        else:
            name = _rename(key, _TOP_KEYS)
        if name is None:
            raise KeyError(f"{key!r} is not a key of a DINO ViT state dict")
        out[name] = value
    return out


def vit_b8() -> VisionTransformer:
    """ViT-B/8 without a classification head, at the pretraining size."""
    return _vit(PRETRAIN_SIZE, DEPTH, WIDTH)


def _vit(image_size: int, depth: int, width: int) -> VisionTransformer:
    vit = VisionTransformer(
        image_size=image_size,
        patch_size=PATCH_SIZE,
        num_layers=depth,
        # DINO's ViTs (S/8: 384 wide, B/8: 768) all have heads of 64 channels.
        num_heads=max(1, width // HEAD_WIDTH),
        hidden_dim=width,
        mlp_dim=4 * width,
    )
    vit.heads = nn.Identity()
    return vit


def vit_for(state: dict[str, torch.Tensor]) -> VisionTransformer:
    """The /8 ViT that an official-layout DINO state dict is the weights of, by its shapes."""
    try:
        width = state["cls_token"].shape[-1]
        patch = state["patch_embed.proj.weight"].shape[-1]
        grid = math.isqrt(state["pos_embed"].shape[1] - 1)
    except (KeyError, IndexError) as error:
        raise KeyError(f"not a DINO ViT state dict: no {error}") from error
    if patch != PATCH_SIZE:
        raise ValueError(f"a DINO ViT with {patch}-pixel patches; the paper preset's is /8")
    depth = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
    return _vit(grid * PATCH_SIZE, depth, width)


class DinoFeatures(nn.Module):
    """Images in [-1, 1] -> {block: (B, 768, H/8, W/8)}, the patch tokens after that block.

    Blocks are numbered 1..12 as in the paper (3, 6, 9, 12 for scoring). Position embeddings
    are resized to the input's grid, so any multiple of 8 pixels works.
    """

    def __init__(
        self,
        vit: VisionTransformer,
        layers: tuple[int, ...],
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
    ) -> None:
        super().__init__()
        self.layers = tuple(sorted(set(layers)))
        depth = len(vit.encoder.layers)
        if self.layers[0] < 1 or self.layers[-1] > depth:
            raise ValueError(f"this DINO ViT has blocks 1..{depth}, not {self.layers}")
        self.conv_proj = vit.conv_proj
        self.class_token = vit.class_token
        self.pos_embedding = vit.encoder.pos_embedding
        # Blocks past the deepest requested one never run, so they are not kept.
        self.blocks = vit.encoder.layers[: self.layers[-1]]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def _positions(self, h: int, w: int) -> torch.Tensor:
        cls_pos, grid = self.pos_embedding[:, :1], self.pos_embedding[:, 1:]
        n = math.isqrt(grid.shape[1])
        if (h, w) == (n, n):
            return self.pos_embedding
        # Bicubic in float32: CPU has no half-precision kernel for it.
        grid = grid.reshape(1, n, n, -1).permute(0, 3, 1, 2).float()
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        grid = grid.flatten(2).transpose(1, 2).to(cls_pos.dtype)
        return torch.cat([cls_pos, grid], dim=1)

    def forward(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        x = self.conv_proj(((images.clamp(-1, 1) + 1) / 2 - self.mean) / self.std)
        b, d, h, w = x.shape
        tokens = torch.cat([self.class_token.expand(b, -1, -1), x.flatten(2).transpose(1, 2)], 1)
        tokens = tokens + self._positions(h, w)
        out: dict[int, torch.Tensor] = {}
        for index, block in enumerate(self.blocks, start=1):
            tokens = block(tokens)
            if index in self.layers:
                out[index] = tokens[:, 1:].transpose(1, 2).reshape(b, d, h, w)
        return out


def load_dino_vitb8(
    weights: str | None,
    layers: tuple[int, ...],
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
) -> DinoFeatures:
    """A DINO ViT/8 from an official-layout weights file (.pth or .safetensors), sized by its
    tensors (ViT-B/8 for the official file); None = ViT-B/8 at random weights (speed only)."""
    if weights is None:
        return DinoFeatures(vit_b8(), layers, mean, std)
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"DINO weights not found at {path}")
    state = read_state_dict(path)
    vit = vit_for(state)
    vit.load_state_dict(dino_to_torchvision(state), strict=True)
    return DinoFeatures(vit, layers, mean, std)
