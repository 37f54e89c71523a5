"""Fixtures of the vLLM plugin tests (run in their own venv by ``make test-vllm``, part of
``make test``): a tiny random Qwen2.5-VL written once per session, a portrait test image,
engines run one per process, and the comparison of vLLM's greedy decoding with a
transformers reference."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

RUNNER = Path(__file__).with_name("run_engine.py")
# One engine start (three processes importing vLLM, model load, profiling, one request)
# took 20-70 s on a shared 2-core VM; ten times that is a hang, not a slow machine.
ENGINE_TIMEOUT_S = 600
# vLLM and transformers, both in float32, gave log-probabilities within 1e-5 of each other
# here; bfloat16 rounding alone moves them by about 1e-2.
LOGPROB_TOL = 1e-3
# vLLM runs Qwen3.5 on CPU in bfloat16 only (its Gated DeltaNet kernel): against the float32
# reference its log-probabilities moved by up to 0.065 here, while giving the kept tokens
# sequential positions instead of their grid positions moved them by 0.12 to 0.43.
BF16_LOGPROB_TOL = 0.1


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The references run on one thread (the machine is shared; the model is tiny)."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def vllm_cache(tmp_path_factory) -> Path:
    """vLLM's cache folder (``VLLM_CACHE_ROOT``) for this session, so that no engine reads
    what an earlier run left in ``~/.cache/vllm``."""
    return tmp_path_factory.mktemp("vllm-cache")


def _tiny_checkpoint(name: str, writer: str, folder: str, doc: str, **kwargs: object):
    """Session fixture ``name``: the folder of a tiny checkpoint that
    ``saint.integrations.vllm.tiny``'s ``writer`` writes (with ``kwargs``) once per session."""

    def checkpoint(tmp_path_factory) -> Path:
        from saint.integrations.vllm import tiny

        return getattr(tiny, writer)(tmp_path_factory.mktemp(folder), **kwargs)

    checkpoint.__doc__ = doc
    return pytest.fixture(scope="session", name=name)(checkpoint)


model_dir = _tiny_checkpoint("model_dir", "write_checkpoint", "tiny-qwen2.5-vl", "A tiny Qwen2.5-VL.")
qwen2_dir = _tiny_checkpoint("qwen2_dir", "write_checkpoint", "tiny-qwen2-vl", "A tiny Qwen2-VL.", family="qwen2_vl")
omni_dir = _tiny_checkpoint("omni_dir", "write_qwen_omni_checkpoint", "tiny-qwen2.5-omni",
                            "A tiny Qwen2.5-Omni (the thinker served; Qwen2.5-VL's geometry, an audio tower).")
omni3_dir = _tiny_checkpoint("omni3_dir", "write_qwen_omni_checkpoint", "tiny-qwen3-omni",
                             "A tiny Qwen3-Omni (the thinker served; the Qwen3-VL test's tower, an MoE LM, an audio "
                             "tower).", family="qwen3_omni_moe")
qwen3_dir = _tiny_checkpoint("qwen3_dir", "write_qwen3_vl_checkpoint", "tiny-qwen3-vl", "A tiny Qwen3-VL.")
qwen3_5_dir = _tiny_checkpoint("qwen3_5_dir", "write_qwen3_vl_checkpoint", "tiny-qwen3.5",
                               "A tiny Qwen3.5 (Qwen3-VL's tower; a Gated DeltaNet layer, then full attention).",
                               family="qwen3_5")
qwen3_5_moe_dir = _tiny_checkpoint("qwen3_5_moe_dir", "write_qwen3_vl_checkpoint", "tiny-qwen3.5-moe",
                                   "The tiny Qwen3.5 with a mixture-of-experts LM (4 experts, 2 per token, a shared one).",
                                   family="qwen3_5", moe=True)
qwen3_moe_dir = _tiny_checkpoint("qwen3_moe_dir", "write_qwen3_vl_checkpoint", "tiny-qwen3-vl-moe",
                                 "The tiny Qwen3-VL with a mixture-of-experts LM (4 experts, 2 per token).", moe=True)
llava_dir = _tiny_checkpoint("llava_dir", "write_llava_checkpoint", "tiny-llava",
                             "A tiny LLaVA-1.5 (112 px, CLIP tower: 64 image tokens).", image_size=112)
