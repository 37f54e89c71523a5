"""lmms-eval's ``saint_qwen_vl`` model on tiny random Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3.5 checkpoints
saved to disk with an offline processor (ChatML tokenizer trained here, Qwen2-VL image processor): request
batching, pruning of both request kinds, videos (a synthetic clip written with PyAV, and frame
arrays), and lmms-eval's own command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from .lmms_helpers import (
    assert_alone_equals_batched,
    build_glm4v,
    build_llava,
    build_omni,
    built_once,
    continuation_loss,
    easy_vqa_docs,
    gen_requests,
    ll_requests,
    make_lm,
    need,
    qwen_tiny_configs,
    requests,
    run_cli,
    run_tasks,
    train_tokenizer,
)

PRUNE_ARGS = "mode=hybrid,vit_ratio=0.5,vit_layer=1,llm_layers=0-3,llm_tau=0.3,llm_k=2"
N_IMAGE_TOKENS = 16  # easy-VQA's 64 px images resized to 32 px: 8x8 patches of 4 px, merged 2x2
SPECIAL = ["<pad>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>"]


def _build_qwen(path: Path, family: str = "qwen2_5_vl") -> None:
    if family in ("glm4v", "glm_ocr"):  # served by saint_glm4v, the same requests
        build_glm4v(path, family)
        return
    if family in ("qwen2_5_omni", "qwen3_omni_moe"):  # served by saint_qwen_omni, the same requests
        build_omni(path, family)
        return
    transformers = pytest.importorskip("transformers")
    tok = train_tokenizer(SPECIAL, ["user assistant system"])
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )
    pixels = dict(min_pixels=32 * 32, max_pixels=32 * 32)
    image_processor = transformers.Qwen2VLImageProcessor(patch_size=4, merge_size=2, temporal_patch_size=2,
                                                         size={"shortest_edge": 32 * 32, "longest_edge": 32 * 32},
                                                         **pixels)
    video_cls, processor_cls = {
        "qwen2_vl": (transformers.Qwen2VLVideoProcessor, transformers.Qwen2VLProcessor),
        "qwen2_5_vl": (transformers.Qwen2VLVideoProcessor, transformers.Qwen2_5_VLProcessor),
        "qwen3_vl": (transformers.Qwen3VLVideoProcessor, transformers.Qwen3VLProcessor),
        "qwen3_vl_moe": (transformers.Qwen3VLVideoProcessor, transformers.Qwen3VLProcessor),
        "qwen3_5": (transformers.Qwen3VLVideoProcessor, transformers.Qwen3VLProcessor)}[family]
    # Qwen3-VL's video processor bounds the pixels of all frames together: room for 4 frames of 32 x 32
    frames = 4 if family.startswith(("qwen3_vl", "qwen3_5")) else 1
    video_processor = video_cls(patch_size=4, merge_size=2, temporal_patch_size=2, cap_pixels_per_frame=False,
                                size={"shortest_edge": 32 * 32, "longest_edge": frames * 32 * 32})
    processor = processor_cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor)
    processor.save_pretrained(path)
    ids = {name: tokenizer.convert_tokens_to_ids(t) for name, t in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    vision, text = qwen_tiny_configs(tokenizer)
    torch.manual_seed(0)
    if family == "qwen2_vl":  # vision width embed_dim, the LLM's width hidden_size
        vision = dict(vision, embed_dim=vision.pop("hidden_size"), hidden_size=vision.pop("out_hidden_size"),
                      mlp_ratio=2)
        del vision["intermediate_size"]
        config = transformers.Qwen2VLConfig(vision_config=vision, text_config=text, **ids)
        transformers.Qwen2VLForConditionalGeneration(config).save_pretrained(path)
    elif family == "qwen2_5_vl":
        vision.update(window_size=16, fullatt_block_indexes=[1, 3])
        config = transformers.Qwen2_5_VLConfig(vision_config=vision, text_config=text, **ids)
        transformers.Qwen2_5_VLForConditionalGeneration(config).save_pretrained(path)
    elif family == "qwen3_5":  # Qwen3-VL's tower without deepstack; a hybrid (Gated DeltaNet) LM
        vision.update(num_position_embeddings=64)
        text.update(head_dim=16, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                    linear_num_value_heads=4, layer_types=["linear_attention", "full_attention"] * 3)
        text["rope_parameters"].update(mrope_section=[1, 1, 0], mrope_interleaved=True, partial_rotary_factor=0.25)
        config = transformers.Qwen3_5Config(vision_config=vision, text_config=text, **ids)
        transformers.Qwen3_5ForConditionalGeneration(config).save_pretrained(path)
    else:
        vision.update(num_position_embeddings=64, deepstack_visual_indexes=[0, 1])
        text.update(head_dim=16)
        text["rope_parameters"]["mrope_interleaved"] = True
        name = "Qwen3VL"
        if family == "qwen3_vl_moe":
            name = "Qwen3VLMoe"
            text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
        config = getattr(transformers, f"{name}Config")(vision_config=vision, text_config=text, **ids)
        getattr(transformers, f"{name}ForConditionalGeneration")(config).save_pretrained(path)


@pytest.fixture(scope="module")
def qwen_checkpoint(tmp_path_factory, one_thread):
    """``qwen_checkpoint(family)``: the folder of a tiny checkpoint of that family, built once."""
    return built_once(tmp_path_factory, _build_qwen)


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v",
                                                   "glm_ocr", "qwen2_5_omni", "qwen3_omni_moe"])
def qwen_dir(request, qwen_checkpoint) -> Path:
    return qwen_checkpoint(request.param)


def model_class(model_dir: Path) -> str:
    """saint's lmms-eval class of the checkpoint: ``saint_glm4v`` for GLM-4.1V and GLM-OCR,
    ``saint_qwen_omni`` for the Omni thinkers, else ``saint_qwen_vl``."""
    model_type = json.loads((model_dir / "config.json").read_text())["model_type"]
    if model_type.endswith("_thinker"):
        return "SaintQwenOmni"
    return "SaintGlm4v" if model_type in ("glm4v", "glm_ocr") else "SaintQwenVL"


@pytest.fixture(scope="module")
def lm(qwen_dir):
    return make_lm(model_class(qwen_dir), qwen_dir, PRUNE_ARGS, easy_vqa_docs(5))


def test_entry_points_resolve_saint_qwen_vl_and_saint_glm4v():
    need("lmms_eval")
    import lmms_eval.models

    from saint.integrations.lmms_eval import SaintQwenVL
    from saint.integrations.lmms_glm import SaintGlm4v

    assert lmms_eval.models.get_model("saint_qwen_vl") is SaintQwenVL
    assert lmms_eval.models.get_model("saint_glm4v") is SaintGlm4v


def test_both_request_kinds_are_pruned_and_batches_equal_single_requests(lm):
    import saint

    docs = lm.task_dict["t"]["test"]
    family = lm.model.__dict__["_saint_patch"].family
    assert saint.is_patched(lm.model) and lm.model.config.model_type in (family, f"{family}_thinker")
    lm.pruning_log.clear()
    gen, ll = gen_requests(docs), ll_requests(docs)
    batched = (lm.generate_until(gen), lm.loglikelihood(ll))
    assert {e["request"] for e in lm.pruning_log} == {"generate_until", "loglikelihood"}
    for e in lm.pruning_log:
        assert e["image_tokens"] == [N_IMAGE_TOKENS] * len(e["image_tokens"])
        assert e["llm_input"] == [N_IMAGE_TOKENS // 2] * len(e["image_tokens"])  # vit_ratio 0.5 in the tower
        assert all(o < N_IMAGE_TOKENS // 2 for o in e["llm_output"])  # and SAINT inside the language model
    assert_alone_equals_batched(lm, gen, ll, batched)


def test_a_tasks_llava_image_marker_is_dropped(lm):
    """Many lmms-eval tasks write LLaVA's ``<image>`` in their text; it is dropped (as
    lmms-eval's own qwen2_5_vl does), not shown to Qwen beside its own image tokens."""
    prompt = lm._placeholders("<image>\nWhat color is it?", ["an image"])
    assert "<image>" not in prompt and prompt.endswith("\nWhat color is it?")
    assert lm._placeholders("<image>\nNo image here.", []) == "\nNo image here."


