"""Typed configuration of one GLAD model: what a checkpoint folder's config.json holds."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# 2: config.json and calibration.json hashed in training.json; ADS's undecided rule and the
# map's neighbourhood and search radius (a version-1 folder was calibrated without them).
FORMAT_VERSION = 2


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DiffusionConfig(_Strict):
    """Where the diffusion runs and the UNet that denoises there."""

    # "features": the frozen extractor's score layers, stacked on the finest layer's grid and
    # standardised per channel (the compact preset: see the README for the measurements);
    # "patch": pixels folded into channels (pixel-unshuffle), a free, lossless "latent";
    # "pixel": the image itself; "vae": Stable Diffusion's VAE latent (the paper preset).
    space: Literal["features", "pixel", "patch", "vae"] = "features"
    patch_size: int = Field(4, ge=1, le=16)
    block_out_channels: tuple[int, ...] = (128, 256)
    # Self-attention at the levels marked True (lowest resolutions are the cheap ones).
    attention_levels: tuple[bool, ...] = (False, True)
    layers_per_block: int = Field(2, ge=1)
    norm_num_groups: int = Field(32, ge=1)
    num_train_timesteps: int = Field(1000, ge=10)
    # Stable Diffusion's schedule, so the paper's start steps mean the same noise level.
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    # Classifier-free guidance scale of a text-conditioned UNet (the paper: 9); 1 = one pass.
    guidance_scale: float = Field(1.0, ge=1.0)

    @model_validator(mode="after")
    def _check_levels(self) -> DiffusionConfig:
        if len(self.attention_levels) != len(self.block_out_channels):
            raise ValueError("attention_levels needs one entry per block_out_channels entry")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError("every block_out_channels entry must be divisible by norm_num_groups")
        return self


class SynthesisConfig(_Strict):
    """DRAEM-style synthetic anomalies for ATP."""

    anomaly_probability: float = Field(0.5, ge=0.0, le=1.0)
    perlin_max_exponent: int = Field(5, ge=0, le=8)
    perlin_threshold: float = 0.3
    beta_max: float = Field(0.8, ge=0.0, le=1.0)
    # Folder of texture images; None = the image's own augmented, shuffled patches.
    texture_dir: str | None = None
    shuffle_grid: int = Field(8, ge=1)


class TrainingConfig(_Strict):
    steps: int = Field(6000, ge=1)
    batch_size: int = Field(16, ge=1)
    learning_rate: float = Field(2e-4, gt=0.0)
    weight_decay: float = Field(1e-2, ge=0.0)
    warmup_steps: int = Field(200, ge=0)
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0)
    checkpoint_every: int = Field(1000, ge=1)
    seed: int = 0
    # Every n-th training image (sorted by name) is held out to calibrate the threshold.
    holdout_every: int = Field(8, ge=2)
    horizontal_flip: bool = False
    # Calibration sets the product's ADS delta to this factor times the largest discrepancy a
    # held-out normal image showed, so normal parts do not decide and anomalous ones do,
    # whatever the feature backbone's scale. None = ads.delta as given (the paper tunes it by
    # hand, 0.32-0.50).
    delta_margin: float | None = Field(1.1, gt=0.0)


class ADSConfig(_Strict):
    """Adaptive denoising steps (inference)."""

    # Off: plain reconstruction, DDIM from start_step with no checks (the ablation baseline).
    adaptive: bool = True
    # Off: a sample that decides keeps the plain reconstruction (no fusion with its input).
    saff: bool = True
    # From 500 in steps of 50: checks at 450, 400 and 350, then 6 steps for a part that
    # restarts at t_min (README, "Accuracy": a gentler restart kept more normal detail).
    start_step: int = Field(500, ge=1)
    num_steps: int = Field(10, ge=1)
    # The product's delta comes from calibration (training.delta_margin); this one applies
    # where the config fixes it.
    delta: float = Field(0.35, gt=0.0)
    t_min: int = Field(300, ge=0)
    # What a sample that never passed delta does once the checks reach t_min (see
    # model.reconstruct): "input" keeps its input from there on (the paper: its map is empty);
    # "restart" reconstructs it plainly from t_min, so a defect the checks missed keeps its map.
    undecided: Literal["input", "restart"] = "restart"
    # Run the discrepancy check every k DDIM steps (1 = the paper).
    check_every: int = Field(1, ge=1)
    top_k: int = Field(10, ge=1)
    # SAFF mask: sigmoid((A - center) / temperature). The paper's is center 0, temperature 1:
    # about half of the reconstruction everywhere, since A is mostly small. None centres it on
    # the delta in force (what a normal part's discrepancy stays below), with a temperature of
    # a quarter of that: normal regions keep the input, anomalous ones take the reconstruction.
    saff_center: float | None = None
    saff_temperature: float | None = Field(None, gt=0.0)
    noise_seed: int = 0


# (channels, stride) of each layer index FeatureConfig can name; None where there is no layer.
# tests/test_features.py checks them against the real networks.
BACKBONE_LAYERS: dict[str, tuple[tuple[int, int] | None, ...]] = {
    "mobilenet_v2": (
        *((32, 2), (16, 2), (24, 4), (24, 4), (32, 8), (32, 8), (32, 8)),
        *((64, 16),) * 4,
        *((96, 16),) * 3,
        *((160, 32),) * 3,
        *((320, 32), (1280, 32)),
    ),
    # Blocks 1..12 as in the paper; there is no block 0.
    "dino_vitb8": (None, *((768, 8),) * 12),
}


class FeatureConfig(_Strict):
    """Frozen feature extractor shared by ADS, SAFF and scoring."""

    backbone: Literal["mobilenet_v2", "dino_vitb8"] = "mobilenet_v2"
    # Weights file; None = the packaged ImageNet weights (DINO: random weights, speed only).
    weights: str | None = None
    ads_layer: int = 10
    score_layers: tuple[int, ...] = (6, 10)

    def layer_shape(self, layer: int) -> tuple[int, int]:
        """(channels, stride in pixels) of one of the backbone's layers."""
        shapes = BACKBONE_LAYERS[self.backbone]
        if not 0 <= layer < len(shapes) or shapes[layer] is None:
            valid = [i for i, shape in enumerate(shapes) if shape is not None]
            raise ValueError(f"{self.backbone} has layers {valid[0]}..{valid[-1]}, not {layer}")
        return shapes[layer]

    @model_validator(mode="after")
    def _check_layers(self) -> FeatureConfig:
        for layer in (self.ads_layer, *self.score_layers):
            self.layer_shape(layer)
        if not self.score_layers:
            raise ValueError("score_layers needs at least one layer")
        return self


