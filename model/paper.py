"""The paper preset: the authors' recipe, built as an Inspector.

Stable Diffusion v1.4's UNet and VAE (the architecture written out here, no hub download),
classifier-free guidance at scale 9 with a fixed prompt, DINO ViT-B/8 features, 512 px,
25 DDIM steps from t = 750 with a check at every step. With the user's weights (a diffusers
Stable Diffusion folder, the authors' fine-tuned UNet folder, DINO's weights file) it is the
authors' method; without them it runs at random weights, for speed measurement only.
Training it is out of scope: the authors fine-tune Stable Diffusion's UNet themselves.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file
from torch import nn

from model.config import PRESETS, VAE_FACTOR, Calibration, DiffusionConfig, GladConfig
from model.diffusion import VaeSpace
from model.features import build_feature_extractor
from model.inspector import Inspector, default_dtype

SD_VAE_CHANNELS = (128, 256, 512, 512)
SD_SCALING_FACTOR = 0.18215
TEXT_LENGTH, TEXT_WIDTH = 77, 768
# A file of two (1, 77, 768) tensors, "cond" and "uncond": the text encoder's output for the
# prompt and for the empty prompt, read from the UNet folder or the SD folder.
PROMPT_FILE = "prompt_embeds.safetensors"


class RandomWeightsWarning(UserWarning):
    """A model is running at random weights: its scores mean nothing."""


def build_sd_unet(config: DiffusionConfig, image_size: int) -> UNet2DConditionModel:
    """Stable Diffusion v1.4's UNet (at the preset's sizes), with random weights."""
    levels = config.attention_levels
    return UNet2DConditionModel(
        sample_size=image_size // VAE_FACTOR,
        in_channels=4,
        out_channels=4,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in levels),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(levels)),
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        norm_num_groups=config.norm_num_groups,
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8,
        flip_sin_to_cos=True,
        freq_shift=0,
        downsample_padding=1,
        act_fn="silu",
    )


def build_sd_vae(
    block_out_channels: tuple[int, ...] = SD_VAE_CHANNELS, norm_num_groups: int = 32
) -> AutoencoderKL:
    """Stable Diffusion v1.4's VAE, with random weights."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(block_out_channels),
        block_out_channels=block_out_channels,
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=norm_num_groups,
        sample_size=512,
        act_fn="silu",
        scaling_factor=SD_SCALING_FACTOR,
    )


class GuidedDenoiser(nn.Module):
    """eps(z_t, t) with classifier-free guidance; both passes run as one batch of 2B."""

    def __init__(
        self, unet: UNet2DConditionModel, cond: torch.Tensor, uncond: torch.Tensor, scale: float
    ) -> None:
        super().__init__()
        self.unet = unet
        self.scale = scale
        self.register_buffer("embeddings", torch.cat([uncond, cond]))

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b = z.shape[0]
        if self.scale == 1.0:
            return self.unet(
                z, t, encoder_hidden_states=self.embeddings[1:].expand(b, -1, -1)
            ).sample
        text = self.embeddings.repeat_interleave(b, dim=0)
        eps = self.unet(torch.cat([z, z]), torch.cat([t, t]), encoder_hidden_states=text).sample
        uncond, cond = eps.chunk(2)
        return uncond + self.scale * (cond - uncond)