def test_loglikelihood_is_the_patched_models_loss(lm):
    docs = lm.task_dict["t"]["test"]
    req = ll_requests(docs[:1])[0]
    (result,) = lm.loglikelihood([req])
    ids, n, media = lm._loglikelihood_row(req)
    # the Omni thinkers' forward takes no logits_to_keep: the scoring cuts their logits to the tail;
    # without a mask they fall back to 1-D positions (transformers' own behaviour), so give one
    assert result[0] == pytest.approx(continuation_loss(lm, ids, n, media, mask=True), abs=1e-5)


def test_bad_settings_and_checkpoints_refused(tmp_path):
    need("lmms_eval")
    from saint.integrations.lmms_eval import SaintQwenVL

    with pytest.raises(TypeError, match="vit_keep"):
        SaintQwenVL(pretrained=str(tmp_path / "none"), mode="vit", vit_keep=10)
    build_llava(tmp_path)
    with pytest.raises(ValueError, match="model_type 'qwen2_vl', 'qwen2_5_vl', 'qwen3_vl', 'qwen3_vl_moe', 'qwen3_5' or"):
        SaintQwenVL(pretrained=str(tmp_path))


def test_lmms_eval_cli_end_to_end(qwen_checkpoint, tmp_path):
    """``python -m lmms_eval --model saint_qwen_vl ...`` completes and prunes both kinds of
    request (run once, on Qwen2.5-VL: the class is the same for Qwen3-VL)."""
    need("lmms_eval")
    results, (stats,) = run_cli("saint_qwen_vl", qwen_checkpoint("qwen2_5_vl"), PRUNE_ARGS, tmp_path, 3, timeout=300)
    assert 0.0 <= results["saint_easyvqa_gen"]["exact_match,none"] <= 1.0
    assert 0.0 <= results["saint_easyvqa_mc"]["acc,none"] <= 1.0
    summary = json.loads(stats.read_text().splitlines()[-1])["summary"]
    for kind in ("generate_until", "loglikelihood"):
        s = summary[kind]
        assert s["image_tokens"] == N_IMAGE_TOKENS and s["llm_input"] == N_IMAGE_TOKENS // 2
        assert s["llm_output"] < N_IMAGE_TOKENS // 2