llava_next_dir = _tiny_checkpoint("llava_next_dir", "write_llava_checkpoint", "tiny-llava-next",
                                  "A tiny LLaVA-NeXT (a 112 px base view of 64 tokens plus up to 2 x 2 crops).",
                                  family="llava_next")
granite_vision_dir = _tiny_checkpoint("granite_vision_dir", "write_llava_checkpoint", "tiny-granite-vision",
                                     "The same as a Granite Vision 3.x: a Granite LM reading two tower layers.",
                                     family="llava_next", granite=True)
llava_onevision_dir = _tiny_checkpoint("llava_onevision_dir", "write_llava_checkpoint", "tiny-llava-onevision",
                                       "The same as a LLaVA-OneVision.", family="llava_onevision")
internvl_dir = _tiny_checkpoint("internvl_dir", "write_internvl_checkpoint", "tiny-internvl",
                                "A tiny InternVL: 64 px tiles of 16 context tokens, up to 4 tiles plus a thumbnail.")
gemma3_dir = _tiny_checkpoint("gemma3_dir", "write_gemma3_checkpoint", "tiny-gemma3",
                              "A tiny Gemma 3: 64 px images of 16 image tokens, a 16-token sliding window.")
paligemma_dir = _tiny_checkpoint("paligemma_dir", "write_paligemma_checkpoint", "tiny-paligemma",
                                 "A tiny PaliGemma: 64 px images, every 8 px patch one of 64 image tokens.")
paligemma2_dir = _tiny_checkpoint(
    "paligemma2_dir", "write_paligemma_checkpoint", "tiny-paligemma2",
    "The same geometry as a PaliGemma 2 (a Gemma 2 LM: softcapped logits, a 16-token window).", gemma2=True)
gemma4_dir = _tiny_checkpoint("gemma4_dir", "write_gemma4_checkpoint", "tiny-gemma4",
                              "A tiny Gemma 4: 16 px patches pooled 3 x 3, at most 70 soft tokens; per-layer inputs.")
glm4v_dir = _tiny_checkpoint("glm4v_dir", "write_glm4v_checkpoint", "tiny-glm4v",
                             "A tiny GLM-4.1V (patch 14 merged 2 x 2, half-rotary M-RoPE).")
glm4v_moe_dir = _tiny_checkpoint("glm4v_moe_dir", "write_glm4v_checkpoint", "tiny-glm4v-moe",
                                 "The same as a GLM-4.5V (layer 1: 4 routed experts, 2 per token, and a shared one).",
                                 moe=True)
glm_ocr_dir = _tiny_checkpoint("glm_ocr_dir", "write_glm4v_checkpoint", "tiny-glm-ocr",
                               "A tiny GLM-OCR (GLM-4.1V's geometry; q/k norms in the tower).", ocr=True)
paddleocr_vl_dir = _tiny_checkpoint("paddleocr_vl_dir", "write_paddleocr_vl_checkpoint", "tiny-paddleocr-vl",
                                    "A tiny PaddleOCR-VL (patch 14 merged 2 x 2, an ERNIE 4.5 LM with M-RoPE).")
idefics3_dir = _tiny_checkpoint("idefics3_dir", "write_idefics3_checkpoint", "tiny-idefics3",
                                "A tiny Idefics3: 64 px tiles of 16 image tokens, images split up to 2 x 2 tiles.")
mistral3_dir = _tiny_checkpoint("mistral3_dir", "write_mistral3_checkpoint", "tiny-mistral3",
                                "A tiny Mistral 3 (Pixtral tower, 16 px patches merged 2 x 2, at most 128 px).")
lighton_ocr_dir = _tiny_checkpoint(
    "lighton_ocr_dir", "write_mistral3_checkpoint", "tiny-lighton-ocr",
    "A tiny LightOnOCR in the hub's format (Mistral 3's tower and merge, a Qwen3 LM; no row breaks).",
    family="lighton_ocr")
llava_pixtral_dir = _tiny_checkpoint(
    "llava_pixtral_dir", "write_mistral3_checkpoint", "tiny-llava-pixtral",
    "A tiny Pixtral-based LLaVA (the same tower, no merge: one token per 16 px patch).", family="llava")


@pytest.fixture(scope="session")
def internvl_chat_dir(tmp_path_factory, internvl_dir) -> Path:
    """The same InternVL in the remote-code format (``InternVLChatModel``)."""
    from saint.integrations.vllm.tiny import write_internvl_chat_checkpoint

    return write_internvl_chat_checkpoint(tmp_path_factory.mktemp("tiny-internvl-chat"), internvl_dir)


