"""Stable Diffusion's parts for the paper preset, and reading them from local files.

The architecture of SD v1.4's UNet and VAE is written out here (no hub download). A user's
files are read from disk only: safetensors, or PyTorch files through `weights_only` loading,
which refuses pickled code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn

from model.checkpoint import CheckpointError, check_weights_fit, read_state_dict, sha256
from model.config import VAE_FACTOR, DiffusionConfig, GladConfig, SourceFile
from model.diffusion import VaeSpace
from model.features import build_feature_extractor

SD_VAE_CHANNELS = (128, 256, 512, 512)
SD_SCALING_FACTOR = 0.18215
TEXT_LENGTH, TEXT_WIDTH = 77, 768
# A file of two (1, L, W) tensors, "cond" and "uncond": the text encoder's output for the
# prompt and for the empty prompt, read from the UNet folder or the SD folder.
PROMPT_FILE = "prompt_embeds.safetensors"
# How an imported model folder holds the prompt embeddings (its model.safetensors).
PROMPT_KEYS = ("prompt.cond", "prompt.uncond")
# The files an imported paper-preset model is made of, as SourceFile roles.
SOURCE_ROLES = ("vae_config", "vae_weights", "unet_config", "unet_weights", "dino_weights")
# A diffusers model folder's weights, in the order diffusers prefers them.
DIFFUSERS_WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
)


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


def diffusers_weights(folder: Path) -> Path:
    """The weights file of a diffusers model folder (config.json beside it)."""
    for name in DIFFUSERS_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(
        f"{folder} holds none of {', '.join(DIFFUSERS_WEIGHTS)} (a diffusers model folder, as "
        "save_pretrained writes it)"
    )


def read_config(path: Path) -> dict[str, Any]:
    """A JSON config file (diffusers', the scheduler's); CheckpointError if unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"cannot read {path}: {error}") from error


def read_diffusers_model(
    kind: type[UNet2DConditionModel] | type[AutoencoderKL], config: Path, weights: Path
) -> Any:
    """A diffusers UNet or VAE from its config.json and a weights file, loaded strictly."""
    model = kind.from_config(read_config(config))
    state = read_state_dict(weights)
    check_weights_fit(model, state, f"{config}'s {kind.__name__}")
    model.load_state_dict(state)
    return model


def read_prompt_file(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond, uncond) from a PROMPT_FILE."""
    saved = read_state_dict(path)
    cond, uncond = saved.get("cond"), saved.get("uncond")
    if cond is None or uncond is None or cond.dim() != 3 or cond.shape != uncond.shape:
        raise CheckpointError(f"{path} needs 'cond' and 'uncond' of one shape (1, length, width)")
    return cond, uncond


def encode_prompt(sd_folder: Path, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond, uncond): the SD folder's CLIP text encoder on the prompt and the empty one."""
    try:
        from transformers import CLIPTextModel, CLIPTokenizer
    except ImportError as error:
        raise ValueError(
            f"no {PROMPT_FILE} beside the weights, and transformers is not installed to "
            f"encode the prompt with {sd_folder / 'text_encoder'}: pip install "
            "'glad-inspect[paper]'"
        ) from error
    for part in ("tokenizer", "text_encoder"):
        if not (sd_folder / part).is_dir():
            raise ValueError(f"{sd_folder} has no {part}/ folder, nor a {PROMPT_FILE}")
    tokenizer = CLIPTokenizer.from_pretrained(sd_folder / "tokenizer", local_files_only=True)
    encoder = CLIPTextModel.from_pretrained(
        sd_folder / "text_encoder", local_files_only=True, use_safetensors=True
    )
    ids = tokenizer(
        [prompt, ""],
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        hidden = encoder(ids).last_hidden_state
    return hidden[:1], hidden[1:]


def prompt_embeddings(
    sd_folder: Path, unet_folder: Path | None, prompt: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed (cond, uncond) text embeddings: a PROMPT_FILE beside the UNet or in the SD
    folder, or the SD folder's text encoder on `prompt`."""
    for folder in (unet_folder, sd_folder):
        if folder is not None and (folder / PROMPT_FILE).is_file():
            return read_prompt_file(folder / PROMPT_FILE)
    return encode_prompt(sd_folder, prompt)


def random_prompt_embeddings(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed stand-ins for the text embeddings, for runs at random weights."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, TEXT_LENGTH, TEXT_WIDTH, generator=g) for _ in range(2))


def place(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A frozen module on the device in the dtype."""
    # nn.Module.to: diffusers' override warns on every dtype cast.
    return nn.Module.to(module, device, dtype).eval().requires_grad_(False)


def source_path(folder: Path, source: SourceFile) -> Path:
    """Where a recorded file is: relative paths are inside the model folder (copied in)."""
    path = Path(source.path)
    return path if path.is_absolute() else folder / path


def verified_sources(folder: Path, config: GladConfig) -> dict[str, Path]:
    """Each file an imported model is made of, checked against its recorded SHA-256."""
    if config.sources is None or set(config.sources) != set(SOURCE_ROLES):
        raise CheckpointError(
            f"{folder}: a paper-preset model folder records its files ({', '.join(SOURCE_ROLES)})"
            "; write it with `glad import`"
        )
    paths = {}
    for role, source in config.sources.items():
        path = source_path(folder, source)
        if not path.is_file():
            raise CheckpointError(f"{folder}: its {role} file {path} is missing")
        if sha256(path) != source.sha256:
            raise CheckpointError(
                f"{folder}: its {role} file {path} changed after `glad import` (its SHA-256 is "
                "not the recorded one): import the checkpoints again to serve the new file"
            )
        paths[role] = path
    return paths


def imported_parts(
    folder: Path,
    config: GladConfig,
    weights: dict[str, torch.Tensor],
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[nn.Module, VaeSpace]:
    """The guided denoiser and the VAE space of an imported model folder, placed."""
    return paper_parts(folder, verified_sources(folder, config), config, weights, device, dtype)


def paper_parts(
    folder: Path,
    paths: dict[str, Path],
    config: GladConfig,
    weights: dict[str, torch.Tensor],
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[nn.Module, VaeSpace]:
    """imported_parts from files already checked, by role (glad import has just hashed them)."""
    missing = [key for key in PROMPT_KEYS if key not in weights]
    if missing:
        raise CheckpointError(f"{folder}: its weights hold no {', '.join(missing)}")
    unet = read_diffusers_model(UNet2DConditionModel, paths["unet_config"], paths["unet_weights"])
    vae = read_diffusers_model(AutoencoderKL, paths["vae_config"], paths["vae_weights"])
    features_config = config.features.model_copy(update={"weights": str(paths["dino_weights"])})
    cond, uncond = (weights[key] for key in PROMPT_KEYS)
    if cond.shape[-1] != unet.config.cross_attention_dim:
        raise CheckpointError(
            f"{folder}: prompt embeddings {tuple(cond.shape)} do not fit the UNet's "
            f"cross-attention width {unet.config.cross_attention_dim}"
        )
    denoiser = GuidedDenoiser(unet, cond, uncond, config.diffusion.guidance_scale)
    space = VaeSpace(config.diffusion, vae, build_feature_extractor(features_config))
    return place(denoiser, device, dtype), place(space, device, dtype)