class ScoringConfig(_Strict):
    # Input against reconstruction at each position, nearest reconstructed position taken:
    # the Euclidean distance, or 1 - cos (the paper's). With the compact preset's map (3x3
    # neighbourhood, 2-cell window) Euclidean won on every real category measured
    # (README, "Accuracy"): cosine ignores a change of a feature's magnitude, which is how
    # a darker or brighter defect shows.
    distance: Literal["cosine", "euclidean"] = "euclidean"
    # Features are averaged over this odd-sized neighbourhood before distances are taken, so a
    # position is compared with its context, not alone (PatchCore's local aggregation). The
    # paper compares single DINO patches: 1.
    neighbourhood: int = Field(3, ge=1, le=7)
    # Where an input position looks for its nearest reconstructed one: None = anywhere (the
    # paper), an int = within that many feature-grid cells. A reconstruction in feature space
    # stays aligned with its input, and a defect that resembles a distant normal region (a
    # missing part showing background) would find it there and vanish from the map.
    search_radius: int | None = Field(2, ge=0)
    # Each map's reference, the mean map of held-out normal images, may be subtracted: it
    # removes the errors every part shares (borders, fixed fixtures), which otherwise dominate a
    # weak model's map, but on some lines it also removes where defects show. True: calibration
    # decides it per map and per product, from synthetic anomalies on the held-out normals
    # (model.calibrate); False: never.
    reference_map: bool = True
    # The maps fused into the one the product answers with: the reconstruction's, and the
    # memory's (distance to the nearest normal training patch, which needs `memory`).
    maps: tuple[Literal["reconstruction", "memory"], ...] = ("reconstruction", "memory")
    # How the two maps, each rescaled by its held-out normals (0.90 quantile to 0, 0.995 to 1),
    # become one: "memory_plus_excess" is the memory's map plus the reconstruction's where it
    # passes its normal range (max(r - 1, 0)); "mean" averages them. README, "Accuracy".
    fusion: Literal["memory_plus_excess", "mean"] = "memory_plus_excess"
    pixel_weight: float = Field(0.0, ge=0.0)
    # Both are given at 512 px, as in the paper, and scaled to the model's image size.
    blur_sigma_at_512: float = Field(6.0, ge=0.0)
    top_k_at_512: int = Field(250, ge=1)
    # threshold = mean + sigmas * std of held-out normal scores
    threshold_sigmas: float = Field(3.0, gt=0.0)
    map_threshold_quantile: float = Field(0.999, gt=0.5, lt=1.0)

    @model_validator(mode="after")
    def _check_neighbourhood(self) -> ScoringConfig:
        if self.neighbourhood % 2 == 0:
            raise ValueError("scoring.neighbourhood must be odd, so each position is its centre")
        if not self.maps or len(set(self.maps)) != len(self.maps):
            raise ValueError("scoring.maps needs one or both of reconstruction and memory, once")
        return self