# ---------------------------------------------------------------------------- video
FPS, N_FRAMES = 5, 10  # the synthetic clip: 2 s at 5 fps, 32 x 32 px
VIDEO_ARGS = PRUNE_ARGS + ",max_num_frames=4"
N_VIDEO_TOKENS = 2 * N_IMAGE_TOKENS  # 4 of its 10 frames: 2 frame groups of 8 x 8 patches merged 2 x 2


def write_clip(path: Path, shift: int = 0) -> str:
    """A 10-frame mp4 (mpeg4): frame i has red level 25 i and a white square moving right."""
    av = need("av")
    import numpy as np

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(N_FRAMES):
            frame = np.zeros((32, 32, 3), np.uint8)
            frame[..., 0] = 25 * i
            frame[4:16, shift + i:shift + i + 12] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def media_visual(doc: dict) -> list:
    from PIL import Image

    return [doc["video"]] if "video" in doc else [Image.open(doc["image"])]


@pytest.fixture(scope="module")
def video_docs(tmp_path_factory) -> list[dict]:
    """Two video documents (file paths, lmms-eval's convention) between two image ones."""
    root = tmp_path_factory.mktemp("clips")
    images = easy_vqa_docs(2)
    return [images[0], {"question": "What moves in the video?", "answer": "square",
                        "video": write_clip(root / "a.mp4")},
            {"question": "Which color?", "answer": "red", "video": write_clip(root / "b.mp4", shift=8)}, images[1]]


@pytest.fixture(scope="module")
def video_lm(qwen_dir, video_docs):
    lm = make_lm(model_class(qwen_dir), qwen_dir, VIDEO_ARGS, video_docs)
    if hasattr(lm.processor, "vision_bos_token"):  # the Omni processors size videos for 28 px patches by default
        lm.processor.videos_kwargs = {"size": {"shortest_edge": 32 * 32, "longest_edge": 32 * 32}}
    return lm


def video_requests(docs: list[dict]) -> tuple[list, list]:
    kw = {"max_new_tokens": 4, "temperature": 0}
    gen = requests("generate_until", [(d["question"], dict(kw), media_visual, j, "t", "test")
                                      for j, d in enumerate(docs)])
    ll = requests("loglikelihood", [(d["question"], f" {d['answer']}", media_visual, j, "t", "test")
                                    for j, d in enumerate(docs)])
    return gen, ll


def test_video_frames_are_sampled_as_lmms_eval_does(tmp_path):
    """File: max_num_frames spread evenly, first and last included (or fps per second of
    video), decoded with their colours; arrays: taken as sampled at 2 fps, thinned alike."""
    import numpy as np

    from saint.integrations.lmms_video import array_video, frame_indices, read_video, to_video

    assert frame_indices(10, 4) == [0, 3, 6, 9] and frame_indices(10, 32) == list(range(10))
    assert frame_indices(10, 32, fps=1, source_fps=5) == [0, 9] and frame_indices(1, 32) == [0, 0]
    v = read_video(write_clip(tmp_path / "c.mp4"), 4)
    assert v.frames.shape == (4, 32, 32, 3) and v.frames.dtype == np.uint8
    assert (v.fps, v.total_num_frames, v.frames_indices) == (5.0, 10, [0, 3, 6, 9])
    red = v.frames[:, 20:, :, 0].mean(axis=(1, 2))  # below the square: red level 25 i, up to compression
    assert np.abs(red - [0, 75, 150, 225]).max() < 12
    a = array_video(np.zeros((6, 8, 8, 3), np.uint8), 4)
    assert (a.frames.shape[0], a.fps, a.total_num_frames, a.frames_indices) == (4, 2.0, 6, [0, 2, 3, 5])
    assert to_video("photo.png", 4) is None and to_video(np.zeros((2, 8, 8), np.uint8), 4) is None
    with pytest.raises(ValueError, match="uint8"):
        array_video(np.zeros((2, 8, 8, 3), np.float32), 4)


