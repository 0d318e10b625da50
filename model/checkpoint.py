"""A product's checkpoint folder: safetensors weights, config, calibration, training summary.

Nothing in the folder can run code: weights are safetensors, everything else is JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.config import FORMAT_VERSION, Calibration, GladConfig

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CALIBRATION = "calibration.json"
TRAINING = "training.json"
REFERENCE_MAP = "reference_map.safetensors"
MEMORY = "memory.safetensors"
FILES = (WEIGHTS, CONFIG, CALIBRATION, REFERENCE_MAP, TRAINING)
# The one map of a calibration from before the memory of normal patches, in REFERENCE_MAP.
LEGACY_REFERENCE = "reference_map"


class CheckpointError(ValueError):
    """A model folder that cannot be loaded; the message names the problem."""


@dataclass(frozen=True)
class ModelFolder:
    config: GladConfig
    weights: dict[str, torch.Tensor]
    calibration: Calibration | None  # None when loaded uncalibrated
    # (S, S) by map name: the held-out normals' mean map of each map that takes its own
    # (model.calibrate.references); empty when loaded uncalibrated.
    references: dict[str, torch.Tensor]
    memory: torch.Tensor | None  # (M, C): the memory of normal patches; None without one
    training: dict[str, Any]
    version: str  # short content hash of the weights


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_atomic(path: Path, write: Any) -> None:
    # A reader (the worker polling the folder) never sees a half-written file.
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def write_json(path: Path, data: Any) -> None:
    _write_atomic(path, lambda p: p.write_text(json.dumps(data, indent=2) + "\n"))


def save_weights(path: Path, weights: dict[str, torch.Tensor]) -> None:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
    _write_atomic(path, lambda p: save_file(tensors, str(p)))


def save_model_folder(
    folder: Path,
    config: GladConfig,
    weights: dict[str, torch.Tensor],
    calibration: Calibration,
    references: dict[str, torch.Tensor],
    training: dict[str, Any],
    memory: torch.Tensor | None = None,
) -> None:
    """Write a loadable folder; training.json goes last and records the files' hashes.

    memory: the memory of normal patches (M, C), where config.memory asks for one."""
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(folder / WEIGHTS, weights)
    if memory is not None:
        save_weights(folder / MEMORY, {"patches": memory})
    save_weights(folder / REFERENCE_MAP, _reference_tensors(references))
    write_json(folder / CONFIG, config.model_dump(mode="json"))
    write_json(folder / CALIBRATION, calibration.model_dump(mode="json"))
    write_json(folder / TRAINING, {**training, **_hashes(folder)})


def _reference_tensors(references: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses an empty file: a calibration that takes no reference still has one.
    return references or {"none": torch.zeros(0)}


# The files training.json vouches for, each under this key.
_HASHED = {
    "weights_sha256": WEIGHTS,
    "reference_map_sha256": REFERENCE_MAP,
    "config_sha256": CONFIG,
    "calibration_sha256": CALIBRATION,
    "memory_sha256": MEMORY,
}


def _hashes(folder: Path) -> dict[str, str]:
    # A folder without a memory of normal patches has no memory file to vouch for.
    return {
        key: sha256(folder / name) for key, name in _HASHED.items() if (folder / name).is_file()
    }


def rewrite_config(folder: Path, config: GladConfig) -> None:
    """Replace a model folder's config on purpose (glad export), and vouch for it."""
    write_json(folder / CONFIG, config.model_dump(mode="json"))
    _rehash(folder)


def rewrite_calibration(
    folder: Path,
    calibration: Calibration,
    references: dict[str, torch.Tensor],
    config: GladConfig | None = None,
    memory: torch.Tensor | None = None,
    training_update: dict[str, Any] | None = None,
) -> None:
    """Replace a model folder's calibration on purpose (glad calibrate), and vouch for it;
    with the config and memory it was calibrated with where they are new, and what
    training.json should record of them."""
    if memory is not None:
        save_weights(folder / MEMORY, {"patches": memory})
    save_weights(folder / REFERENCE_MAP, _reference_tensors(references))
    if config is not None:
        write_json(folder / CONFIG, config.model_dump(mode="json"))
    write_json(folder / CALIBRATION, calibration.model_dump(mode="json"))
    _rehash(folder, training_update or {})


def _rehash(folder: Path, update: dict[str, Any] | None = None) -> None:
    training = _read_json(folder / TRAINING)
    write_json(folder / TRAINING, {**training, **(update or {}), **_hashes(folder)})


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from error


def load_model_folder(folder: Path, calibrated: bool = True) -> ModelFolder:
    """Read and check a model folder; any problem raises CheckpointError naming it.

    calibrated=False leaves calibration.json and the reference maps unread (calibration None,
    no references): for `glad calibrate`, which writes them afresh.
    """
    if not folder.is_dir():
        raise CheckpointError(f"no model folder at {folder}")
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(f"{folder} is missing {', '.join(missing)} (a partial copy?)")

    raw_config = _read_json(folder / CONFIG)
    version = raw_config.get("format_version") if isinstance(raw_config, dict) else None
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{folder / CONFIG} has format version {version}; this build reads "
            f"{FORMAT_VERSION}: train the model again with this build"
        )
    training = _read_json(folder / TRAINING)
    if not isinstance(training, dict):
        raise CheckpointError(f"{folder / TRAINING} should hold a JSON object")
    _check_vouched(folder, training, (CONFIG, CALIBRATION) if calibrated else (CONFIG,))
    try:
        config = GladConfig.model_validate(raw_config)
        calibration = (
            Calibration.model_validate(_read_json(folder / CALIBRATION)) if calibrated else None
        )
    except ValidationError as error:
        raise CheckpointError(f"{folder} has an invalid config or calibration: {error}") from error

    weights = _load_tensors(folder / WEIGHTS, training.get("weights_sha256"))
    memory = _load_memory(folder, config, training)
    references: dict[str, torch.Tensor] = {}
    if calibration is not None:
        stored = _load_tensors(folder / REFERENCE_MAP, training.get("reference_map_sha256"))
        references = _references(folder, config, calibration, stored)
    version = model_version(training["weights_sha256"], config)
    return ModelFolder(config, weights, calibration, references, memory, training, version)


