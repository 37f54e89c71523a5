"""lmms-eval's ``saint_qwen_omni``: what it adds to ``saint_qwen_vl`` (whose request tests,
tests/test_lmms_eval_qwen.py, run on tiny Qwen2.5-Omni and Qwen3-Omni thinker checkpoints too):
its entry point, a whole-model checkpoint serving its thinker, and the refusal of other checkpoints."""

from __future__ import annotations

import pytest

from .lmms_helpers import build_llava, build_omni, easy_vqa_docs, gen_requests, make_lm, need
from .test_lmms_eval_qwen import PRUNE_ARGS


def test_entry_point_resolves_saint_qwen_omni():
    need("lmms_eval")
    import lmms_eval.models

    from saint.integrations.lmms_omni import SaintQwenOmni

    assert lmms_eval.models.get_model("saint_qwen_omni") is SaintQwenOmni


def test_other_checkpoints_are_refused(tmp_path):
    need("lmms_eval")
    from saint.integrations.lmms_omni import SaintQwenOmni

    build_llava(tmp_path)
    with pytest.raises(ValueError, match="model_type 'qwen2_5_omni', 'qwen2_5_omni_thinker'"):
        SaintQwenOmni(pretrained=str(tmp_path))


def test_a_whole_omni_checkpoint_serves_its_thinker(tmp_path):
    """A checkpoint of the whole model (model_type 'qwen2_5_omni', the thinker's weights under
    ``thinker.``, as on the hub) loads the thinker alone and answers as the thinker's own checkpoint."""
    import shutil

    import transformers
    from safetensors.torch import load_file, save_file

    need("lmms_eval")
    thinker_dir = tmp_path / "thinker"
    build_omni(thinker_dir)
    tmp_path = tmp_path / "whole"
    tmp_path.mkdir()
    for f in thinker_dir.iterdir():
        if f.name not in ("config.json", "model.safetensors", "generation_config.json"):
            shutil.copy(f, tmp_path / f.name)
    thinker_config = transformers.AutoConfig.from_pretrained(thinker_dir)
    transformers.Qwen2_5OmniConfig(thinker_config=thinker_config.to_dict()).save_pretrained(tmp_path)
    weights = load_file(thinker_dir / "model.safetensors")
    save_file({f"thinker.{k}": v for k, v in weights.items()}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    docs = easy_vqa_docs(3)
    whole, alone = (make_lm("SaintQwenOmni", d, PRUNE_ARGS, docs) for d in (tmp_path, thinker_dir))
    assert whole.model.config.model_type == "qwen2_5_omni_thinker"
    assert type(whole.model) is type(alone.model)
    assert whole.generate_until(gen_requests(docs)) == alone.generate_until(gen_requests(docs))