def _encode_prompts(sd_folder: Path, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from transformers import CLIPTextModel, CLIPTokenizer
    except ImportError as error:
        raise ValueError(
            f"no {PROMPT_FILE} next to the weights, and transformers is not installed to "
            f"encode the prompt with {sd_folder / 'text_encoder'}"
        ) from error
    tokenizer = CLIPTokenizer.from_pretrained(
        sd_folder, subfolder="tokenizer", local_files_only=True
    )
    encoder = CLIPTextModel.from_pretrained(
        sd_folder, subfolder="text_encoder", local_files_only=True, use_safetensors=True
    )
    ids = tokenizer(
        [prompt, ""],
        padding="max_length",
        max_length=TEXT_LENGTH,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        hidden = encoder(ids).last_hidden_state
    return hidden[:1], hidden[1:]


def prompt_embeddings(
    sd_folder: Path, unet_folder: Path | None, prompt: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed (cond, uncond) text embeddings: a saved PROMPT_FILE, or the text encoder's."""
    for folder in (unet_folder, sd_folder):
        if folder is not None and (folder / PROMPT_FILE).is_file():
            saved = load_file(str(folder / PROMPT_FILE))
            cond, uncond = saved.get("cond"), saved.get("uncond")
            shape = (1, TEXT_LENGTH, TEXT_WIDTH)
            if cond is None or uncond is None or cond.shape != shape or uncond.shape != shape:
                raise ValueError(f"{folder / PROMPT_FILE} needs 'cond' and 'uncond' of {shape}")
            return cond, uncond
    return _encode_prompts(sd_folder, prompt)


def random_prompt_embeddings(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed stand-ins for the text embeddings, for runs at random weights."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, TEXT_LENGTH, TEXT_WIDTH, generator=g) for _ in range(2))


def paper_inspector(
    sd_folder: Path | None = None,
    unet_folder: Path | None = None,
    dino_weights: Path | None = None,
    *,
    config: GladConfig = PRESETS["paper"],
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    prompt: str = "",
    vae_channels: tuple[int, ...] = SD_VAE_CHANNELS,
    calibration: Calibration | None = None,
) -> Inspector:
    """The authors' recipe as an Inspector; parts without weights are random (and it warns).

    sd_folder: a diffusers Stable Diffusion v1.x folder (vae/, unet/, and text_encoder/ or a
    PROMPT_FILE); unet_folder: the authors' fine-tuned UNet, in place of sd_folder/unet;
    dino_weights: the official dino_vitbase8_pretrain.pth. Only local files are read.
    """
    dev = torch.device(device)
    dtype = dtype or default_dtype(dev)
    random_parts = []
    if sd_folder is None:
        random_parts.append("VAE")
        vae = build_sd_vae(vae_channels, config.diffusion.norm_num_groups)
        cond, uncond = random_prompt_embeddings()
    else:
        vae = AutoencoderKL.from_pretrained(
            Path(sd_folder), subfolder="vae", local_files_only=True, use_safetensors=True
        )
        cond, uncond = prompt_embeddings(Path(sd_folder), unet_folder, prompt)
    unet_path = (
        Path(unet_folder) if unet_folder else (Path(sd_folder) / "unet" if sd_folder else None)
    )
    if unet_path is None:
        random_parts.append("UNet")
        unet = build_sd_unet(config.diffusion, config.image_size)
    else:
        unet = UNet2DConditionModel.from_pretrained(
            unet_path, local_files_only=True, use_safetensors=True
        )
    if dino_weights is None:
        random_parts.append("DINO")
    features_config = config.features.model_copy(
        update={"weights": None if dino_weights is None else str(dino_weights)}
    )
    if random_parts:
        warnings.warn(
            f"paper preset at RANDOM weights ({', '.join(random_parts)}): its scores mean "
            "nothing; use it to measure speed only",
            RandomWeightsWarning,
            stacklevel=2,
        )

    def place(module: nn.Module) -> nn.Module:
        # nn.Module.to: diffusers' override warns on every dtype cast.
        return nn.Module.to(module, dev, dtype).eval().requires_grad_(False)

    scale = config.diffusion.guidance_scale
    denoiser = place(GuidedDenoiser(unet, cond, uncond, scale))
    space = place(VaeSpace(config.diffusion, vae, build_feature_extractor(features_config)))
    return Inspector(
        config,
        denoiser,
        space,
        calibration=calibration,
        version="paper-random" if random_parts else "paper",
        device=dev,
        dtype=dtype,
        random_weights=bool(random_parts),
    )