@pytest.fixture(scope="session")
def image_path(tmp_path_factory) -> Path:
    """A portrait image (224 x 168: a 8 x 6 grid of 48 merged tokens), so positions after
    the image depend on the grid's height, not its width."""
    pixels = np.random.default_rng(0).integers(0, 256, (224, 168, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("img") / "portrait.png"
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="session")
def run_engine(vllm_cache):
    """``run_engine(model_dir, image, overrides, plugins=None, engine=None, processes=False)``:
    start one engine in a fresh process, generate greedily; return the runner's JSON.
    ``image``: one image path, or a list of requests (each the list of its prompt's images;
    see ``run_engine.py``). ``plugins``: vLLM's ``VLLM_PLUGINS`` (``saint_compat`` = plain
    vLLM, no SAINT override); ``engine``: extra ``LLM(...)`` arguments.

    ``processes``: run vLLM's engine core in its own process, as ``vllm serve`` and ``LLM``
    do by default, so the plugin must load there from its entry point. Otherwise the engine
    core runs in the runner's process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): the same model
    code and outputs, and a start of ~15 s instead of ~40 s here (one process imports vLLM
    instead of two). The tests that rest on the process split ask for it."""

    def run(
        model_dir: Path,
        image: Path | list[list[Path]],
        overrides: dict,
        plugins: str | None = None,
        engine: dict | None = None,
        processes: bool = False,
    ) -> dict:
        env = {
            **os.environ,
            "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",  # for LLM.apply_model
            "VLLM_ENABLE_V1_MULTIPROCESSING": "1" if processes else "0",
            "OMP_NUM_THREADS": "1",
            "VLLM_CACHE_ROOT": str(vllm_cache),
            "VLLM_NO_USAGE_STATS": "1",  # no network at run time
            "HF_HUB_OFFLINE": "1",
            "HF_MODULES_CACHE": str(vllm_cache / "hf-modules"),  # remote-code configs (InternVL chat)
        }
        env.pop("VLLM_PLUGINS", None)
        if plugins is not None:
            env["VLLM_PLUGINS"] = plugins
        cmd = [
            sys.executable, str(RUNNER), str(model_dir),
            json.dumps([[str(p) for p in paths] for paths in image]) if isinstance(image, list) else str(image),
            json.dumps(overrides),
            json.dumps(engine or {}),
        ]
        output = _run_group(cmd, env)
        for line in output.splitlines():
            if line.startswith("RESULT "):
                return json.loads(line[len("RESULT "):])
        raise EngineFailed(output)

    return run


def _run_group(cmd: list[str], env: dict) -> str:
    """Run ``cmd`` in its own process group and return its output. The engine core and the
    worker are vLLM's child processes: on a timeout the whole group is killed (killing the
    runner alone would leave them holding the output pipe, and the test would hang)."""
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=ENGINE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        output, _ = proc.communicate()
        raise EngineFailed(output, f"timed out after {ENGINE_TIMEOUT_S} s") from None
    finally:
        _kill_group(proc.pid)  # leftovers of a crashed engine, if any
    return output


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class EngineFailed(RuntimeError):
    def __init__(self, output: str, why: str = "exited without a result") -> None:
        super().__init__(f"engine process {why}:\n{output[-4000:]}")
        self.output = output


def assert_same_greedy_decoding(got: dict, ref_logprobs: torch.Tensor, tol: float = LOGPROB_TOL) -> None:
    """vLLM's greedy tokens against a reference's log-probabilities ``[steps, vocab]`` for
    the same tokens: at each step vLLM's token is the reference's argmax (up to a tie within
    ``tol``) and the two log-probabilities of that token agree within it."""
    assert len(got["token_ids"]) == len(ref_logprobs) > 0
    for step, (token, logprob) in enumerate(zip(got["token_ids"], got["logprobs"], strict=True)):
        ref = ref_logprobs[step]
        best = int(ref.argmax())
        assert float(ref[token]) >= float(ref[best]) - tol, (
            f"step {step}: vLLM chose {token} ({float(ref[token]):.5f} in the reference), "
            f"the reference {best} ({float(ref[best]):.5f})"
        )
        assert abs(logprob - float(ref[token])) <= tol, (step, logprob, float(ref[token]))
