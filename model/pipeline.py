"""GLAD's tensor pipeline: a batch in [-1, 1] in, scores, maps and ADS steps out.

One object holds the denoiser, the space (with the frozen feature extractor), the noise
schedule and the settings in force. Its call is the paper's inference (Yao et al., GLAD,
ECCV 2024), one numbered step per section:

1. Encode the batch into the space the denoiser works in (Sec. 3.1).
2. Noise it to the start step T' with one shared noise draw (Sec. 3.3).
3. ADS: deterministic DDIM from T'. At each check the trajectory's clean estimate x0_hat is
   compared in feature space with the input's own clean estimate x0_in; a sample whose
   discrepancy passes delta has found its step (Sec. 3.3), and SAFF fuses the two there
   (Sec. 3.4). Plain DDIM takes it the rest of the way.
4. Decode the reconstruction, where the space can.
5. The anomaly map: each input position's distance to the nearest reconstructed one, at
   several feature layers, resized, summed and blurred (Sec. 3.5); beside it, where the
   product has a memory of normal patches, each input patch's distance to the nearest one
   there. Each map, less its reference where the product takes it, is rescaled by the
   product's constants, and the two are fused into one.
6. The image score: the mean of the map's top k values.

ATP (Sec. 3.2) is training (model.train); thresholds and delta come from model.calibrate.

Where the compact preset departs from the paper (the paper preset keeps the paper's rules;
the README's "Accuracy" section has the measurements):
- It diffuses in the frozen extractor's feature space, not in Stable Diffusion's VAE latent.
- A sample that never passes delta restarts from its input at t_min and is reconstructed
  plainly from there (`ads.undecided = "restart"`). The paper keeps it as its input below
  t_min, so every defect the checks missed loses its map.
- delta is calibrated per product from held-out normals; SAFF's sigmoid is centred on it.
- The map averages features over a 3x3 neighbourhood, searches within 2 grid cells, takes
  the Euclidean distance, and subtracts the held-out normals' mean map where calibration
  finds that it helps.
- A memory of normal training patches (PatchCore's) gives a second map, fused with the
  reconstruction's (model.scoring.fuse_maps).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.config import ADSConfig, GladConfig
from model.diffusion import Space, add_noise, build_noise_schedule, predicted_clean
from model.features import Features, min_cosine_distance
from model.memory_bank import MemoryBank, patch_vectors
from model.scoring import MapScale, anomaly_maps, fuse_maps, image_scores, memory_map

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def inference_dtype(device: torch.device | str) -> torch.dtype:
    """The one precision rule: fp16 on CUDA, fp32 elsewhere."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


@dataclass(frozen=True)
class Reconstruction:
    latents: torch.Tensor  # (B, C, h, w): the reconstructed samples
    input_latents: torch.Tensor  # (B, C, h, w): the inputs, encoded
    input_features: dict[int, torch.Tensor]  # the extractor's own maps of the inputs, by layer
    images: torch.Tensor | None  # (B, 3, H, W) in [-1, 1]; None where the space cannot decode
    denoise_steps: torch.Tensor  # (B,) int64: the step each sample decided at; 0 = never
    # (B,) float32: the largest discrepancy each sample showed at a check (0 without ADS);
    # model.calibrate sets delta above the normals' peaks.
    peak_discrepancy: torch.Tensor


@dataclass(frozen=True)
class PipelineOutput:
    scores: torch.Tensor  # (B,) float32
    maps: torch.Tensor  # (B, S, S) float32: the fused map
    reconstruction: Reconstruction


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


@dataclass
class _Trajectory:
    """A batch on its way down the DDIM steps, with what ADS decided so far."""

    z_in: torch.Tensor
    eps: torch.Tensor
    z: torch.Tensor
    decided: torch.Tensor  # (B,) bool
    steps: torch.Tensor  # (B,) int64
    peak: torch.Tensor  # (B,) float32
    restarted: bool = False


