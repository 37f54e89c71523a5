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
        run_engine(model_dir, image_path, overrides)
    assert message in err.value.output
    assert "EngineCore" not in err.value.output  # raised before the engine core started
