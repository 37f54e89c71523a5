"""Runs one vLLM engine on the tiny Qwen2.5-VL in its own process and prints JSON:
the prompt ids vLLM fed the LLM, the greedy output ids and the kept token indices.

A fresh process per engine: vLLM loads its plugins (and ``VLLM_PLUGINS``) once per process.
``python tests_vllm/run_engine.py MODEL_DIR IMAGE.png '{"saint_keep_ratio": 0.25}'``
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

PROMPTS = {  # by the checkpoint's model_type
    "qwen2_5_vl": "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe the "
    "picture.<|im_end|>\n<|im_start|>assistant\n",
    "llava": "USER: <image>\nDescribe the picture. ASSISTANT:",
}
MAX_TOKENS = 6


def main(model: str, image_path: str, overrides: str) -> None:
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # for apply_model
    from PIL import Image
    from vllm import LLM, SamplingParams

    from saint.integrations.vllm import last_kept_indices

    model_type = json.loads((Path(model) / "config.json").read_text())["model_type"]

    llm = LLM(
        model=model, hf_overrides=json.loads(overrides), max_model_len=1024, max_num_seqs=2,
        enforce_eager=True, kv_cache_memory_bytes=1 << 27, seed=0,
        limit_mm_per_prompt={"image": 1, "video": 0},
    )
    image = Image.open(image_path).convert("RGB")
    request = {"prompt": PROMPTS[model_type], "multi_modal_data": {"image": image}}
    out = llm.generate(request, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))[0]
    kept = llm.apply_model(last_kept_indices)[0]
    result = {
        "prompt_token_ids": list(out.prompt_token_ids),
        "token_ids": list(out.outputs[0].token_ids),
        "kept": kept,
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:4])