class MemoryConfig(_Strict):
    """A memory of normal patches beside the reconstruction (PatchCore's nearest-neighbour
    map): the training images' score-layer features, thinned by k-center greedy coreset."""

    # The share of training patches kept, up to max_patches (the lookup's cost grows with it).
    coreset_ratio: float = Field(0.1, gt=0.0, le=1.0)
    max_patches: int = Field(10_000, ge=1)
    # Width the coreset selection compares patches at (a random projection); the bank keeps
    # the full vectors.
    projection_dim: int = Field(128, ge=1)


class RuntimeConfig(_Strict):
    """How a product's model runs: torch, or the ONNX files `glad export` wrote."""

    backend: Literal["torch", "onnxruntime"] = "torch"


class SourceFile(_Strict):
    """A weights or config file a model is made of, outside its own weights file."""

    # Absolute, or relative to the model folder (copied into it).
    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


# ADS options that format-2 folders may hold, with the one value that remains.
_DROPPED_ADS_FIELDS: dict[str, object] = {"check_reference": "x0_in", "checks_after_snap": True}

# Stable Diffusion's VAE halves the resolution three times.
VAE_FACTOR = 8


class GladConfig(_Strict):
    format_version: int = FORMAT_VERSION
    preset: str = "compact"
    image_size: int = Field(256, ge=32, le=1024)
    diffusion: DiffusionConfig = DiffusionConfig()
    synthesis: SynthesisConfig = SynthesisConfig()
    training: TrainingConfig = TrainingConfig()
    ads: ADSConfig = ADSConfig()
    features: FeatureConfig = FeatureConfig()
    scoring: ScoringConfig = ScoringConfig()
    # None: no memory of normal patches (the paper preset; folders trained before it existed).
    memory: MemoryConfig | None = MemoryConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    # The files an imported model (`glad import`, the paper preset) is made of, by role (see
    # model.sd.SOURCE_ROLES); a file that no longer matches its SHA-256 is refused at load.
    sources: dict[str, SourceFile] | None = None

    @model_validator(mode="before")
    @classmethod
    def _read_earlier_fields(cls, data: Any) -> Any:
        """A format-2 config.json written before ADS's cheap-check options were dropped,
        delta's margin moved to training, or the memory of normal patches came: read as it was
        meant (a folder without a memory answers with its reconstruction's map alone)."""
        if not isinstance(data, dict) or not isinstance(data.get("ads"), dict):
            return data
        if "memory" not in data:
            scoring = data.get("scoring") or {}
            if isinstance(scoring, BaseModel):
                scoring = scoring.model_dump()
            data = {**data, "memory": None, "scoring": {"maps": ("reconstruction",), **scoring}}
        ads = dict(data["ads"])
        for name, kept in _DROPPED_ADS_FIELDS.items():
            if name in ads and ads.pop(name) != kept:
                raise ValueError(f"ads.{name} is no longer supported: only {kept!r} remains")
        if "delta_margin" in ads:
            training = data.get("training") or {}
            if isinstance(training, BaseModel):
                training = training.model_dump()
            data = {**data, "training": {"delta_margin": ads.pop("delta_margin"), **training}}
        return {**data, "ads": ads}

    @property
    def sample_channels(self) -> int:
        """Channels of the tensor the UNet denoises."""
        space = self.diffusion.space
        if space == "features":
            return sum(self.features.layer_shape(layer)[0] for layer in self.features.score_layers)
        return {"pixel": 3, "patch": 3 * self.diffusion.patch_size**2, "vae": 4}[space]

    @property
    def fold(self) -> int:
        """Image pixels per sample position along each axis."""
        space = self.diffusion.space
        if space == "features":
            return min(self.features.layer_shape(layer)[1] for layer in self.features.score_layers)
        return {"patch": self.diffusion.patch_size, "vae": VAE_FACTOR}.get(space, 1)

    @model_validator(mode="after")
    def _check_sizes(self) -> GladConfig:
        levels = len(self.diffusion.block_out_channels)
        multiple = self.fold * 2 ** (levels - 1)
        if self.image_size % multiple:
            raise ValueError(
                f"image_size {self.image_size} must be a multiple of {multiple} "
                f"(pixels per sample position x 2^(UNet levels - 1))"
            )
        # A first level narrower than its input cannot carry the noise through: the loss
        # stalls near 1 - width / channels (measured: 0.90 with 32 channels for patch 8's 192).
        if self.diffusion.block_out_channels[0] < self.sample_channels:
            raise ValueError(
                f"diffusion.block_out_channels[0] ({self.diffusion.block_out_channels[0]}) must "
                f"be at least the {self.sample_channels} channels of a {self.diffusion.space} "
                "sample; widen it, or use a smaller patch_size or fewer feature layers"
            )
        if self.diffusion.space == "features":
            strides = [self.features.layer_shape(layer)[1] for layer in self.features.score_layers]
            if self.image_size % max(strides):
                raise ValueError(f"image_size must be a multiple of {max(strides)} (layer stride)")
            if self.features.ads_layer not in self.features.score_layers:
                raise ValueError("in feature space, features.ads_layer must be a score layer")
            if self.scoring.pixel_weight > 0:
                raise ValueError(
                    "scoring.pixel_weight needs an image space: feature space has none"
                )
        if "memory" in self.scoring.maps and self.memory is None:
            raise ValueError("scoring.maps names the memory, but the config has no memory")
        if self.ads.start_step >= self.diffusion.num_train_timesteps:
            raise ValueError("ads.start_step must be below diffusion.num_train_timesteps")
        return self

    def with_overrides(self, **sections: dict[str, object]) -> GladConfig:
        """A copy with some fields of some sections replaced, validated again."""
        data = self.model_dump()
        for section, values in sections.items():
            if isinstance(data.get(section), dict):
                data[section].update(values)
            else:
                data[section] = values
        return GladConfig.model_validate(data)


