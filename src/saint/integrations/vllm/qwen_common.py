"""What the Qwen2.5-VL and Qwen3-VL overrides share: each image's placeholder run cut to
SAINT's budget in the prompt, the prompt's M-RoPE positions with those shorter runs, and
the positions a kept token carries into vLLM's ``recompute_mrope_positions``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from vllm.multimodal.inputs import MultiModalFeatureSpec
from vllm.multimodal.processing import PromptReplacement, PromptUpdate
from vllm.multimodal.video_prune.evs import compute_mrope_for_media
from vllm.utils.gpu_sync_debug import gpu_sync_allowed

from .settings import SaintVllmSettings, settings_from_config


def media_positions(grid_thw: Sequence[int], merge_size: int, **time: float) -> torch.Tensor:
    """``[N, 4]`` per merged token: its (t, h, w) M-RoPE offsets in the full grid, and the
    position step from the media's start to the text after it (largest offset + 1, as in
    the unpruned prompt; vLLM's EVS helper puts the grid width there instead)."""
    pos = compute_mrope_for_media(list(grid_thw), merge_size, **time)
    pos[:, 3] = pos[:, :3].max() + 1
    return pos


Positions = Callable[[list[int], list[MultiModalFeatureSpec]], tuple[torch.Tensor, int]]


def positions_with_pruned_images(
    full_positions: Positions, input_tokens: Sequence[int], mm_features: Sequence[MultiModalFeatureSpec],
    merge_size: int,
) -> tuple[torch.Tensor, int]:
    """The prompt's ``[3, L]`` M-RoPE positions and decoding offset when each image's run
    of placeholders is cut to its kept count: vLLM's ``full_positions`` (which reads every
    image run as its full grid) on the prompt with each run grown back to the full grid,
    the added placeholders' columns then dropped. So the text after an image keeps its
    unpruned positions (the convention of :func:`media_positions`) and the image's own
    tokens hold grid positions until ``recompute_mrope_positions`` writes the kept ones.

    vLLM computes these positions once per request, from the prompt alone; the runner
    then rewrites them only in the steps that compute an image's embeddings. A request
    whose image comes from the prefix cache keeps them as they are, and a second image
    in a prompt would start before the first one ends (a negative text length)."""
    tokens: list[int] = []
    kept: list[bool] = []
    features = []
    start = 0
    for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
        place = feature.mm_position
        tokens += input_tokens[start : place.offset + place.length]
        kept += [True] * (place.offset + place.length - start)
        start = place.offset + place.length
        length = place.length
        if feature.modality == "image":
            full = int(feature.data["image_grid_thw"].data.prod()) // merge_size**2
            tokens += [input_tokens[place.offset]] * (full - place.length)
            kept += [False] * (full - place.length)
            length = full
        offset = len(tokens) - length
        features.append(dataclasses.replace(
            feature, mm_position=dataclasses.replace(place, offset=offset, length=length)))
    tokens += input_tokens[start:]
    kept += [True] * (len(input_tokens) - start)
    positions, _ = full_positions(tokens, features)
    positions = positions[:, torch.tensor(kept, dtype=torch.bool)]
    return positions, int(positions.max()) + 1 - len(input_tokens)


def recompute_media_positions(
    input_ids: Sequence[int] | torch.Tensor,
    media_rows: Sequence[torch.Tensor],
    mrope_positions: torch.Tensor,
    num_computed_tokens: int,
    media_token_ids: Sequence[int],
) -> tuple[torch.Tensor, int]:
    """The prompt's ``[3, N]`` M-RoPE positions with the media rows of this step written in:
    ``media_rows`` are ``[4, n]`` (t, h, w offsets, step to the text after) for the media the
    runner gathered, in prompt order, the first possibly continuing a run that an earlier
    chunk began. Each lands in its run of placeholder tokens (the one holding position
    ``num_computed_tokens``, then the following runs) at the token before the run's position
    + 1 + its offsets, and the tokens after it become text counting on from its step (as
    vLLM's EVS helper does). Returns the positions and the decoding offset.

    vLLM's own helper (``video_prune.evs.recompute_mrope_positions``) steps from one media to
    the next by the media's length only, not the text between them: with more prompt text
    before the first image than that image has tokens (a system prompt), or a prompt
    resumed from the prefix cache, it wrote a prompt's second image over the first one's
    slots, and the decoding changed (``tests_vllm/test_prompts.py``)."""
    positions = mrope_positions.clone()
    ids = torch.as_tensor(input_ids, dtype=torch.long, device="cpu")
    media = torch.isin(ids, torch.tensor(list(media_token_ids), dtype=torch.long))
    n = len(ids)
    edges = torch.diff(media.long(), prepend=torch.zeros(1, dtype=torch.long), append=torch.zeros(1, dtype=torch.long))
    run_starts, run_ends = (edges == 1).nonzero().flatten(), (edges == -1).nonzero().flatten()
    cursor = num_computed_tokens
    for rows in media_rows:
        r = int(torch.searchsorted(run_ends, cursor, right=True))  # the first run ending after the cursor
        run_start = int(run_starts[r])
        start = max(run_start, cursor)
        end = start + rows.shape[1]
        if end > int(run_ends[r]):
            raise ValueError(f"{rows.shape[1]} media rows from position {start} overrun their placeholder run "
                             f"[{run_start}, {int(run_ends[r])})")
        rows = rows.to(positions.device, torch.long)
        base = int(positions[0, run_start - 1]) + 1 if run_start > 0 else 0
        positions[:, start:end] = rows[:3] + base
        text = torch.cumsum((~media[end:]).long(), dim=0).to(positions.device)
        positions[:, end:n] = text + base + rows[3, 0] - 1
        cursor = end
    return positions, int(positions.max()) + 1 - n


