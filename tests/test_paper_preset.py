"""The paper preset: SD v1.4's architecture, CFG in one batch, DINO ViT-B/8 and its weights."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from model.config import PRESETS, GladConfig
from model.dino import dino_to_torchvision, load_dino_vitb8, vit_b8
from model.paper import RandomWeightsWarning, paper_inspector
from model.sd import PROMPT_FILE, build_sd_unet, build_sd_vae

PAPER = PRESETS["paper"]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TINY_VAE = (8, 8, 8, 8)


def _tiny_paper() -> GladConfig:
    """The paper preset at 64 px with tiny UNet channels, two steps and three DINO blocks."""
    config = GladConfig.model_validate({**PAPER.model_dump(), "image_size": 64})
    return config.with_overrides(
        diffusion={"block_out_channels": (32, 32, 32, 32), "norm_num_groups": 8},
        ads={"num_steps": 2},
        features={"ads_layer": 3, "score_layers": (3,)},
    )


def test_the_preset_is_the_authors_recipe() -> None:
    assert PAPER.image_size == 512 and PAPER.diffusion.guidance_scale == 9.0
    assert (PAPER.ads.start_step, PAPER.ads.num_steps, PAPER.ads.check_every) == (750, 25, 1)
    assert PAPER.diffusion.beta_schedule == "scaled_linear"
    assert (PAPER.diffusion.beta_start, PAPER.diffusion.beta_end) == (0.00085, 0.012)
    assert PAPER.features.backbone == "dino_vitb8"
    assert PAPER.features.score_layers == (3, 6, 9, 12)
    # Parameter counts of SD v1.4's UNet and VAE, built without allocating them.
    with torch.device("meta"):
        unet = build_sd_unet(PAPER.diffusion, PAPER.image_size)
        vae = build_sd_vae()
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    assert unet.config.sample_size == 64 and unet.config.cross_attention_dim == 768


def test_random_weights_warn_and_cfg_runs_both_passes_in_one_batch() -> None:
    with pytest.warns(RandomWeightsWarning, match="RANDOM"):
        inspector = paper_inspector(config=_tiny_paper(), vae_channels=TINY_VAE)
    assert inspector.random_weights
    batches: list[int] = []
    unet = inspector.pipeline.denoiser.unet
    unet.register_forward_pre_hook(lambda _m, args: batches.append(args[0].shape[0]))
    out = inspector.pipeline(torch.rand(1, 3, 64, 64) * 2 - 1)
    assert batches == [2, 2]  # one call per DDIM step, conditional and not together
    assert out.scores.shape == (1,) and bool(torch.isfinite(out.scores).all())
    assert out.reconstruction.images.shape == (1, 3, 64, 64)

    # Guidance: uncond + 9 * (cond - uncond), from the two halves of that one batch.
    z, t = torch.randn(2, 4, 8, 8), torch.tensor([500, 500])
    uncond_text, cond_text = inspector.pipeline.denoiser.embeddings.chunk(2)
    uncond = unet(z, t, encoder_hidden_states=uncond_text.expand(2, -1, -1)).sample
    cond = unet(z, t, encoder_hidden_states=cond_text.expand(2, -1, -1)).sample
    guided = inspector.pipeline.denoiser(z, t)
    torch.testing.assert_close(guided, uncond + 9.0 * (cond - uncond), rtol=1e-4, atol=1e-4)


def _official_dino_state() -> dict[str, torch.Tensor]:
    """A synthetic state dict with the official DINO ViT-B/8 key names and shapes."""
    g = torch.Generator().manual_seed(0)
    shapes = {
        "cls_token": (1, 1, 768),
        "pos_embed": (1, 785, 768),
        "patch_embed.proj.weight": (768, 3, 8, 8),
        "patch_embed.proj.bias": (768,),
        "norm.weight": (768,),
        "norm.bias": (768,),
    }
    for i in range(12):
        shapes |= {
            f"blocks.{i}.norm1.weight": (768,),
            f"blocks.{i}.norm1.bias": (768,),
            f"blocks.{i}.attn.qkv.weight": (2304, 768),
            f"blocks.{i}.attn.qkv.bias": (2304,),
            f"blocks.{i}.attn.proj.weight": (768, 768),
            f"blocks.{i}.attn.proj.bias": (768,),
            f"blocks.{i}.norm2.weight": (768,),
            f"blocks.{i}.norm2.bias": (768,),
            f"blocks.{i}.mlp.fc1.weight": (3072, 768),
            f"blocks.{i}.mlp.fc1.bias": (3072,),
            f"blocks.{i}.mlp.fc2.weight": (768, 3072),
            f"blocks.{i}.mlp.fc2.bias": (768,),
        }
    return {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}


@pytest.fixture(scope="module")
def dino_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dino") / "dino_vitbase8_pretrain.pth"
    torch.save(_official_dino_state(), path)
    return path


def test_dino_key_mapping_loads_the_official_names_strictly(dino_file: Path) -> None:
    state = torch.load(dino_file, weights_only=True)
    features = load_dino_vitb8(str(dino_file), (3,), MEAN, STD)
    vit = vit_b8()
    vit.load_state_dict(dino_to_torchvision(state), strict=True)
    layers = vit.encoder.layers
    torch.testing.assert_close(
        layers[5].self_attention.in_proj_weight, state["blocks.5.attn.qkv.weight"]
    )
    torch.testing.assert_close(layers[11].mlp[3].bias, state["blocks.11.mlp.fc2.bias"])
    torch.testing.assert_close(vit.encoder.ln.weight, state["norm.weight"])

    # At the pretraining size the features are torchvision's own encoder's patch tokens.
    images = torch.rand(1, 3, 224, 224) * 2 - 1
    with torch.no_grad():
        out = features(images)
        x = ((images + 1) / 2 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(
            1, 3, 1, 1
        )
        x = torch.cat([vit.class_token, vit._process_input(x)], dim=1) + vit.encoder.pos_embedding
        tokens = layers[:3](x)
    assert out[3].shape == (1, 768, 28, 28)
    torch.testing.assert_close(out[3], tokens[:, 1:].transpose(1, 2).reshape(1, 768, 28, 28))
    # Any multiple of 8 pixels: the position embeddings follow the grid.
    assert features(torch.zeros(1, 3, 64, 96))[3].shape == (1, 768, 8, 12)

    with pytest.raises(KeyError, match="head.weight"):
        dino_to_torchvision({**state, "head.weight": torch.zeros(1)})
    del state["blocks.4.norm2.bias"]
    with pytest.raises(RuntimeError, match="encoder_layer_4.ln_2.bias"):
        vit_b8().load_state_dict(dino_to_torchvision(state), strict=True)


def test_user_weights_load_from_local_folders_without_warning(
    tmp_path: Path, dino_file: Path
) -> None:
    config = _tiny_paper()
    sd = tmp_path / "sd"
    build_sd_vae(TINY_VAE, 8).save_pretrained(sd / "vae")
    unet = build_sd_unet(config.diffusion, config.image_size)
    unet.save_pretrained(tmp_path / "finetuned")
    cond, uncond = torch.randn(1, 77, 768), torch.randn(1, 77, 768)
    save_file({"cond": cond, "uncond": uncond}, str(sd / PROMPT_FILE))

    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomWeightsWarning)
        inspector = paper_inspector(sd, tmp_path / "finetuned", dino_file, config=config)
    assert not inspector.random_weights
    loaded = inspector.pipeline.denoiser.unet.state_dict()
    for key, value in unet.state_dict().items():
        torch.testing.assert_close(loaded[key], value)
    torch.testing.assert_close(inspector.pipeline.denoiser.embeddings, torch.cat([uncond, cond]))
    assert inspector.pipeline(torch.zeros(1, 3, 64, 64)).scores.shape == (1,)
