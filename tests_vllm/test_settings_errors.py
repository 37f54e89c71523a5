"""Bad settings stop the engine at start, in the front end, with the setting's name."""

from __future__ import annotations

import pytest
from conftest import EngineFailed


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"saint_keep_ratio": 1.5}, "saint_keep_ratio=1.5: give the share"),
        ({"saint_keep": 0.5}, "unknown SAINT setting(s) ['saint_keep']"),
    ],
)
def test_bad_settings_fail_at_engine_start(run_engine, model_dir, image_path, overrides, message):
    with pytest.raises(EngineFailed) as err:
        run_engine(model_dir, image_path, overrides, processes=True)
    assert message in err.value.output
    assert "EngineCore" not in err.value.output  # raised before the engine core started


def test_settings_on_a_model_saint_does_not_override_are_refused(tmp_path, model_dir):
    """vLLM would serve such a model unpruned, the settings ignored without a word (before:
    a text-only Llama with ``saint_keep_ratio`` built and served). ``ModelConfig``, which
    ``LLM(...)`` and ``vllm serve`` build first, refuses them; without them the model is
    vLLM's own, and a supported model takes them."""
    from transformers import LlamaConfig
    from vllm.config import ModelConfig
    from vllm.plugins import load_general_plugins

    from saint.integrations.vllm.settings import SaintSettingsError

    load_general_plugins()
    LlamaConfig(architectures=["LlamaForCausalLM"], vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2).save_pretrained(tmp_path)
    with pytest.raises(SaintSettingsError, match=r"\['saint_keep_ratio'\] set .* \['LlamaForCausalLM'\]: it would run unpruned"):
        ModelConfig(model=str(tmp_path), hf_overrides={"saint_keep_ratio": 0.25}, skip_tokenizer_init=True)
    assert ModelConfig(model=str(tmp_path), skip_tokenizer_init=True).architectures == ["LlamaForCausalLM"]
    supported = ModelConfig(model=str(model_dir), hf_overrides={"saint_keep_ratio": 0.25}, skip_tokenizer_init=True)
    assert supported.hf_config.saint_keep_ratio == 0.25


def test_settings_with_the_transformers_implementation_are_refused(model_dir):
    """``model_impl="transformers"`` serves a supported architecture through vLLM's
    Transformers backend, which the plugin does not override: it served unpruned, the
    settings ignored. Refused at ``ModelConfig``; vLLM's own implementation takes them."""
    from vllm.config import ModelConfig
    from vllm.plugins import load_general_plugins

    from saint.integrations.vllm.settings import SaintSettingsError

    load_general_plugins()
    with pytest.raises(SaintSettingsError, match=r"runs on vLLM's 'transformers' implementation .* would run unpruned"):
        ModelConfig(model=str(model_dir), hf_overrides={"saint_keep_ratio": 0.25}, model_impl="transformers")
    for impl in ("auto", "vllm"):
        config = ModelConfig(model=str(model_dir), hf_overrides={"saint_keep_ratio": 0.25}, skip_tokenizer_init=True,
                             model_impl=impl)
        assert config.hf_config.saint_keep_ratio == 0.25
