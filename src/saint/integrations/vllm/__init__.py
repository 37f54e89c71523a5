"""SAINT image-token pruning inside vLLM, as a ``vllm.general_plugins`` plugin.

Installed with ``pip install 'saint[vllm]'``; vLLM loads it in every process. Switched
on per model through vLLM's ``--hf-overrides`` (the model's HF config), e.g.::

    vllm serve Qwen/Qwen2.5-VL-7B-Instruct --hf-overrides '{"saint_keep_ratio": 0.25}'

Settings: ``saint_keep_ratio`` (share of each image's merged tokens kept, in (0, 1]) and
``saint_step_div`` (the fixed-budget drop's step, default 16). Without them the model is
vLLM's own. Qwen2.5-VL, Qwen2-VL, Qwen3-VL and Qwen3.5 (dense and MoE), Qwen2.5-Omni and Qwen3-Omni (their thinkers; audio passes), GLM-4.1V / 4.5V, GLM-OCR, PaddleOCR-VL, InternVL (both formats) and
LLaVA-OneVision (images only
while pruning), LLaVA-1.5, LLaVA-NeXT, Mistral 3, LightOnOCR, Gemma 3, Gemma 4, PaliGemma, Idefics3 and SmolVLM are overridden
(see docs/vllm.md, also for why pruning inside the language model does not fit vLLM's
paged KV cache).

Nothing else in saint imports this package, so saint never needs vLLM.
"""

from __future__ import annotations

from typing import Any

ARCHITECTURES = {
    "Qwen2VLForConditionalGeneration": (
        "saint.integrations.vllm.qwen2_vl:SaintQwen2VLForConditionalGeneration"
    ),
    "Qwen2_5_VLForConditionalGeneration": (
        "saint.integrations.vllm.qwen2_5_vl:SaintQwen2_5_VLForConditionalGeneration"
    ),
    "Qwen3VLForConditionalGeneration": (
        "saint.integrations.vllm.qwen3_vl:SaintQwen3VLForConditionalGeneration"
    ),
    "Qwen3VLMoeForConditionalGeneration": (
        "saint.integrations.vllm.qwen3_vl:SaintQwen3VLMoeForConditionalGeneration"
    ),
    "Qwen3_5ForConditionalGeneration": (
        "saint.integrations.vllm.qwen3_5:SaintQwen3_5ForConditionalGeneration"
    ),
    "Qwen3_5MoeForConditionalGeneration": (
        "saint.integrations.vllm.qwen3_5:SaintQwen3_5MoeForConditionalGeneration"
    ),
    "LlavaForConditionalGeneration": (
        "saint.integrations.vllm.llava:SaintLlavaForConditionalGeneration"
    ),
    "Idefics3ForConditionalGeneration": (
        "saint.integrations.vllm.idefics3:SaintIdefics3ForConditionalGeneration"
    ),
    "SmolVLMForConditionalGeneration": (
        "saint.integrations.vllm.idefics3:SaintSmolVLMForConditionalGeneration"
    ),
    "LlavaNextForConditionalGeneration": (
        "saint.integrations.vllm.llava_next:SaintLlavaNextForConditionalGeneration"
    ),
    "LlavaOnevisionForConditionalGeneration": (
        "saint.integrations.vllm.llava_next:SaintLlavaOnevisionForConditionalGeneration"
    ),
    "Mistral3ForConditionalGeneration": (
        "saint.integrations.vllm.mistral3:SaintMistral3ForConditionalGeneration"
    ),
    "LightOnOCRForConditionalGeneration": (
        "saint.integrations.vllm.lightonocr:SaintLightOnOCRForConditionalGeneration"
    ),
    "InternVLForConditionalGeneration": (
        "saint.integrations.vllm.internvl:SaintInternVLForConditionalGeneration"
    ),
    "InternVLChatModel": "saint.integrations.vllm.internvl:SaintInternVLChatModel",
    "Gemma3ForConditionalGeneration": (
        "saint.integrations.vllm.gemma3:SaintGemma3ForConditionalGeneration"
    ),
    "Gemma4ForConditionalGeneration": (
        "saint.integrations.vllm.gemma4:SaintGemma4ForConditionalGeneration"
    ),
    "Glm4vForConditionalGeneration": (
        "saint.integrations.vllm.glm4v:SaintGlm4vForConditionalGeneration"
    ),
    "Glm4vMoeForConditionalGeneration": (
        "saint.integrations.vllm.glm4v:SaintGlm4vMoeForConditionalGeneration"
    ),
    "GlmOcrForConditionalGeneration": (
        "saint.integrations.vllm.glm4v:SaintGlmOcrForConditionalGeneration"
    ),
    "PaddleOCRVLForConditionalGeneration": (
        "saint.integrations.vllm.paddleocr_vl:SaintPaddleOCRVLForConditionalGeneration"
    ),
    "Qwen2_5OmniForConditionalGeneration": (
        "saint.integrations.vllm.qwen_omni:SaintQwen2_5OmniThinkerForConditionalGeneration"
    ),
    "Qwen2_5OmniModel": (
        "saint.integrations.vllm.qwen_omni:SaintQwen2_5OmniThinkerForConditionalGeneration"
    ),
    "Qwen3OmniMoeForConditionalGeneration": (
        "saint.integrations.vllm.qwen_omni:SaintQwen3OmniMoeThinkerForConditionalGeneration"
    ),
    "PaliGemmaForConditionalGeneration": (
        "saint.integrations.vllm.paligemma:SaintPaliGemmaForConditionalGeneration"
    ),
}


def register() -> None:
    """Entry point ``saint``: the torchvision shim, the model-config check, the runner flag fix
    and the overrides."""
    from vllm import ModelRegistry

    from .compat import (
        install_torchvision_shim,
        patch_model_config_check,
        patch_runner_pruning_flag,
    )

    install_torchvision_shim()
    patch_model_config_check(ARCHITECTURES)
    patch_runner_pruning_flag()
    for arch, target in ARCHITECTURES.items():
        ModelRegistry.register_model(arch, target)


def last_kept_indices(model: Any) -> list[list[int]]:
    """Per image of the model's last image batch, the kept token indices (of the merged
    grid, row-major); for ``LLM.apply_model`` (needs ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``)."""
    return [k.nonzero().flatten().tolist() for k in getattr(model, "saint_last_keep", [])]
