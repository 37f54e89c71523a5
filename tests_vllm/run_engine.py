"""Runs one vLLM engine on a tiny checkpoint in its own process and prints JSON: the prompt
ids vLLM fed the LLM, the greedy output ids with their log-probabilities, and the kept token
indices.

A fresh process per engine: vLLM loads its plugins (and ``VLLM_PLUGINS``) once per process.
``python tests_vllm/run_engine.py MODEL_DIR IMAGE.png '{"saint_keep_ratio": 0.25}' ['{...}']``
(the optional last argument: more ``LLM(...)`` arguments, and ``filler_words``: that much text
after the images; ``audio_seconds``: an Omni prompt opens with that long an :func:`audio_clip`).

With a JSON list of requests instead of the image (``'[["a.png", "b.png"], ["c.png"]]'``: the
images of each prompt), the requests run together in one ``generate`` call and then each
again on its own (which finds its prompt in the prefix cache), and the runner prints
``{"batched": [...], "again": [...]}`` with one result per request.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# Qwen2.5-VL's chat template's default system turn: more text before the first image than it
# keeps tokens (vLLM's own position rewrite then misplaced a second image)
QWEN_PROMPT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
               "<|im_start|>user\n{images}Describe the picture.<|im_end|>\n<|im_start|>assistant\n")
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
QWEN3_OMNI_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
# GLM's template; long enough that an image prompt fills a 32-token block (the prefix-cache test)
GLM = ("[gMASK]<sop><|user|>\n{images}What is in the image? Describe the picture in one sentence.<|assistant|>\n",
       "<|begin_of_image|><|image|><|end_of_image|>")
PROMPTS = {  # by the checkpoint's model_type: the prompt and one image's placeholder
    "qwen2_vl": (QWEN_PROMPT, QWEN_IMAGE),
    "qwen2_5_vl": (QWEN_PROMPT, QWEN_IMAGE),
    "qwen3_vl": (QWEN_PROMPT, QWEN_IMAGE),
    "qwen3_vl_moe": (QWEN_PROMPT, QWEN_IMAGE),
    "qwen3_5": (QWEN_PROMPT, QWEN_IMAGE),
    "qwen3_5_moe": (QWEN_PROMPT, QWEN_IMAGE),
    "llava": ("USER: {images}Describe the picture. ASSISTANT:", "<image>\n"),
    "llava_next": ("USER: {images}Describe the picture. ASSISTANT:", "<image>\n"),
    "llava_onevision": ("USER: {images}Describe the picture. ASSISTANT:", "<image>\n"),
    "internvl": (QWEN_PROMPT, "<IMG_CONTEXT>\n"),
    "internvl_chat": (QWEN_PROMPT, "<image>\n"),
    "paligemma": ("{images}Describe the picture.", ""),  # vLLM puts the image tokens in front itself
    "gemma3": ("<bos><start_of_turn>user\n{images}Describe the picture.<end_of_turn>\n<start_of_turn>model\n",
               "<start_of_image>"),
    "mistral3": ("<s>[INST]{images}Describe the picture.[/INST]", "[IMG]"),
    "gemma4": ("<bos>{images}Describe the picture.", "<|image|>"),
    "paddleocr_vl": ("<s>User: {images}Describe the picture.\nAssistant: ",
                     "<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>"),
    "qwen2_5_omni": (QWEN_PROMPT, "<|vision_bos|><|IMAGE|><|vision_eos|>"),
    "qwen3_omni_moe": (QWEN_PROMPT, QWEN3_OMNI_IMAGE),
    "glm4v": GLM,
    "glm4v_moe": GLM,
    "glm_ocr": GLM,
    "idefics3": ("<|im_start|>User:{images}Describe the picture.<end_of_utterance>\nAssistant:", "<image>"),
}
MAX_TOKENS = 6
AUDIO = {"qwen2_5_omni": "<|audio_bos|><|AUDIO|><|audio_eos|>",  # an Omni prompt's audio clip
         "qwen3_omni_moe": "<|audio_start|><|audio_pad|><|audio_end|>"}
SAMPLING_RATE = 16000


def audio_clip(seconds: float):
    """A reproducible ``seconds`` of quiet noise at 16 kHz (the Omni feature extractor's rate)."""
    import numpy as np

    return np.random.default_rng(0).standard_normal(int(SAMPLING_RATE * seconds)).astype(np.float32) * 0.1


def prompt(model_type: str, images: int, filler: int = 0, audio: bool = False) -> str:
    """The model's prompt with ``audio`` (one clip) and ``images`` placeholders, then
    ``filler`` words of text."""
    text, image = PROMPTS[model_type]
    return text.format(images=(AUDIO[model_type] if audio else "") + image * images + "A cat on a mat. " * (filler // 5))


def result(out) -> dict:
    """One request's prompt ids, greedy ids, their log-probabilities and cached tokens."""
    completion = out.outputs[0]
    return {
        "prompt_token_ids": list(out.prompt_token_ids),
        "token_ids": list(completion.token_ids),
        "logprobs": [
            step[token].logprob
            for step, token in zip(completion.logprobs, completion.token_ids, strict=True)
        ],
        "num_cached_tokens": out.num_cached_tokens,
    }


def main(model: str, image_path: str, overrides: str, engine: str = "{}") -> None:
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # for apply_model
    from PIL import Image
    from vllm import LLM, SamplingParams

    from saint.integrations.vllm import last_kept_indices

    engine_args = json.loads(engine)
    filler = engine_args.pop("filler_words", 0)  # text after the images (a prompt longer than a cache block)
    seconds = engine_args.pop("audio_seconds", 0)
    audio = {"audio": (audio_clip(seconds), SAMPLING_RATE)} if seconds else {}
    config = json.loads((Path(model) / "config.json").read_text())
    model_type = config["model_type"]
    if config.get("vision_config", {}).get("model_type") == "pixtral":  # Pixtral-based LLaVA: Mistral's prompt
        model_type = "mistral3"
    args = dict(
        model=model, hf_overrides=json.loads(overrides), max_model_len=1024, max_num_seqs=2,
        enforce_eager=True, kv_cache_memory_bytes=1 << 27, seed=0,
        # vLLM on CPU would cast the float32 checkpoint to bfloat16, whose rounding decides
        # near-tied greedy tokens differently from the float32 reference.
        dtype="float32",
        limit_mm_per_prompt={"image": 1, "video": 0},
        trust_remote_code="auto_map" in config,  # the InternVL chat format's config class
    )
    llm = LLM(**{**args, **engine_args})
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=0)
    if not image_path.startswith("["):
        image = Image.open(image_path).convert("RGB")
        out = llm.generate({"prompt": prompt(model_type, 1, filler, bool(audio)),
                            "multi_modal_data": {"image": image, **audio}}, params)[0]
        print("RESULT " + json.dumps({**result(out), "kept": llm.apply_model(last_kept_indices)[0]}), flush=True)
        return
    requests = [
        {"prompt": prompt(model_type, len(paths), filler),
         "multi_modal_data": {"image": [Image.open(p).convert("RGB") for p in paths]}}
        for paths in json.loads(image_path)
    ]
    batched = [result(out) for out in llm.generate(requests, params)]
    again = [result(llm.generate(request, params)[0]) for request in requests]
    print("RESULT " + json.dumps({"batched": batched, "again": again}), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:5])
