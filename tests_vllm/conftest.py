"""Fixtures of the vLLM plugin tests (run in their own venv: ``make test-vllm``): a tiny random
Qwen2.5-VL written once per session, a portrait test image, and engines run one per process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

RUNNER = Path(__file__).with_name("run_engine.py")


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The references run on one thread (the machine is shared; the model is tiny)."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    from saint.integrations.vllm.tiny import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("tiny-qwen2.5-vl"))


@pytest.fixture(scope="session")
def image_path(tmp_path_factory) -> Path:
    """A portrait image (224 x 168: a 8 x 6 grid of 48 merged tokens), so positions after
    the image depend on the grid's height, not its width."""
    pixels = np.random.default_rng(0).integers(0, 256, (224, 168, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("img") / "portrait.png"
    Image.fromarray(pixels).save(path)
    return path


def run_engine(model_dir: Path, image: Path, overrides: dict, plugins: str | None = None) -> dict:
    """Start one engine in a fresh process, generate greedily; return the runner's JSON.
    ``plugins``: vLLM's ``VLLM_PLUGINS`` (``saint_compat`` = plain vLLM, no SAINT override)."""
    env = {**os.environ, "VLLM_ALLOW_INSECURE_SERIALIZATION": "1", "OMP_NUM_THREADS": "1"}
    env.pop("VLLM_PLUGINS", None)
    if plugins is not None:
        env["VLLM_PLUGINS"] = plugins
    cmd = [sys.executable, str(RUNNER), str(model_dir), str(image), json.dumps(overrides)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise EngineFailed(proc.returncode, proc.stdout + proc.stderr)


class EngineFailed(RuntimeError):
    def __init__(self, returncode: int, output: str) -> None:
        super().__init__(f"engine process exited {returncode}:\n{output[-4000:]}")
        self.output = output