class GladPipeline:
    """GLAD for one product on preprocessed batches: see the module docstring."""

    def __init__(
        self,
        config: GladConfig,
        denoiser: Denoiser,
        space: Space,
        *,
        memory: MemoryBank | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ) -> None:
        """memory: the product's memory of normal patches, which the maps need where
        config.scoring.maps names it (memory_patches builds one without it).

        The pipeline starts uncalibrated: the config's ADS settings, and each map fused as it
        comes (no reference, unit scale). model.calibrate.calibrated puts a product's delta,
        references and constants in force."""
        self.config = config
        self.denoiser = denoiser
        self.space = space
        self.device = torch.device(device)
        self.dtype = dtype or inference_dtype(self.device)
        self.ads = config.ads
        self.memory = memory.to(self.device, self.dtype) if memory is not None else None
        zeros = torch.zeros((config.image_size, config.image_size), device=self.device)
        self.scales = {name: MapScale(zeros) for name in config.scoring.maps}
        schedule = build_noise_schedule(config.diffusion).alphas_cumprod
        self.alphas_cumprod = schedule.to(self.device, torch.float32)

    @property
    def features(self) -> Features:
        """The frozen feature extractor, held by the space."""
        if self.space.features is None:
            raise RuntimeError("this pipeline's space holds no feature extractor")
        return self.space.features

    @features.setter
    def features(self, features: Features) -> None:
        self.space.features = features

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, ads: ADSConfig | None = None) -> PipelineOutput:
        """Steps 1-6 on a batch (B, 3, S, S) in [-1, 1]; `ads` overrides the settings in
        force for this call (calibration probes with it)."""
        x = images.to(self.device, self.dtype)
        rec = self.reconstruct(x, ads)
        scoring = self.config.scoring
        maps = fuse_maps(self.component_maps(x, rec), self.scales, scoring.fusion)  # step 5
        return PipelineOutput(image_scores(maps, scoring), maps, rec)  # step 6

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, ads: ADSConfig | None = None) -> Reconstruction:
        """Steps 1-4: the batch reconstructed toward normal with ADS and SAFF."""
        ads = ads or self.ads
        x = images.to(self.device, self.dtype)
        z_in, features = self.space.encode_with_features(x)  # step 1
        path = self._noised(z_in, ads)  # step 2
        for index, (t, t_prev) in enumerate(ddim_timesteps(ads.start_step, ads.num_steps)):
            self._ddim_step(path, index, t, t_prev, ads)  # step 3
        images_out = self.space.decode(path.z).clamp(-1, 1) if self.space.decodable else None
        return Reconstruction(  # step 4
            path.z, path.z_in, features, images_out, path.steps, path.peak
        )

    def _alpha(self, t: int, dtype: torch.dtype) -> torch.Tensor:
        """alpha_bar at t on the device, 1 at t = 0 (the clean end of the last step)."""
        alphas = self.alphas_cumprod
        return (alphas[t] if t > 0 else torch.ones_like(alphas[0])).to(dtype)

    def _noised(self, z_in: torch.Tensor, ads: ADSConfig) -> _Trajectory:
        # One noise tensor shared by every sample: a sample's result never depends on its batch.
        generator = torch.Generator().manual_seed(ads.noise_seed)
        eps = torch.randn((1, *z_in.shape[1:]), generator=generator).to(z_in).expand_as(z_in)
        batch, device = z_in.shape[0], z_in.device
        return _Trajectory(
            z_in=z_in,
            eps=eps,
            z=add_noise(z_in, eps, self._alpha(ads.start_step, z_in.dtype)),
            decided=torch.zeros(batch, dtype=torch.bool, device=device),
            steps=torch.zeros(batch, dtype=torch.long, device=device),
            peak=torch.zeros(batch, dtype=torch.float32, device=device),
        )

    def _ddim_step(
        self, path: _Trajectory, index: int, t: int, t_prev: int, ads: ADSConfig
    ) -> None:
        a_t, a_prev = self._alpha(t, path.z.dtype), self._alpha(t_prev, path.z.dtype)
        if ads.adaptive and ads.undecided == "restart" and not path.restarted and t <= ads.t_min:
            # Undecided samples start over from their input at this step: the fixed-step
            # reconstruction from t_min, which no check can touch any more.
            fresh = add_noise(path.z_in, path.eps, a_t)
            path.z = torch.where(path.decided.view(-1, 1, 1, 1), path.z, fresh)
            path.restarted = True
        timestep = torch.full((path.z.shape[0],), t, device=path.z.device, dtype=torch.long)
        eps_hat = self.denoiser(path.z, timestep)
        x0_hat = predicted_clean(path.z, eps_hat, a_t)
        # Where the input itself would land under the same noise estimate.
        x0_in = predicted_clean(add_noise(path.z_in, path.eps, a_t), eps_hat, a_t)
        x0_sel = x0_hat.clone()
        # At the first step z is the input noised with eps, so x0_in is x0_hat and the
        # discrepancy is 0: no sample can pass, and that check is skipped.
        checking = ads.adaptive and index > 0 and index % ads.check_every == 0
        if checking and not path.restarted and not bool(path.decided.all()):
            self._check(path, x0_hat, x0_in, x0_sel, t, ads)
        # The paper's rule: undecided samples below t_min stay with their input.
        if ads.adaptive and ads.undecided == "input" and t < ads.t_min:
            snap = ~path.decided
            x0_sel[snap] = x0_in[snap]
        path.z = torch.sqrt(a_prev) * x0_sel + torch.sqrt(1 - a_prev) * eps_hat

    def _check(
        self,
        path: _Trajectory,
        x0_hat: torch.Tensor,
        x0_in: torch.Tensor,
        x0_sel: torch.Tensor,
        t: int,
        ads: ADSConfig,
    ) -> None:
        """ADS's check at step t: the open samples whose discrepancy passes delta decide here,
        and SAFF fuses their clean estimate (x0_sel, in place) with the input's."""
        open_ = (~path.decided).nonzero().squeeze(1)
        layer = self.config.features.ads_layer
        a_map = discrepancy(self.space, layer, x0_in[open_], x0_hat[open_])
        s = a_map.flatten(1).topk(min(ads.top_k, a_map[0].numel()), dim=1).values.mean(1)
        path.peak[open_] = torch.maximum(path.peak[open_], s.float())
        passed = s > ads.delta
        if bool(passed.any()):
            chosen = open_[passed]
            if ads.saff:
                x0_sel[chosen] = saff_fuse(x0_hat[chosen], x0_in[chosen], a_map[passed], ads)
            path.decided[chosen] = True
            path.steps[chosen] = t

    @torch.no_grad()
    def component_maps(self, x: torch.Tensor, rec: Reconstruction) -> dict[str, torch.Tensor]:
        """Step 5 before the fusion: each of config.scoring.maps for a reconstructed batch,
        blurred, (B, S, S) float32 by name."""
        scoring, size = self.config.scoring, tuple(x.shape[-2:])
        maps: dict[str, torch.Tensor] = {}
        if "reconstruction" in scoring.maps:
            pixel_difference = None
            if rec.images is not None and scoring.pixel_weight > 0:
                pixel_difference = (x.float() - rec.images.float()).abs().mean(1, keepdim=True)
            maps["reconstruction"] = anomaly_maps(
                self.space.describe_input(rec.input_latents, rec.input_features),
                self.space.describe(rec.latents),
                self.config.features.score_layers,
                size,
                scoring,
                pixel_difference,
            )
        if "memory" in scoring.maps:
            if self.memory is None:
                raise RuntimeError("this config's map needs the product's memory of normal patches")
            distances = self.memory.distances(self.patch_vectors(rec.input_features))
            maps["memory"] = memory_map(distances, size, scoring)
        return maps

    def patch_vectors(self, features: dict[int, torch.Tensor]) -> torch.Tensor:
        """What the memory holds and is asked about: one vector per position (B, C, h, w)."""
        layers = self.config.features.score_layers
        return patch_vectors(features, layers, self.config.scoring.neighbourhood)

    @torch.no_grad()
    def memory_patches(self, images: torch.Tensor) -> torch.Tensor:
        """The patch vectors of a batch (B, 3, S, S) in [-1, 1]: what a memory is built of."""
        _, features = self.space.encode_with_features(images.to(self.device, self.dtype))
        return self.patch_vectors(features)

    def warm_up(self, batch_size: int = 1) -> None:
        """Run one batch so first requests do not pay for lazy initialisation."""
        size = self.config.image_size
        self(torch.zeros((batch_size, 3, size, size)))
