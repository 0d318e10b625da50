"""Synthetic anomalies for GLAD's anomaly-oriented training (ATP), DRAEM-style.

A thresholded, rotated Perlin noise field picks blob-shaped regions of an image, and those regions
are replaced by a blend of a texture and the image itself. Every random draw goes through a CPU
``torch.Generator``, so a seed fixes the output whatever device the images are on.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from model.config import SynthesisConfig
from model.data import IMAGE_SUFFIXES, from_uint8, image_files

# Masks that come out empty are drawn again up to this many times before the threshold gives way.
_MASK_ATTEMPTS = 8
# The fallback keeps the top decile of the noise: blob-shaped like a real mask, never empty.
_FALLBACK_QUANTILE = 0.9
_CONTRAST_RANGE = (0.7, 1.3)
_BRIGHTNESS_RANGE = (-0.2, 0.2)


def _uniform(shape: tuple[int, ...], low: float, high: float, generator: torch.Generator) -> Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator)


def _fade(t: Tensor) -> Tensor:
    # Perlin's quintic: zero first and second derivatives at lattice points, so cells join smoothly.
    return t * t * t * (t * (t * 6 - 15) + 10)


def _perlin_cells(
    rows: int, cols: int, cell_y: int, cell_x: int, generator: torch.Generator
) -> Tensor:
    """Perlin noise over rows x cols lattice cells of cell_y x cell_x pixels each."""
    angles = 2 * math.pi * torch.rand((rows + 1, cols + 1), generator=generator)
    # Work in (rows, cell_y, cols, cell_x) so that per-cell gradients and per-pixel offsets
    # broadcast against each other instead of being gathered for every pixel.
    grad_y = torch.sin(angles)[:, None, :, None]
    grad_x = torch.cos(angles)[:, None, :, None]
    frac_y = (torch.arange(cell_y) / cell_y).view(1, cell_y, 1, 1)
    frac_x = (torch.arange(cell_x) / cell_x).view(1, 1, 1, cell_x)

    def corner(dy: int, dx: int) -> Tensor:
        # Dot product of the corner's gradient with the offset from that corner to the pixel.
        gy = grad_y[dy : dy + rows, :, dx : dx + cols]
        gx = grad_x[dy : dy + rows, :, dx : dx + cols]
        return gy * (frac_y - dy) + gx * (frac_x - dx)

    weight_y, weight_x = _fade(frac_y), _fade(frac_x)
    top = torch.lerp(corner(0, 0), corner(0, 1), weight_x)
    bottom = torch.lerp(corner(1, 0), corner(1, 1), weight_x)
    return torch.lerp(top, bottom, weight_y).reshape(rows * cell_y, cols * cell_x)


def perlin_noise(
    height: int, width: int, res_y: int, res_x: int, generator: torch.Generator
) -> Tensor:
    """2D Perlin noise (H, W) with res_y x res_x lattice cells, values within about +-0.71.

    Cells span a whole number of pixels, so when res does not divide the size the lattice is
    generated at the next multiple and cropped. Noise is zero on lattice points, so a resolution
    at or above the size in pixels gives zeros.
    """
    if min(height, width, res_y, res_x) < 1:
        raise ValueError("perlin_noise needs positive sizes and resolutions")
    cell_y, cell_x = math.ceil(height / res_y), math.ceil(width / res_x)
    return _perlin_cells(res_y, res_x, cell_y, cell_x, generator)[:height, :width]


def _rotated_noise(
    count: int, height: int, width: int, max_exponent: int, generator: torch.Generator
) -> Tensor:
    """Noise (count, 1, H, W): 2^k cells per axis, k drawn per axis and sample, randomly rotated."""
    # Noise is drawn on a square canvas that covers the image's diagonal, so the rotated image
    # window never reaches past the canvas and no corner is left without noise.
    side = math.ceil(math.hypot(height, width)) + 2
    exponents = torch.randint(0, max_exponent + 1, (count, 2), generator=generator)
    angles = _uniform((count,), -math.pi / 2, math.pi / 2, generator)
    canvases = []
    for exp_y, exp_x in exponents.tolist():
        # Cells narrower than 2 pixels would put every pixel on a lattice point, where noise is 0.
        cell_y = max(2, math.ceil(height / 2**exp_y))
        cell_x = max(2, math.ceil(width / 2**exp_x))
        rows, cols = math.ceil(side / cell_y), math.ceil(side / cell_x)
        canvases.append(_perlin_cells(rows, cols, cell_y, cell_x, generator)[:side, :side])
    canvas = torch.stack(canvases).unsqueeze(1)
    # affine_grid maps normalised output coordinates to normalised canvas coordinates:
    # theta = diag(1/side) @ R(angle) @ diag(W, H) rotates pixel offsets from the centre.
    cos, sin = torch.cos(angles), torch.sin(angles)
    theta = torch.zeros(count, 2, 3)
    theta[:, 0, 0] = cos * width / side
    theta[:, 0, 1] = -sin * height / side
    theta[:, 1, 0] = sin * width / side
    theta[:, 1, 1] = cos * height / side
    grid = F.affine_grid(theta, [count, 1, height, width], align_corners=False)
    return F.grid_sample(canvas, grid, mode="bilinear", align_corners=False)


def perlin_masks(
    batch: int, height: int, width: int, config: SynthesisConfig, generator: torch.Generator
) -> Tensor:
    """Binary anomaly masks (B, 1, H, W), float in {0, 1}, none of them empty (CPU)."""
    masks = torch.zeros(batch, 1, height, width)
    pending = torch.arange(batch)
    noise = torch.zeros(0, 1, height, width)
    for _ in range(_MASK_ATTEMPTS):
        if pending.numel() == 0:
            return masks
        noise = _rotated_noise(
            pending.numel(), height, width, config.perlin_max_exponent, generator
        )
        drawn = noise > config.perlin_threshold
        masks[pending] = drawn.float()
        empty = ~drawn.flatten(1).any(dim=1)
        noise, pending = noise[empty], pending[empty]
    if pending.numel():
        # A coarse lattice can stay below a high threshold every time; the quantile of a sample's
        # own noise is at most its maximum, so this mask always has pixels.
        cut = torch.quantile(noise.flatten(1), _FALLBACK_QUANTILE, dim=1)
        masks[pending] = (noise >= cut.view(-1, 1, 1, 1)).float()
    return masks


def _rotate_flip(images: Tensor, generator: torch.Generator) -> Tensor:
    """Per sample: a random number of quarter turns, then random horizontal and vertical flips."""
    batch, _, height, width = images.shape
    turns = torch.randint(0, 4, (batch,), generator=generator)
    if height != width:
        # A quarter turn would swap height and width; non-square images get half turns only.
        turns = turns - turns % 2
    flips = (torch.rand((batch, 2), generator=generator) < 0.5).to(images.device)
    out = torch.stack(
        [
            torch.rot90(sample, k, dims=(-2, -1))
            for sample, k in zip(images, turns.tolist(), strict=True)
        ]
    )
    out = torch.where(flips[:, 0].view(-1, 1, 1, 1), out.flip(-1), out)
    return torch.where(flips[:, 1].view(-1, 1, 1, 1), out.flip(-2), out)


def _jitter(images: Tensor, generator: torch.Generator) -> Tensor:
    """Per sample: contrast scaled about the image mean, then a brightness shift, clamped."""
    batch = images.shape[0]
    contrast = _uniform((batch,), *_CONTRAST_RANGE, generator).view(-1, 1, 1, 1).to(images)
    brightness = _uniform((batch,), *_BRIGHTNESS_RANGE, generator).view(-1, 1, 1, 1).to(images)
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    return ((images - mean) * contrast + mean + brightness).clamp(-1, 1)


def _shuffle_patches(images: Tensor, grid: int, generator: torch.Generator) -> Tensor:
    """Per sample: the grid x grid patches put back in a random order."""
    batch, channels, height, width = images.shape
    grid = min(grid, height, width)
    patch_h, patch_w = height // grid, width // grid
    body_h, body_w = grid * patch_h, grid * patch_w
    order = torch.argsort(torch.rand((batch, grid * grid), generator=generator), dim=1)
    patches = (
        images[:, :, :body_h, :body_w]
        .reshape(batch, channels, grid, patch_h, grid, patch_w)
        .permute(0, 2, 4, 1, 3, 5)
        .reshape(batch, grid * grid, channels, patch_h, patch_w)
    )
    rows = torch.arange(batch, device=images.device)[:, None]
    patches = patches[rows, order.to(images.device)]
    out = images.clone()
    # Rows and columns left over when the size is not a multiple of the grid keep their pixels.
    out[:, :, :body_h, :body_w] = (
        patches.reshape(batch, grid, grid, channels, patch_h, patch_w)
        .permute(0, 3, 1, 4, 2, 5)
        .reshape(batch, channels, body_h, body_w)
    )
    return out


class TextureSource:
    """Where anomaly textures come from; build it with from_folder, self_shuffle or from_config."""

    def __init__(self, *, bank: Tensor | None, grid: int, augment: bool) -> None:
        if grid < 1:
            raise ValueError(f"shuffle grid must be at least 1, got {grid}")
        # uint8 (N, 3, S, S): a texture folder can hold thousands of images.
        self._bank = bank
        self._grid = grid
        self._augment = augment

    @classmethod
    def from_folder(cls, path: str | Path, image_size: int) -> TextureSource:
        """Every image in the folder (not its subfolders), RGB, resized to image_size squared."""
        folder = Path(path)
        if not folder.is_dir():
            raise ValueError(f"texture folder {folder} does not exist or is not a folder")
        files = image_files(folder)
        if not files:
            suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
            raise ValueError(f"texture folder {folder} has no images ({suffixes})")
        textures = []
        for file in files:
            try:
                with Image.open(file) as image:
                    rgb = image.convert("RGB").resize(
                        (image_size, image_size), Image.Resampling.BILINEAR
                    )
            except OSError as error:
                raise ValueError(f"cannot read texture image {file}: {error}") from error
            pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
            textures.append(pixels.view(image_size, image_size, 3).permute(2, 0, 1))
        return cls(bank=torch.stack(textures), grid=1, augment=False)

    @classmethod
    def self_shuffle(cls, grid: int, augment: bool = True) -> TextureSource:
        """Each image's own patches, augmented (unless augment is False) and shuffled."""
        return cls(bank=None, grid=grid, augment=augment)

    @classmethod
    def from_config(cls, config: SynthesisConfig, image_size: int) -> TextureSource:
        """The folder in config.texture_dir if set, else self-shuffle with config.shuffle_grid."""
        if config.texture_dir is not None:
            return cls.from_folder(config.texture_dir, image_size)
        return cls.self_shuffle(config.shuffle_grid)

    def __len__(self) -> int:
        """Number of folder textures; 0 for self-shuffle."""
        return 0 if self._bank is None else len(self._bank)

    def textures(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """One texture per image, same shape, device and dtype as images (B, 3, H, W)."""
        if self._bank is None:
            source = images
            if self._augment:
                # Jitter too: the image's own colours alone would make a faint anomaly.
                source = _jitter(_rotate_flip(images, generator), generator)
            return _shuffle_patches(source, self._grid, generator)
        picks = torch.randint(len(self._bank), (images.shape[0],), generator=generator)
        chosen = from_uint8(self._bank[picks].to(images.device), images.dtype)
        if chosen.shape[-2:] != images.shape[-2:]:
            chosen = F.interpolate(
                chosen, size=images.shape[-2:], mode="bilinear", align_corners=False, antialias=True
            )
        return _rotate_flip(chosen, generator)


def synthesize_anomalies(
    images: Tensor,
    config: SynthesisConfig,
    generator: torch.Generator,
    textures: TextureSource | None = None,
) -> tuple[Tensor, Tensor]:
    """Anomalous images (B, 3, H, W) in [-1, 1] and their masks (B, 1, H, W) in {0, 1}.

    Each sample gets an anomaly with probability config.anomaly_probability, else it comes back
    unchanged with an all-zero mask. textures=None means self-shuffle with config.shuffle_grid;
    a config with texture_dir needs the loaded TextureSource.from_config passed in.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    if textures is None:
        if config.texture_dir is not None:
            raise ValueError(
                "config.texture_dir is set: load it once with TextureSource.from_config "
                "and pass it as textures"
            )
        textures = TextureSource.self_shuffle(config.shuffle_grid)
    batch, _, height, width = images.shape
    device, dtype = images.device, images.dtype
    chosen = torch.rand(batch, generator=generator) < config.anomaly_probability
    betas = config.beta_max * torch.rand(batch, generator=generator)
    out = images.clone()
    masks = torch.zeros(batch, 1, height, width, device=device, dtype=dtype)
    index = chosen.nonzero().flatten()
    if index.numel() == 0:
        return out, masks
    picked = index.to(device)
    x = images[picked]
    mask = perlin_masks(index.numel(), height, width, config, generator).to(device, dtype)
    texture = textures.textures(x, generator)
    beta = betas[index].view(-1, 1, 1, 1).to(device, dtype)
    blended = x * (1 - mask) + mask * ((1 - beta) * texture + beta * x)
    out[picked] = blended.clamp(-1, 1)
    masks[picked] = mask
    return out, masks
