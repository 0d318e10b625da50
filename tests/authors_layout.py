"""The files the authors' GLAD recipe leaves on disk, at tiny sizes with random weights.

- a Stable Diffusion v1.x folder as diffusers lays it out (vae/, unet/, scheduler/,
  text_encoder/, tokenizer/ with CLIP's vocab.json and merges.txt);
- their fine-tuned UNet, as accelerate's save_state writes it:
  `model/<class>_4000step_bs32_eps_anomaly2_<seed>/checkpoint-<step>/model.safetensors`;
- DINO's `dino_vitbase8_pretrain.pth`, with the official key names (64 wide, not 768).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDIMScheduler
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from model.config import DiffusionConfig
from model.sd import build_sd_unet, build_sd_vae

IMAGE_SIZE = 64
TINY_UNET = DiffusionConfig(
    space="vae",
    block_out_channels=(32, 32, 32, 32),
    attention_levels=(True, True, True, False),
    norm_num_groups=8,
)
DINO_WIDTH, DINO_DEPTH, DINO_GRID = 64, 12, 28


@dataclass(frozen=True)
class AuthorsFiles:
    sd: Path
    checkpoint: Path  # the accelerate checkpoint-N folder of the fine-tuned UNet
    dino: Path


def _clip_byte_alphabet() -> list[str]:
    """The 256 characters CLIP's byte-level BPE writes bytes as."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += list(range(ord("®"), ord("ÿ") + 1))
    others = [b for b in range(256) if b not in printable]
    return [chr(c) for c in printable] + [chr(256 + i) for i in range(len(others))]


def _write_clip(sd: Path) -> None:
    """A one-layer CLIP text encoder and a byte-level tokenizer (no merges)."""
    alphabet = _clip_byte_alphabet()
    tokens = [*alphabet, *(c + "</w>" for c in alphabet), "<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = sd / "tokenizer"
    tokenizer.mkdir(parents=True)
    (tokenizer / "vocab.json").write_text(json.dumps(vocab))
    (tokenizer / "merges.txt").write_text("#version: 0.2\n")
    (tokenizer / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77})
    )
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=768,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=1,
        max_position_embeddings=77,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    torch.manual_seed(2)
    CLIPTextModel(config).save_pretrained(sd / "text_encoder")


def official_dino_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A DINO ViT/8 state dict with the official key names, DINO_WIDTH wide."""
    g = torch.Generator().manual_seed(seed)
    d = DINO_WIDTH
    shapes = {
        "cls_token": (1, 1, d),
        "pos_embed": (1, 1 + DINO_GRID**2, d),
        "patch_embed.proj.weight": (d, 3, 8, 8),
        "patch_embed.proj.bias": (d,),
        "norm.weight": (d,),
        "norm.bias": (d,),
    }
    for i in range(DINO_DEPTH):
        shapes |= {
            f"blocks.{i}.norm1.weight": (d,),
            f"blocks.{i}.norm1.bias": (d,),
            f"blocks.{i}.attn.qkv.weight": (3 * d, d),
            f"blocks.{i}.attn.qkv.bias": (3 * d,),
            f"blocks.{i}.attn.proj.weight": (d, d),
            f"blocks.{i}.attn.proj.bias": (d,),
            f"blocks.{i}.norm2.weight": (d,),
            f"blocks.{i}.norm2.bias": (d,),
            f"blocks.{i}.mlp.fc1.weight": (4 * d, d),
            f"blocks.{i}.mlp.fc1.bias": (4 * d,),
            f"blocks.{i}.mlp.fc2.weight": (d, 4 * d),
            f"blocks.{i}.mlp.fc2.bias": (d,),
        }
    state = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    for name in ("norm.weight", *(f"blocks.{i}.norm{j}.weight" for i in range(12) for j in (1, 2))):
        state[name] = torch.ones(d)
    return state


def write_authors_files(root: Path) -> AuthorsFiles:
    """The three things the authors' recipe leaves, under root."""
    sd = root / "stable-diffusion-v1-4"
    torch.manual_seed(0)
    build_sd_vae((8, 8, 8, 8), 8).save_pretrained(sd / "vae")
    build_sd_unet(TINY_UNET, IMAGE_SIZE).save_pretrained(sd / "unet")
    DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
    ).save_pretrained(sd / "scheduler")
    _write_clip(sd)

    # The fine-tuned UNet differs from SD's: other weights, the same architecture.
    torch.manual_seed(1)
    finetuned = build_sd_unet(TINY_UNET, IMAGE_SIZE).state_dict()
    checkpoint = root / "model" / "widget_4000step_bs32_eps_anomaly2_0" / "checkpoint-2500"
    checkpoint.mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in finetuned.items()}, str(checkpoint / "model.safetensors")
    )

    dino = root / "dino_vitbase8_pretrain.pth"
    torch.save(official_dino_state(), dino)
    return AuthorsFiles(sd, checkpoint, dino)
