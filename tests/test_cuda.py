"""The GPU path on a CUDA device: fp16 against fp32, compiled against eager, ONNX Runtime's
CUDA provider against torch, and a worker serving through Redis.

They run where CUDA is (`pytest -m cuda`; benchmarks/gpu_check.py runs them first) and are
skipped elsewhere: CI has no GPU.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import onnxruntime as ort
import pytest
import redis
import torch

from model.compiled import compile_inspector
from model.inspector import Inspector
from service.app import create_app
from service.cli import main
from service.settings import Settings
from tests.conftest import TINY_PRODUCT
from tests.images import part_image, with_defect
from tests.service_harness import WorkerProcess, free_port, own_redis_command, png, serving

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

# The fused map in fp16 against fp32, as a relative error of the whole batch's maps: fp16
# keeps about 3 significant digits, and the lookup's and the denoiser's errors add up.
FP16_MAP_TOLERANCE = 2e-2


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


def _images(count: int = 4) -> torch.Tensor:
    generator = torch.Generator().manual_seed(11)
    return torch.rand(count, 3, 64, 64, generator=generator) * 2 - 1


def test_fp16_inference_matches_fp32_on_the_same_model(tiny_model_dir: Path) -> None:
    folder = tiny_model_dir / TINY_PRODUCT
    full = Inspector.load(folder, "cuda", torch.float32)
    half = Inspector.load(folder, "cuda")  # the precision rule: fp16 on CUDA
    assert half.pipeline.dtype == torch.float16 and half.pipeline.memory is not None
    images = _images()
    want, got = full.pipeline(images), half.pipeline(images)
    assert _relative_error(got.maps, want.maps) < FP16_MAP_TOLERANCE
    torch.testing.assert_close(got.scores, want.scores, rtol=FP16_MAP_TOLERANCE, atol=1e-3)


def test_the_gpu_in_fp32_scores_as_the_cpu(tiny_model_dir: Path) -> None:
    folder = tiny_model_dir / TINY_PRODUCT
    cpu, gpu = Inspector.load(folder), Inspector.load(folder, "cuda", torch.float32)
    images = _images()
    want, got = cpu.pipeline(images), gpu.pipeline(images)
    assert _relative_error(got.maps.cpu(), want.maps) < 1e-3


def test_compiled_cuda_graphs_give_the_eager_maps(tiny_model_dir: Path) -> None:
    folder = tiny_model_dir / TINY_PRODUCT
    eager, compiled = Inspector.load(folder, "cuda"), Inspector.load(folder, "cuda")
    compile_inspector(compiled, max_batch=4)  # inductor, CUDA graphs ("reduce-overhead")
    for count in (1, 3, 4):  # a bucket's own size, a padded batch
        images = _images(count)
        want, got = eager.pipeline(images), compiled.pipeline(images)
        assert _relative_error(got.maps, want.maps) < 1e-2, count
        assert got.reconstruction.denoise_steps.tolist() == (
            want.reconstruction.denoise_steps.tolist()
        )


@pytest.mark.skipif(
    "CUDAExecutionProvider" not in ort.get_available_providers(),
    reason="this onnxruntime has no CUDA execution provider (install onnxruntime-gpu)",
)
def test_onnxruntime_on_cuda_gives_the_torch_maps(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / TINY_PRODUCT
    shutil.copytree(tiny_model_dir / TINY_PRODUCT, folder)
    assert main(["export", "--model", str(folder)]) == 0
    torch_model = Inspector.load(folder, "cuda", backend="torch")
    ort_model = Inspector.load(folder, "cuda", backend="onnxruntime")
    images = _images()
    want, got = torch_model.pipeline(images), ort_model.pipeline(images)
    assert _relative_error(got.maps, want.maps) < FP16_MAP_TOLERANCE


def test_a_worker_serves_on_cuda_through_redis(tiny_model_dir: Path, tmp_path: Path) -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("no redis-server on PATH")
    port = free_port()
    server = subprocess.Popen(own_redis_command(port, tmp_path), stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    worker = WorkerProcess(
        {"REDIS_URL": url, "MODEL_DIR": str(tiny_model_dir), "DEVICE": "cuda"},
        tmp_path / "worker.log",
    )
    try:
        with serving(create_app(Settings(redis_url=url, request_timeout_s=120))) as base:
            deadline = time.monotonic() + 300
            while httpx.get(f"{base}/readyz").status_code != 200:
                assert worker.process.poll() is None, worker.log_path.read_text()
                assert time.monotonic() < deadline, "the CUDA worker did not announce itself"
                time.sleep(0.5)
            headers = {"Content-Type": "image/png"}
            answers = [
                httpx.post(f"{base}/inspect/{TINY_PRODUCT}", content=png(image), headers=headers)
                for image in (part_image(3), with_defect(part_image(4)))
            ]
        assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
        clean, damaged = (a.json() for a in answers)
        assert damaged["raw_score"] > clean["raw_score"] and damaged["is_anomalous"]
        presences = [
            json.loads(value)
            for key in redis.Redis.from_url(url).scan_iter(match=f"*:worker:{TINY_PRODUCT}:*")
            if (value := redis.Redis.from_url(url).get(key))
        ]
        assert [p["device"] for p in presences] == ["cuda"]
    finally:
        worker.stop()
        server.terminate()
        server.wait(10)