def test_video_requests_are_pruned_per_frame_group_and_batches_equal_single_requests(video_lm, video_docs):
    """Videos and images mixed in one batch: every video frame group keeps half its tokens
    in the tower (vit_ratio 0.5 per sample), SAINT drops more in the language model, and
    each request alone gets what it got in its batch."""
    video_lm.pruning_log.clear()
    gen, ll = video_requests(video_docs)
    batched = (video_lm.generate_until(gen), video_lm.loglikelihood(ll))
    assert {e["request"] for e in video_lm.pruning_log} == {"generate_until", "loglikelihood"}
    rows = 0
    for e in video_lm.pruning_log:
        for image, video, into, out in zip(e["image_tokens"], e["video_tokens"], e["llm_input"], e["llm_output"],
                                           strict=True):
            assert (image, video) in ((N_IMAGE_TOKENS, 0), (0, N_VIDEO_TOKENS))
            assert into == (image + video) // 2 and out < into
            rows += video > 0
    assert rows == 4  # both videos, in both request kinds
    summary = video_lm.pruning_summary()["generate_until"]
    assert summary["video_tokens"] == N_VIDEO_TOKENS / 2  # mean over the rows: two of the four are videos
    assert_alone_equals_batched(video_lm, gen, ll, batched)


def test_video_loglikelihood_is_the_patched_models_loss(video_lm, video_docs):
    """The score of a video request is the patched model's loss on the same video inputs
    (Qwen2.5-VL: with the clip's seconds per temporal patch, 2 frames at 2 sampled fps)."""
    req = video_requests(video_docs)[1][1]  # the first video document
    (result,) = video_lm.loglikelihood([req])
    ids, n, media = video_lm._loglikelihood_row(req)
    assert tuple(media["video_grid_thw"][0].tolist()) == (2, 8, 8) and "pixel_values" not in media
    if video_lm.model.config.model_type == "qwen2_5_vl":
        assert media["second_per_grid_ts"].tolist() == [1.0]
    if video_lm.model.config.model_type.endswith("_thinker"):  # the Omni thinkers' M-RoPE reads it too
        assert media["video_second_per_grid"].tolist() == [1.0]
    assert result[0] == pytest.approx(continuation_loss(video_lm, ids, n, media, mask=True), abs=1e-5)


