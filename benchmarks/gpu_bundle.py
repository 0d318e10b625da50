"""What benchmarks/gpu_check.sh needs on a lent GPU machine that has no network: `make
gpu-bundle` writes it to .gpu-bundle/ (ignored by git; the device tool carries it).

- wheels/: the project itself (its metadata: the code runs from the carried repository) and
  the Python packages that the machine's image lacks (its python3 is 3.12
  with its own PyTorch, torchvision, NumPy, SciPy, scikit-learn, Pillow, safetensors,
  ONNX Runtime, uvloop, httpx, prometheus-client, pytest: KINDS.md's package list), at the
  versions constraints.txt pins, as CPython 3.12 manylinux wheels;
- debs/: Debian's redis-server and the libraries it links that such an image lacks;
- data/: one shared category, every image resized to the accuracy check's size (JPEG at
  quality 95, masks PNG), so that the data travels well under the 64 MiB limit.

    python -m benchmarks.gpu_bundle            # or: make gpu-bundle
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
BUNDLE = ROOT / ".gpu-bundle"
# The carried tree's limit is 64 MiB with the repository: the bundle stays well under it.
MAX_BUNDLE_MIB = 40
# Packages the project imports that the GPU image does not hold (or holds too old for the
# pins beside them: pydantic needs typing_extensions >= 4.16).
WHEELS = (
    "alembic",
    "annotated-types",
    "diffusers",
    "fastapi",
    "fastapi-offline",
    "httptools",
    "importlib_metadata",
    "isal",
    "Mako",
    "opentelemetry-api",
    "paho-mqtt",
    "pydantic",
    "pydantic_core",
    "pydantic-settings",
    "python-dotenv",
    "python-multipart",
    "redis",
    "SQLAlchemy",
    "starlette",
    "typing-inspection",
    "typing_extensions",
    "uvicorn",
    "zipp",
)
# redis-server is a link to redis-tools' binary; liblzf and jemalloc are what it links
# that a CUDA base image lacks.
DEBS = ("redis-server", "redis-tools", "liblzf1", "libjemalloc2")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
CATEGORY = "mvtec_transistor"
SIZE = 256


def pinned(name: str, constraints: Path = ROOT / "constraints.txt") -> str:
    """`name==version` as constraints.txt pins it."""
    wanted = re.sub(r"[-_.]+", "-", name).lower()
    for line in constraints.read_text().splitlines():
        package, _, version = line.partition("==")
        if re.sub(r"[-_.]+", "-", package).lower() == wanted and version:
            return f"{package}=={version.strip()}"
    raise ValueError(f"{name} is not pinned in {constraints}")


def download_wheels(folder: Path) -> None:
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
        + ["--python-version", "3.12", "--implementation", "cp", *platforms]
        + ["-d", str(folder), *(pinned(name) for name in WHEELS)],
        check=True,
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
        + ["-w", str(folder), str(ROOT)],
        check=True,
    )


def download_debs(folder: Path) -> None:
    subprocess.run(["apt-get", "download", *DEBS], cwd=folder, check=True)


def resize_category(source: Path, target: Path, size: int) -> int:
    """Every image of an MVTec-layout category at size x size (JPEG), masks as PNG; returns
    how many files were written."""
    count = 0
    for path in sorted(source.rglob("*")):
        if not path.is_file() or path.suffix.lower() not in {".png", ".jpg", ".jpeg", ".bmp"}:
            continue
        relative = path.relative_to(source)
        with Image.open(path) as image:
            if relative.parts[0] == "ground_truth":
                out = target / relative.with_suffix(".png")
                resized = image.convert("L").resize((size, size), Image.Resampling.NEAREST)
                options: dict[str, object] = {}
            else:
                out = target / relative.with_suffix(".jpg")
                resized = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
                options = {"quality": 95}
        out.parent.mkdir(parents=True, exist_ok=True)
        resized.save(out, **options)
        count += 1
    return count


def mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=BUNDLE)
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "datasets")
    parser.add_argument("--category", default=CATEGORY)
    parser.add_argument("--size", type=int, default=SIZE)
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    for part in ("wheels", "debs"):
        (args.out / part).mkdir(parents=True)
    download_wheels(args.out / "wheels")
    download_debs(args.out / "debs")
    source = args.data_root / args.category
    count = resize_category(source, args.out / "data" / args.category, args.size)
    total = mib(args.out)
    print(
        f"{args.out}: {len(list((args.out / 'wheels').iterdir()))} wheels, "
        f"{len(list((args.out / 'debs').iterdir()))} debs, {count} images of {args.category} "
        f"at {args.size} px; {total:.1f} MiB"
    )
    if total > MAX_BUNDLE_MIB:
        print(f"the bundle is over {MAX_BUNDLE_MIB} MiB: it may not travel", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
