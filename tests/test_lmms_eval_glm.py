"""What lmms-eval's ``saint_glm4v`` does beyond ``saint_qwen_vl`` (whose tests in
``test_lmms_eval_qwen.py`` also run on the tiny GLM-4.1V, ``lmms_helpers.build_glm4v``): one
forward per modality (a video's frames are image tokens, told apart by the video's start and
end tokens), lmms-eval's own command line, and the refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from .lmms_helpers import (
    build_glm4v,
    easy_vqa_docs,
    make_lm,
    need,
    run_cli,
)
from .test_lmms_eval_qwen import (
    N_IMAGE_TOKENS,
    N_VIDEO_TOKENS,
    PRUNE_ARGS,
    VIDEO_ARGS,
    video_docs,  # noqa: F401  (the fixture)
    video_requests,
)


@pytest.fixture(scope="module")
def glm_dir(tmp_path_factory, one_thread) -> Path:
    path = tmp_path_factory.mktemp("tiny_glm4v")
    build_glm4v(path)
    return path


@pytest.fixture(scope="module")
def lm(glm_dir):
    return make_lm("SaintGlm4v", glm_dir, PRUNE_ARGS, easy_vqa_docs(5))


def test_lmms_eval_cli_end_to_end(glm_dir, tmp_path):
    """``python -m lmms_eval --model saint_glm4v ...`` completes and prunes both kinds of request."""
    import json

    need("lmms_eval")
    results, (stats,) = run_cli("saint_glm4v", glm_dir, PRUNE_ARGS, tmp_path, 3, timeout=300)
    assert 0.0 <= results["saint_easyvqa_gen"]["exact_match,none"] <= 1.0
    assert 0.0 <= results["saint_easyvqa_mc"]["acc,none"] <= 1.0
    summary = json.loads(stats.read_text().splitlines()[-1])["summary"]
    for kind in ("generate_until", "loglikelihood"):
        s = summary[kind]
        assert s["image_tokens"] == N_IMAGE_TOKENS and s["video_tokens"] == 0
        assert s["llm_input"] == N_IMAGE_TOKENS // 2 and s["llm_output"] < N_IMAGE_TOKENS // 2


def test_each_forward_holds_one_modality(glm_dir, request):
    """transformers' GLM takes images or videos in one forward: a batch of two image and two
    video requests runs as its image rows and its video rows, in both request kinds; a
    video's frame tokens are told apart from image tokens by the video's start and end."""
    docs = request.getfixturevalue("video_docs")  # test_lmms_eval_qwen.py's clips between images
    video_lm = make_lm("SaintGlm4v", glm_dir, VIDEO_ARGS, docs)
    gen, ll = video_requests(docs)
    video_lm.generate_until(gen), video_lm.loglikelihood(ll)
    seen = set()
    for e in video_lm.pruning_log:
        kinds = {(image, video) for image, video in zip(e["image_tokens"], e["video_tokens"], strict=True)}
        assert kinds in ({(N_IMAGE_TOKENS, 0)}, {(0, N_VIDEO_TOKENS)})
        seen |= {(e["request"], kind) for kind in kinds}
    assert len(seen) == 4  # both modalities in both request kinds
    ids, _, _ = video_lm._loglikelihood_row(ll[1])
    types = video_lm._token_types(torch.tensor([ids]))
    assert int(types.eq(2).sum()) == N_VIDEO_TOKENS and int(types.eq(1).sum()) == 0


def test_bad_checkpoints_and_prompts_refused(lm, tmp_path, request):
    need("lmms_eval")
    from saint.integrations.lmms_glm import SaintGlm4v

    from .lmms_helpers import build_llava

    build_llava(tmp_path)
    with pytest.raises(ValueError, match="model_type 'glm4v', 'glm4v_moe', 'glm46v' or 'glm_ocr'"):
        SaintGlm4v(pretrained=str(tmp_path))
    from PIL import Image

    image = Image.open(lm.task_dict["t"]["test"][0]["image"]).convert("RGB")
    with pytest.raises(ValueError, match="images or videos in one prompt, not both"):
        lm._generate(["x"], [[image, lm._visual(request.getfixturevalue("video_docs")[1]["video"], "t/1")]],
                     {"max_new_tokens": 2},
                     "generate_until")