def _load_memory(folder: Path, config: GladConfig, training: dict[str, Any]) -> torch.Tensor | None:
    if config.memory is None:
        return None
    if not (folder / MEMORY).is_file():
        raise CheckpointError(f"{folder} is missing {MEMORY}, which its config asks for")
    memory = _load_tensors(folder / MEMORY, training.get("memory_sha256")).get("patches")
    channels = sum(config.features.layer_shape(layer)[0] for layer in config.features.score_layers)
    if memory is None or memory.ndim != 2 or not len(memory) or memory.shape[1] != channels:
        raise CheckpointError(f"{folder / MEMORY} should hold 'patches' of shape (M, {channels})")
    return memory


def _references(
    folder: Path, config: GladConfig, calibration: Calibration, stored: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The reference map of each map that takes one, by map name; CheckpointError where one
    is missing or of the wrong size."""
    if calibration.maps is None:
        wanted = {"reconstruction": LEGACY_REFERENCE}
    else:
        wanted = {name: name for name, scale in calibration.maps.items() if scale.reference}
    calibrated_maps = {"reconstruction"} if calibration.maps is None else set(calibration.maps)
    if calibrated_maps != set(config.scoring.maps):
        raise CheckpointError(
            f"{folder / CALIBRATION} calibrates the maps {sorted(calibrated_maps)}, the config "
            f"fuses {sorted(config.scoring.maps)}: run `glad calibrate` on it"
        )
    size = (config.image_size, config.image_size)
    references = {}
    for name, key in wanted.items():
        reference = stored.get(key)
        if reference is None or tuple(reference.shape) != size:
            raise CheckpointError(f"{folder / REFERENCE_MAP} should hold a {size} {key!r}")
        references[name] = reference
    return references


def model_version(weights_sha256: str, config: GladConfig) -> str:
    """A short content hash of everything a model computes with: its weights file, and the
    files it was imported from, if any."""
    if config.sources is None:
        return weights_sha256[:12]
    digest = hashlib.sha256(weights_sha256.encode())
    for role in sorted(config.sources):
        digest.update(config.sources[role].sha256.encode())
    return digest.hexdigest()[:12]


def _check_vouched(folder: Path, training: dict[str, Any], names: tuple[str, ...]) -> None:
    """JSON files must be as training (or export, or calibrate) left them."""
    keys = {name: key for key, name in _HASHED.items()}
    for name in names:
        if sha256(folder / name) != training.get(keys[name]):
            raise CheckpointError(
                f"{folder / name} was changed after training (its SHA-256 is not the one "
                f"{TRAINING} records). To recalibrate a model, run `glad calibrate --model "
                f"{folder} --data DIR`; to change its config, train it again"
            )


def _load_tensors(path: Path, expected_sha256: object) -> dict[str, torch.Tensor]:
    if sha256(path) != expected_sha256:
        raise CheckpointError(
            f"{path} does not match its hash in {TRAINING} (a partial or mixed copy?)"
        )
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is corrupt: {error}") from error


# Feature space's per-channel statistics ride in the weights file under this prefix: they are
# learned from the training images as much as the UNet is.
SPACE_PREFIX = "space."


def with_space_statistics(
    weights: dict[str, torch.Tensor], statistics: dict[str, torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    """The UNet's weights plus the space's statistics (if any), as the weights file holds them."""
    extra = {f"{SPACE_PREFIX}{k}": v for k, v in (statistics or {}).items()}
    return {**weights, **extra}


def split_space_statistics(
    config: GladConfig, weights: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """(UNet weights, the space's statistics or None); CheckpointError if they do not fit."""
    unet = {k: v for k, v in weights.items() if not k.startswith(SPACE_PREFIX)}
    stats = {k[len(SPACE_PREFIX) :]: v for k, v in weights.items() if k.startswith(SPACE_PREFIX)}
    if config.diffusion.space != "features":
        if stats:
            raise CheckpointError(
                f"weights hold {SPACE_PREFIX}* statistics, but the space is not features"
            )
        return unet, None
    channels = config.sample_channels
    for name in ("mean", "std"):
        value = stats.get(name)
        if value is None or tuple(value.shape) != (channels,):
            raise CheckpointError(
                f"weights should hold {SPACE_PREFIX}{name} of shape ({channels},) for feature space"
            )
    return unet, stats


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A user's weights file: safetensors, or a PyTorch file of plain tensors (weights_only)."""
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        # weights_only refuses pickled code: a weights file must not be able to run anything.
        return torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise CheckpointError(f"cannot read weights {path}: {error}") from error


def check_weights_fit(
    module: torch.nn.Module, weights: dict[str, torch.Tensor], what: str = "the config's UNet"
) -> None:
    """Raise CheckpointError when weights do not match the module (`what`, for the message)."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in weights.items()}
    missing = sorted(expected.keys() - got.keys())
    unexpected = sorted(got.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & got.keys() if expected[k] != got[k])
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} of the wrong shape (e.g. {k}: {got[k]} vs {expected[k]})")
        raise CheckpointError(f"weights do not match {what}: " + "; ".join(parts))
