"""A memory of normal patches (PatchCore's): the training images' patch features, thinned by
greedy k-center coreset selection, and each query patch's distance to its nearest entry."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from model.config import MemoryConfig
from model.data import from_uint8
from model.scoring import neighbourhood_mean

# Elements of a query-by-bank distance block computed at once (64 MiB of float32).
_BLOCK = 1 << 24


def k_center_greedy(
    features: torch.Tensor,
    count: int,
    seed: int = 0,
    projection_dim: int = 128,
    candidates: int = 4096,
) -> torch.Tensor:
    """Indices of `count` rows of `features` (N, D) chosen by greedy k-center selection.

    Starts from a seeded random row, then repeatedly adds the row farthest from everything
    chosen so far. Rows wider than `projection_dim` are first randomly projected down to it,
    which keeps distances roughly intact (Johnson-Lindenstrauss) and makes each step cheaper.

    The selection is exactly the plain greedy one, computed lazily: one matrix-vector pass over
    all N rows per step is memory-bound and slow on a CPU, so each step only updates the
    `candidates` rows that were farthest at the last refresh. A row outside them can only have
    moved closer since, so a candidate at least as far as the farthest outside row is the true
    farthest; when none is, every row catches up with the new centres in one matrix product.
    """
    n = features.shape[0]
    if not 0 < count <= n:
        raise ValueError(f"count must be in 1..{n}, got {count}")
    generator = torch.Generator().manual_seed(seed)
    x = features.float()
    if x.shape[1] > projection_dim:
        projection = torch.randn(x.shape[1], projection_dim, generator=generator)
        x = x @ (projection / math.sqrt(projection_dim))
    sq_norms = x.pow(2).sum(dim=1)
    selected = [int(torch.randint(n, (1,), generator=generator))]
    pending = selected.copy()  # chosen rows whose distances `nearest` does not include yet
    # Squared distance of each row to its nearest chosen row, as of the last refresh.
    nearest = torch.full((n,), math.inf)
    while len(selected) < count:
        nearest = torch.minimum(nearest, _min_sq_distance(x, sq_norms, pending))
        # -inf, not 0: rounding can leave a chosen row a tiny positive distance from itself.
        nearest[pending] = -math.inf
        pending = []
        top, rows = nearest.topk(min(candidates + 1, n))
        outside = float(top[-1]) if len(rows) > candidates else -math.inf
        top, rows = top[:candidates], rows[:candidates]
        row_x, row_sq = x[rows], sq_norms[rows]
        while len(selected) < count:
            best = int(torch.argmax(top))
            if float(top[best]) < outside:
                break
            center = int(rows[best])
            selected.append(center)
            pending.append(center)
            dist = (row_sq + sq_norms[center]).sub_(row_x @ x[center], alpha=2.0)
            torch.minimum(top, dist, out=top)
            top[best] = -math.inf
    return torch.tensor(selected)


def _min_sq_distance(x: torch.Tensor, sq_norms: torch.Tensor, centers: list[int]) -> torch.Tensor:
    """Squared distance of each row of `x` to its nearest row among `centers`, in chunks."""
    c, c_sq = x[centers].T.contiguous(), sq_norms[centers]
    chunk = max(1, _BLOCK // len(centers))
    return torch.cat(
        [
            (sq_norms[i : i + chunk, None] + c_sq).sub_(x[i : i + chunk] @ c, alpha=2.0).amin(1)
            for i in range(0, len(x), chunk)
        ]
    )


def patch_vectors(
    features: dict[int, torch.Tensor], layers: tuple[int, ...], neighbourhood: int
) -> torch.Tensor:
    """One vector per position (B, C, h, w) from the extractor's own maps: each layer averaged
    over its neighbourhood on its own grid (a coarse layer so sees a wider context), resized
    to the first layer's grid, and the layers stacked along channels (PatchCore's embedding)."""
    pooled = [neighbourhood_mean(features[layer].float(), neighbourhood) for layer in layers]
    size = pooled[0].shape[-2:]
    return torch.cat(
        [
            F.interpolate(p, size=size, mode="bilinear", align_corners=False)
            if p.shape[-2:] != size
            else p
            for p in pooled
        ],
        dim=1,
    )


class MemoryBank:
    """Normal patch vectors (M, C), centred on their mean so that the distance's expansion
    keeps its precision in fp16; `distances` finds each query's nearest one."""

    def __init__(self, patches: torch.Tensor, center: torch.Tensor | None = None) -> None:
        """patches: (M, C) as stored; center: their mean (C,), computed when not given."""
        if patches.ndim != 2 or not len(patches):
            raise ValueError(f"a memory bank needs patches (M, C) with M >= 1, got {patches.shape}")
        self.patches = patches
        self.center = patches.float().mean(0) if center is None else center
        centred = patches.float() - self.center.float()
        self._centred = centred.to(patches.dtype)
        self._sq_norms = centred.pow(2).sum(1)

    def __len__(self) -> int:
        return self.patches.shape[0]

    @property
    def channels(self) -> int:
        return self.patches.shape[1]

    def to(self, device: torch.device | str, dtype: torch.dtype) -> MemoryBank:
        """The same bank on a device, its products in `dtype` (the pipeline's)."""
        moved = MemoryBank.__new__(MemoryBank)
        moved.patches = self.patches.to(device)
        moved.center = self.center.to(device, torch.float32)
        moved._centred = self._centred.to(device, dtype)
        moved._sq_norms = self._sq_norms.to(device, torch.float32)
        return moved

    def distances(self, query: torch.Tensor) -> torch.Tensor:
        """Euclidean distance from each position of `query` (B, C, h, w) to its nearest
        patch: (B, h, w) float32. The products run in the bank's dtype, in blocks."""
        b, c, h, w = query.shape
        if c != self.channels:
            raise ValueError(f"query has {c} channels, the memory bank {self.channels}")
        q = (query.float().permute(0, 2, 3, 1).reshape(-1, c) - self.center).to(self._centred.dtype)
        q_sq = q.float().pow(2).sum(1)
        chunk = max(1, _BLOCK // len(self))
        best = torch.cat(
            [
                (q_sq[i : i + chunk, None] + self._sq_norms)
                .sub_((q[i : i + chunk] @ self._centred.T).float(), alpha=2.0)
                .amin(1)
                for i in range(0, len(q), chunk)
            ]
        )
        # The expansion can go a rounding error below zero where two vectors are equal.
        return best.clamp_(min=0).sqrt_().view(b, h, w)


def bank_size(patches: int, config: MemoryConfig) -> int:
    """How many patches a memory keeps of `patches` training patches."""
    return max(1, min(config.max_patches, round(config.coreset_ratio * patches)))


def build_memory_bank(
    patches_of: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    config: MemoryConfig,
    batch_size: int,
    seed: int = 0,
) -> tuple[MemoryBank, dict[str, float]]:
    """A memory from uint8 training images (N, 3, S, S), whose patch vectors (B, C, h, w)
    `patches_of` gives for a batch in [-1, 1]. Returns the bank and what training.json
    records of it: its patches, the training patches they were chosen from, its MiB."""
    rows = []
    for chunk in images.split(batch_size):
        vectors = patches_of(from_uint8(chunk)).float()
        rows.append(vectors.permute(0, 2, 3, 1).reshape(-1, vectors.shape[1]).cpu())
    patches = torch.cat(rows)
    keep = k_center_greedy(patches, bank_size(len(patches), config), seed, config.projection_dim)
    bank = MemoryBank(patches[keep].contiguous())
    summary = {
        "memory_patches": len(bank),
        "memory_training_patches": len(patches),
        "memory_mib": round(bank.patches.numel() * bank.patches.element_size() / 2**20, 2),
    }
    return bank, summary
