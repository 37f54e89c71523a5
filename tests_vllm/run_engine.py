"""Runs one vLLM engine on a tiny checkpoint in its own process and prints JSON: the prompt
ids vLLM fed the LLM, the greedy output ids with their log-probabilities, and the kept token
indices.

A fresh process per engine: vLLM loads its plugins (and ``VLLM_PLUGINS``) once per process.
``python tests_vllm/run_engine.py MODEL_DIR IMAGE.png '{"saint_keep_ratio": 0.25}' ['{...}']``
(the optional last argument: more ``LLM(...)`` arguments).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

QWEN_PROMPT = (
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe the "
    "picture.<|im_end|>\n<|im_start|>assistant\n"
)
PROMPTS = {  # by the checkpoint's model_type
    "qwen2_5_vl": QWEN_PROMPT,
    "qwen3_vl": QWEN_PROMPT,
    "llava": "USER: <image>\nDescribe the picture. ASSISTANT:",
}
MAX_TOKENS = 6


def main(model: str, image_path: str, overrides: str, engine: str = "{}") -> None:
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # for apply_model
    from PIL import Image
    from vllm import LLM, SamplingParams

    from saint.integrations.vllm import last_kept_indices

    model_type = json.loads((Path(model) / "config.json").read_text())["model_type"]
    args = dict(
        model=model, hf_overrides=json.loads(overrides), max_model_len=1024, max_num_seqs=2,
        enforce_eager=True, kv_cache_memory_bytes=1 << 27, seed=0,
        # vLLM on CPU would cast the float32 checkpoint to bfloat16, whose rounding decides
        # near-tied greedy tokens differently from the float32 reference.
        dtype="float32",
        limit_mm_per_prompt={"image": 1, "video": 0},
    )
    llm = LLM(**{**args, **json.loads(engine)})
    image = Image.open(image_path).convert("RGB")
    request = {"prompt": PROMPTS[model_type], "multi_modal_data": {"image": image}}
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=0)
    out = llm.generate(request, params)[0]
    completion = out.outputs[0]
    kept = llm.apply_model(last_kept_indices)[0]
    result = {
        "prompt_token_ids": list(out.prompt_token_ids),
        "token_ids": list(completion.token_ids),
        "logprobs": [
            step[token].logprob
            for step, token in zip(completion.logprobs, completion.token_ids, strict=True)
        ],
        "kept": kept,
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:5])