class MapCalibration(_Strict):
    """How one map enters the fused map: less its reference map or not, then rescaled so that
    its held-out normal pixels' 0.90 quantile (`low`) goes to 0 and 0.995 (`high`) to 1."""

    reference: bool
    low: float
    high: float

    @model_validator(mode="after")
    def _check_span(self) -> MapCalibration:
        if not self.high > self.low:
            raise ValueError("a map's high quantile must be above its low one")
        return self


class Calibration(_Strict):
    """Threshold and normalisation, fitted on held-out normal training images only
    (calibration.json; model.calibrate fits and applies them)."""

    # Per map of scoring.maps. None: a calibration from before the memory of normal patches,
    # the reconstruction's map alone, less the reference map.
    maps: dict[Literal["reconstruction", "memory"], MapCalibration] | None = None
    threshold: float
    normal_mean: float
    normal_std: float
    map_threshold: float
    map_mean: float
    num_images: int
    # The ADS delta calibrated for this product; None = the config's delta.
    ads_delta: float | None = None


# The authors' recipe: SD v1.4 (latent diffusion, CFG 9), DINO ViT-B/8, 512 px, 25 DDIM steps
# from 750 with a check at every step (MVTec/MPDD settings). Built by model.paper.
PAPER = GladConfig(
    preset="paper",
    image_size=512,
    diffusion=DiffusionConfig(
        space="vae",
        block_out_channels=(320, 640, 1280, 1280),
        attention_levels=(True, True, True, False),
        guidance_scale=9.0,
    ),
    training=TrainingConfig(steps=4000, batch_size=32, learning_rate=5e-6, warmup_steps=0),
    ads=ADSConfig(
        start_step=750,
        num_steps=25,
        t_min=350,
        undecided="input",
        saff_center=0.0,
        saff_temperature=1.0,
    ),
    features=FeatureConfig(backbone="dino_vitb8", ads_layer=12, score_layers=(3, 6, 9, 12)),
    scoring=ScoringConfig(
        reference_map=False,
        distance="cosine",
        neighbourhood=1,
        search_radius=None,
        maps=("reconstruction",),
    ),
    memory=None,
)

# The prompt the authors fine-tune with (their --instance_prompt): the conditional pass of
# the paper preset's classifier-free guidance needs the same one.
AUTHORS_PROMPT = "a photo of sks"

PRESETS: dict[str, GladConfig] = {
    "compact": GladConfig(),
    "paper": PAPER,
}