def test_video_frame_arrays_are_served_like_files(video_lm, video_docs):
    """A task may give decoded frames (T x H x W x 3 uint8): the processor receives the
    same pixels as for the file they came from, and the request is pruned alike."""
    from saint.integrations.lmms_video import read_video

    path = video_docs[1]["video"]
    frames = read_video(path, 4).frames
    videos = [video_lm._visual(v, "t") for v in (path, frames)]
    from_file, from_array = (video_lm._encode([video_lm._prompt("x", [v])], [v]) for v in videos)
    assert torch.equal(from_file["pixel_values_videos"], from_array["pixel_values_videos"])
    docs = [dict(video_docs[1], video=frames)]
    video_lm.task_dict = {"t": {"test": docs}}
    video_lm.pruning_log.clear()
    try:
        (text,) = video_lm.generate_until(video_requests(docs)[0])
    finally:
        video_lm.task_dict = {"t": {"test": video_docs}}
    (e,) = video_lm.pruning_log
    assert isinstance(text, str) and e["video_tokens"] == [N_VIDEO_TOKENS] and e["llm_input"] == [N_VIDEO_TOKENS // 2]


def test_bad_video_settings_and_visuals_refused(video_lm):
    need("lmms_eval")
    from saint.integrations.lmms_eval import SaintQwenVL

    with pytest.raises(ValueError, match="max_num_frames"):
        SaintQwenVL(pretrained="none", max_num_frames=1)
    with pytest.raises(ValueError, match="fps"):
        SaintQwenVL(pretrained="none", fps=0)
    for bad in (dict(fps=float("inf")), dict(fps="abc"), dict(max_num_frames="abc")):  # named, before any video
        with pytest.raises(ValueError, match="must be"):
            SaintQwenVL(pretrained="none", **bad)
    if not video_lm.model.config.model_type.endswith("_thinker"):  # the Omni thinkers serve audio
        with pytest.raises(ValueError, match="audio is not supported"):
            video_lm._images([{"array": [0.0], "sampling_rate": 16000}], "t/0")
    with pytest.raises(ValueError, match="videos are file paths ending in .mp4"):
        video_lm._images(["photo.png"], "t/0")


def test_lmms_eval_cli_serves_a_video_task(qwen_checkpoint, tmp_path):
    """``python -m lmms_eval --model saint_qwen_vl`` on a video task whose ``doc_to_visual``
    returns file paths (lmms-eval's convention): it completes and every video is pruned
    (run on Qwen3-VL, whose processor adds per-frame timestamps)."""
    need("lmms_eval")
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    docs = [{"question": q, "answer": a, "video": write_clip(tmp_path / f"{i}.mp4", shift=4 * i)}
            for i, (q, a) in enumerate([("What moves?", "square"), ("Which color?", "red")])]
    (task_dir / "clips.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (task_dir / "clip_utils.py").write_text(
        "def doc_to_visual(doc):\n    return [doc['video']]\n\n\n"
        "def doc_to_text(doc, lmms_eval_specific_kwargs=None):\n    return doc['question']\n")
    (task_dir / "saint_clips.yaml").write_text(
        f"task: saint_clips\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {task_dir / 'clips.jsonl'}\n"
        "test_split: test\ndoc_to_visual: !function clip_utils.doc_to_visual\n"
        "doc_to_text: !function clip_utils.doc_to_text\ndoc_to_target: answer\noutput_type: generate_until\n"
        "generation_kwargs:\n  max_new_tokens: 4\n  temperature: 0\nmetric_list:\n  - metric: exact_match\n"
        "    aggregation: mean\n    higher_is_better: true\nmetadata:\n  - version: 0.0\n")
    results, (stats,) = run_tasks("saint_qwen_vl", qwen_checkpoint("qwen3_vl"), VIDEO_ARGS, tmp_path, task_dir,
                                  "saint_clips", 2, timeout=300)
    assert 0.0 <= results["saint_clips"]["exact_match,none"] <= 1.0
    s = json.loads(stats.read_text().splitlines()[-1])["summary"]["generate_until"]
    assert (s["samples"], s["video_tokens"], s["image_tokens"]) == (2, N_VIDEO_TOKENS, 0)
    assert s["llm_input"] == N_VIDEO_TOKENS // 2 and s["llm_output"] < N_VIDEO_TOKENS // 2


VIT_ARGS = "mode=vit,vit_ratio=0.5,vit_layer=1"


def test_qwen3_5_is_pruned_on_the_vision_side_and_batches_equal_single_requests(qwen_checkpoint):
    """Qwen3.5 (a hybrid linear-attention LM: the vision-side methods only) through
    ``saint_qwen_vl``: both request kinds keep half of every image's tokens, a batch equals
    each request alone, a score equals the patched model's loss, and language-model pruning
    is refused with the methods that work."""
    need("lmms_eval")
    from saint.integrations.lmms_eval import SaintQwenVL

    path = qwen_checkpoint("qwen3_5")
    lm = make_lm("SaintQwenVL", path, VIT_ARGS, easy_vqa_docs(5))
    docs = lm.task_dict["t"]["test"]
    gen, ll = gen_requests(docs), ll_requests(docs)
    batched = (lm.generate_until(gen), lm.loglikelihood(ll))
    assert {e["request"] for e in lm.pruning_log} == {"generate_until", "loglikelihood"}
    for e in lm.pruning_log:
        assert e["image_tokens"] == [N_IMAGE_TOKENS] * len(e["image_tokens"])
        assert e["llm_input"] == e["llm_output"] == [N_IMAGE_TOKENS // 2] * len(e["image_tokens"])
    assert_alone_equals_batched(lm, gen, ll, batched)
    (result,) = lm.loglikelihood(ll[:1])
    ids, n, media = lm._loglikelihood_row(ll[0])
    assert result[0] == pytest.approx(continuation_loss(lm, ids, n, media), abs=1e-5)
    with pytest.raises(TypeError, match="linear-attention layers keep a recurrent state"):
        SaintQwenVL(pretrained=str(path), **dict(kv.split("=") for kv in PRUNE_ARGS.split(",")))