def budget_image_updates(
    updates: Sequence[PromptUpdate],
    settings: SaintVllmSettings,
    merge_size: int,
    out_mm_kwargs: Mapping[str, Any],
) -> list[PromptUpdate]:
    """The processor's prompt updates with each image's run of placeholder tokens cut from
    its ``N`` merged tokens to ``settings.kept_tokens(N)``; video updates unchanged."""

    def image_replacement(item_idx: int, token: int) -> list[int]:
        grid = out_mm_kwargs["image"][item_idx]["image_grid_thw"].data
        return [token] * settings.kept_tokens(int(grid.prod()) // merge_size**2)

    out = []
    for update in updates:
        if update.modality == "image":
            (token,) = update.target
            update = PromptReplacement(
                modality="image",
                target=update.target,
                replacement=lambda i, t=token: image_replacement(i, t),
            )
        out.append(update)
    return out


class SaintBudgetPromptMixin:
    """For a Qwen-VL multimodal processor: each image gets as many placeholder tokens as
    SAINT will keep (``self.info.saint`` holds the settings, None when pruning is off)."""

    def _get_prompt_updates(
        self, mm_items: Any, hf_processor_mm_kwargs: Mapping[str, Any], out_mm_kwargs: Any
    ) -> Sequence[PromptUpdate]:
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)  # type: ignore[misc]
        if self.info.saint is None:  # type: ignore[attr-defined]
            return updates
        merge = self.info.get_image_processor(**hf_processor_mm_kwargs).merge_size  # type: ignore[attr-defined]
        return budget_image_updates(updates, self.info.saint, merge, out_mm_kwargs)  # type: ignore[attr-defined]

    def apply(self, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        """vLLM's processing of a request whose media runs do not touch (pruning on), refused
        before it touches vLLM's media cache: here, in the front end, an error fails that
        request only."""
        if self.info.saint is not None:  # type: ignore[attr-defined]
            refuse_touching_media(inputs.prompt, media_token_ids(self.info.get_hf_config()),  # type: ignore[attr-defined]
                                  sum(items.get_count() for items in inputs.mm_data_items.values()))
        return super().apply(inputs, *args, **kwargs)  # type: ignore[misc]


def media_token_ids(config: Any) -> set[int]:
    """A Qwen-family config's image, video and audio placeholder tokens."""
    names = ("image_token_id", "video_token_id", "audio_token_id", "audio_token_index")
    return {i for i in (getattr(config, name, None) for name in names) if isinstance(i, int)}


def refuse_touching_media(prompt: Sequence[int], media_ids: set[int], items: int) -> None:
    """Refuse a prompt in which two media items' placeholders touch (two ``<|image_pad|>``
    inside one ``<|vision_start|>...<|vision_end|>``): fewer runs of media tokens than
    items. The runner's position rewrite (:func:`recompute_media_positions`) finds the items
    by their runs, and would give both one start: wrong positions, a different answer."""
    runs = sum(1 for i, t in enumerate(prompt) if t in media_ids and (i == 0 or prompt[i - 1] not in media_ids))
    if runs < items:
        raise ValueError(
            f"saint_keep_ratio: {items} media items but {runs} runs of media placeholders in the prompt: two items "
            "touch. SAINT needs text between them (Qwen's chat template puts <|vision_start|> and <|vision_end|> "
            "around each); write one media placeholder per vision_start/vision_end pair")


class SaintImagePruningMixin:
    """For vLLM's Qwen-VL model classes: read the SAINT settings, refuse the V2 runner, and
    prune each image's merged tokens after the tower, appending their position channels.
    Subclasses say which columns SAINT scores (``saint_features``) and which position
    channels the kept rows carry (``saint_positions``)."""

    def saint_setup(self, vllm_config: Any) -> None:
        """Call at the end of ``__init__``."""
        # the top-level config, where --hf-overrides writes (an Omni thinker's own config is a part of it)
        self.saint = settings_from_config(vllm_config.model_config.hf_config)
        self.saint_prunes_images = self.saint is not None
        self.saint_last_keep: list[torch.Tensor] = []  # keep masks of the last image batch
        if self.saint is None:
            return
        if vllm_config.use_v2_model_runner:
            raise ValueError("SAINT image pruning supports vLLM's V1 model runner only; set VLLM_USE_V2_MODEL_RUNNER=0")
        # Rows carry position channels; this also keeps the tower out of encoder CUDA graphs,
        # which would skip the pruning step.
        self.is_multimodal_pruning_enabled = True

    def saint_media_token_ids(self) -> tuple[int, ...]:
        """The placeholder tokens whose embeddings reach ``recompute_mrope_positions`` (each
        carrying its position channels): images, videos, and audio where the model takes it."""
        return tuple(sorted(media_token_ids(self.config)))  # type: ignore[attr-defined]

    def saint_features(self, emb: torch.Tensor) -> torch.Tensor:
        return emb

    def get_mrope_input_positions(
        self, input_tokens: list[int], mm_features: list[MultiModalFeatureSpec]
    ) -> tuple[torch.Tensor, int]:
        """vLLM's prompt positions, with each image's placeholder run as SAINT cut it."""
        full = super().get_mrope_input_positions  # type: ignore[misc]
        if self.saint is None:
            return full(input_tokens, mm_features)
        merge = self.config.vision_config.spatial_merge_size  # type: ignore[attr-defined]
        return positions_with_pruned_images(full, input_tokens, mm_features, merge)

    def saint_positions(self, grid_thw: Sequence[int], merge_size: int) -> torch.Tensor:
        return media_positions(grid_thw, merge_size)

    saint_channels = 4  # position channels each media row carries (Qwen3-VL: 5, the last a video flag)

    def recompute_mrope_positions(
        self,
        input_ids: list[int] | torch.Tensor,
        multimodal_embeddings: Sequence[torch.Tensor],
        mrope_positions: torch.Tensor,
        num_computed_tokens: int,
    ) -> tuple[Sequence[torch.Tensor], torch.Tensor, int]:
        """The runner's rewrite of a request's positions once media embeddings are gathered:
        with SAINT on, :func:`recompute_media_positions` (vLLM's helper misplaces every media
        after the first behind a long text); without it, the base model's own (EVS)."""
        if self.saint is None:
            return super().recompute_mrope_positions(  # type: ignore[misc]
                input_ids=input_ids, multimodal_embeddings=multimodal_embeddings,
                mrope_positions=mrope_positions, num_computed_tokens=num_computed_tokens)
        c = self.saint_channels
        with gpu_sync_allowed():  # the rows' positions come to the host, as in vLLM's helper
            positions, delta = recompute_media_positions(
                input_ids, [mm[:, -c:][:, :4].T for mm in multimodal_embeddings], mrope_positions,
                num_computed_tokens, self.saint_media_token_ids())
        return [mm[:, :-c] for mm in multimodal_embeddings], positions, delta

    def _postprocess_image_embeds_evs(
        self, image_embeds_split: tuple[torch.Tensor, ...], image_input: Any
    ) -> tuple[torch.Tensor, ...]:
        if self.saint is None:
            return super()._postprocess_image_embeds_evs(image_embeds_split, image_input)  # type: ignore[misc]
        merge = self.config.vision_config.spatial_merge_size  # type: ignore[attr-defined]
        out, masks = [], []
        for emb, grid in zip(image_embeds_split, image_input["image_grid_thw"].tolist(), strict=True):
            keep = self.saint.keep_mask(self.saint_features(emb))
            pos = self.saint_positions(grid, merge).to(emb.device)
            out.append(torch.cat([emb[keep], pos[keep].to(emb.dtype)], dim=1))
            masks.append(keep)
        self.saint_last_keep = masks
        return tuple(out)


class SaintAddedPruningMixin(SaintImagePruningMixin):
    """For a vLLM model with no multimodal-pruning path of its own (Qwen2-VL, GLM-4.1V), which
    its SAINT class adds by declaring ``SupportsMultiModalPruning``: SAINT's cut in
    ``_process_image_input``, and ``--video-pruning-rate`` refused (the model has no EVS for
    videos, which would then reach the runner without positions). ``saint_family`` names the
    model in the refusal."""

    saint_family = ""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)  # type: ignore[call-arg]
        mm_config = vllm_config.model_config.multimodal_config
        if mm_config is not None and mm_config.is_multimodal_pruning_enabled():
            raise ValueError(f"--video-pruning-rate: vLLM's {self.saint_family} has no video pruning (EVS); "
                             "serve it without")
        self.saint_setup(vllm_config)

    def _process_image_input(self, image_input: Any) -> tuple[torch.Tensor, ...]:
        embeds = super()._process_image_input(image_input)  # type: ignore[misc]
        if self.saint is None:
            return embeds
        return self._postprocess_image_embeds_evs(embeds, image_input)
