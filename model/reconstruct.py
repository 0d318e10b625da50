"""GLAD's batched sampler: noise the input, then DDIM with adaptive steps (ADS) and SAFF.

Read it beside the paper: each sample is noised to the start step T' and denoised with
deterministic DDIM. At each check, the trajectory's clean estimate x0_hat is compared with
the input's own clean estimate x0_in in feature space. A sample whose discrepancy passes
delta has found its step: SAFF blends the two there, and plain DDIM takes it the rest of the
way. What a sample that never passes delta does once the checks reach t_min is
`ads.undecided`:

- "input" (the paper): below t_min it keeps x0_in at every step, so it comes back as its input
  and its map is empty. That only works where delta separates every defect from every normal
  part, which a weak feature space does not: every defect the checks missed lost its map.
- "restart" (the compact preset): at the first step at or below t_min it is noised afresh from
  its input to that step and denoised plainly from there. It "looked normal at every strength
  tried", so it gets the gentlest reconstruction, the fixed-step one from t_min: the step choice
  adds a stronger reconstruction for the parts that showed a defect, and erases nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.config import ADSConfig
from model.diffusion import Space, add_noise, predicted_clean
from model.features import min_cosine_distance

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Reconstruction:
    latents: torch.Tensor  # (B, C, h, w): the reconstructed samples
    input_latents: torch.Tensor  # (B, C, h, w): the inputs, encoded
    images: torch.Tensor | None  # (B, 3, H, W) in [-1, 1]; None where the space cannot decode
    denoise_steps: torch.Tensor  # (B,) int64: the step each sample decided at; 0 = never
    # (B,) float32: the largest discrepancy s each sample showed at a check (0 without ADS)
    peak_discrepancy: torch.Tensor


def ddim_timesteps(start_step: int, num_steps: int) -> list[tuple[int, int]]:
    """(t, t_prev) pairs from the start step down to 0, evenly spaced."""
    ts = torch.linspace(start_step, 0, num_steps + 1).round().long().tolist()
    return list(zip(ts[:-1], ts[1:], strict=True))


def discrepancy(
    space: Space, layer: int, x0_in: torch.Tensor, x0_hat: torch.Tensor
) -> torch.Tensor:
    """A(p) = min over q of 1 - cos(f_in(p), f_rec(q)), at one feature layer: (B, h, w)."""
    both = space.describe(torch.cat([x0_in, x0_hat]))[layer]
    f_in, f_rec = both.chunk(2)
    return min_cosine_distance(f_in, f_rec)


def saff_mask(a_map: torch.Tensor, size: tuple[int, int], config: ADSConfig) -> torch.Tensor:
    """SAFF's fusion weight for the reconstruction, in [0, 1], at the latent's size."""
    center = config.delta if config.saff_center is None else config.saff_center
    temperature = config.saff_temperature or max(center / 4, 1e-6)
    m = torch.sigmoid((a_map - center) / temperature)
    return F.interpolate(m.unsqueeze(1), size=size, mode="bilinear", align_corners=False)


def saff_fuse(
    x0_hat: torch.Tensor, x0_in: torch.Tensor, a_map: torch.Tensor, config: ADSConfig
) -> torch.Tensor:
    """SAFF: the reconstruction where the discrepancy marks an anomaly, the input elsewhere."""
    m = saff_mask(a_map, x0_hat.shape[-2:], config).to(x0_hat.dtype)
    return m * x0_hat + (1 - m) * x0_in


@torch.no_grad()
def reconstruct(
    denoiser: Denoiser,
    space: Space,
    alphas_cumprod: torch.Tensor,
    images: torch.Tensor,
    config: ADSConfig,
    ads_layer: int,
) -> Reconstruction:
    """Reconstruct a batch of images (B, 3, H, W) in [-1, 1] toward normal with ADS + SAFF.

    The space describes samples to the frozen features (decoding them where it must).
    """
    z_in = space.encode(images)
    batch = z_in.shape[0]
    # One noise tensor shared by every sample: a sample's result never depends on its batch.
    generator = torch.Generator().manual_seed(config.noise_seed)
    eps = torch.randn((1, *z_in.shape[1:]), generator=generator).to(z_in).expand_as(z_in)
    alphas = alphas_cumprod.to(device=z_in.device, dtype=torch.float32)

    decided = torch.zeros(batch, dtype=torch.bool, device=z_in.device)
    steps = torch.zeros(batch, dtype=torch.long, device=z_in.device)
    peak = torch.zeros(batch, dtype=torch.float32, device=z_in.device)
    z = add_noise(z_in, eps, alphas[config.start_step].to(z_in.dtype))
    # Cheap ADS: the input's features, computed once, stand in for x0_in's at every check.
    f_input = None
    if config.adaptive and config.check_reference == "input":
        f_input = space.describe_input(images, z_in)[ads_layer]
    snapped = False
    restart = config.adaptive and config.undecided == "restart"
    restarted = False

    for index, (t, t_prev) in enumerate(ddim_timesteps(config.start_step, config.num_steps)):
        a_t = alphas[t].to(z.dtype)
        a_prev = (alphas[t_prev] if t_prev > 0 else torch.ones_like(alphas[0])).to(z.dtype)
        if restart and not restarted and t <= config.t_min:
            # Undecided samples start over from their input at this step: the fixed-step
            # reconstruction from t_min, which no check can touch any more.
            z = torch.where(decided.view(-1, 1, 1, 1), z, add_noise(z_in, eps, a_t))
            restarted = True
        eps_hat = denoiser(z, torch.full((batch,), t, device=z.device, dtype=torch.long))
        x0_hat = predicted_clean(z, eps_hat, a_t)
        # Where the input itself would land under the same noise estimate.
        x0_in = predicted_clean(add_noise(z_in, eps, a_t), eps_hat, a_t)
        x0_sel = x0_hat.clone()

        checking = config.adaptive and index % config.check_every == 0 and not restarted
        checking = checking and (config.checks_after_snap or not snapped)
        # At the first step z is the input noised with eps, so x0_in is x0_hat and s = 0:
        # no sample can pass, and that check is skipped.
        checking = checking and (index > 0 or f_input is not None)
        if checking and not bool(decided.all()):
            open_ = (~decided).nonzero().squeeze(1)
            if f_input is None:
                a_map = discrepancy(space, ads_layer, x0_in[open_], x0_hat[open_])
            else:
                a_map = min_cosine_distance(
                    f_input[open_], space.describe(x0_hat[open_])[ads_layer]
                )
            s = a_map.flatten(1).topk(min(config.top_k, a_map[0].numel()), dim=1).values.mean(1)
            peak[open_] = torch.maximum(peak[open_], s.float())
            passed = s > config.delta
            if bool(passed.any()):
                chosen = open_[passed]
                if config.saff:
                    x0_sel[chosen] = saff_fuse(x0_hat[chosen], x0_in[chosen], a_map[passed], config)
                decided[chosen] = True
                steps[chosen] = t
        # The paper's rule: decided samples keep plain DDIM; undecided ones below t_min stay
        # with their input.
        if config.adaptive and config.undecided == "input" and t < config.t_min:
            snap = ~decided
            x0_sel[snap] = x0_in[snap]
            snapped = bool(snap.any())

        z = torch.sqrt(a_prev) * x0_sel + torch.sqrt(1 - a_prev) * eps_hat

    images_out = space.decode(z).clamp(-1, 1) if space.decodable else None
    return Reconstruction(z, z_in, images_out, steps, peak)
