"""Mistral 3 (Mistral-Small-3.1 / 3.2: a Pixtral tower, a 2x2 patch merger) for vLLM with
SAINT image-token pruning after the projector.

Registered over ``Mistral3ForConditionalGeneration`` by the ``saint`` plugin; without
``saint_keep_ratio`` it is vLLM's class unchanged. An image's prompt is its grid of merged
tokens row by row, each row of ``W`` ``[IMG]`` tokens ended by ``[IMG_BREAK]`` (the last by
``[IMG_END]``). vLLM fixes that layout before the tower runs, so with pruning on every row
keeps ``kept_tokens(W)`` of its tokens, chosen in the row by the fixed-budget drop, and
every break and end token stays (the language model still sees where the rows end). The
processor's replacement and token count follow the same rule. Positions are 1-D, as for
LLaVA-1.5. Precomputed image embeddings are refused while pruning is on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .compat import install_torchvision_shim

install_torchvision_shim()

from vllm.model_executor.models.mistral3 import (  # noqa: E402
    Mistral3DummyInputsBuilder,
    Mistral3ForConditionalGeneration,
    Mistral3MultiModalProcessor,
    Mistral3ProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY  # noqa: E402
from vllm.multimodal.processing import PromptReplacement, PromptUpdate, PromptUpdateDetails  # noqa: E402

from .settings import SaintVllmSettings, settings_from_config  # noqa: E402
from .tiles import SaintTilePruningMixin, tile_keep_mask  # noqa: E402


def kept_rows(tokens: Sequence[int], image_token: int, settings: SaintVllmSettings) -> list[int]:
    """An image's placeholder tokens with every row's run of ``image_token`` cut to
    ``settings.kept_tokens`` of its length; the row ends stay."""
    out: list[int] = []
    run = 0
    for token in [*tokens, None]:
        if token == image_token:
            run += 1
            continue
        out += [image_token] * (settings.kept_tokens(run) if run else 0)
        run = 0
        if token is not None:
            out.append(token)
    return out


class SaintMistral3ProcessingInfo(Mistral3ProcessingInfo):
    """Mistral 3's processing info with each image's token count cut row by row."""

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.saint = settings_from_config(self.get_hf_config())

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        n = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        if self.saint is None:
            return n
        columns, rows = self.get_vision_encoder_info().get_patch_grid_size(
            image_width=image_width, image_height=image_height)
        return rows * self.saint.kept_tokens(columns)


class SaintMistral3MultiModalProcessor(Mistral3MultiModalProcessor):
    """Gives every row of an image as many ``[IMG]`` tokens as SAINT will keep of it."""

    def _get_prompt_updates(
        self, mm_items: Any, hf_processor_mm_kwargs: Mapping[str, Any], out_mm_kwargs: Any
    ) -> Sequence[PromptUpdate]:
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        saint = self.info.saint
        if saint is None:
            return updates
        token = self.info.get_hf_config().image_token_index

        def replacement(item_idx: int, full: Any) -> PromptUpdateDetails:
            return PromptUpdateDetails.select_token_id(kept_rows(full(item_idx).full, token, saint), token)

        return [PromptReplacement(modality=u.modality, target=u.target,
                                  replacement=lambda i, full=u.replacement: replacement(i, full))
                for u in updates]


@MULTIMODAL_REGISTRY.register_processor(
    SaintMistral3MultiModalProcessor, info=SaintMistral3ProcessingInfo, dummy_inputs=Mistral3DummyInputsBuilder
)
class SaintMistral3ForConditionalGeneration(SaintTilePruningMixin, Mistral3ForConditionalGeneration):
    """vLLM's Mistral 3; with ``saint_keep_ratio`` set, image tokens are pruned by SAINT."""

    def _process_image_input(self, image_input: Any) -> Any:
        self.saint_refuse_embeddings(image_input)
        embeds = super()._process_image_input(image_input)
        if self.saint is None:
            return embeds
        merge = self.config.spatial_merge_size
        patch = self.config.vision_config.patch_size
        columns = [(img.shape[-1] - 1) // (patch * merge) + 1 for img in image_input["pixel_values"]]  # as vLLM counts
        return self.saint_keep(embeds, [tile_keep_mask(e, c, self.saint) for e, c in zip(embeds, columns, strict=True)])
