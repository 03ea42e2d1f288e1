"""--pad-to-max-length: the research code's fixed padding, and what --include-padding then counts."""

from __future__ import annotations

import pytest

from deft import ConfigError
from deft.fields import build
from deft.recipes.train import TrainArgs, train


def _args(tiny_model_dir, glue_dir, tmp_path, **kw):
    base = dict(
        model=str(tiny_model_dir),
        data_dir=str(glue_dir),
        data_source="local",
        alpha=0.0,
        epochs=1,
        batch_size=16,
        output=str(tmp_path / "run"),
        quiet=True,
    )
    return build(TrainArgs, {**base, **kw})


@pytest.mark.parametrize("include_padding", [False, True])
def test_padded_rows_count_only_with_include_padding(tiny_model_dir, glue_dir, tmp_path, include_padding):
    res = train(_args(tiny_model_dir, glue_dir, tmp_path, pad_to_max_length=40, include_padding=include_padding))
    layer = res["density"]["layers"][0]
    n_dev = res["eval_examples"]
    if include_padding:
        assert layer["tokens"] == n_dev * 40  # every row was padded to exactly 40 positions
    else:
        assert layer["tokens"] < n_dev * 40  # only real tokens (the 32 dev sentences are shorter than 40)


def test_pad_to_max_length_is_for_glue(tiny_model_dir, glue_dir, tmp_path):
    with pytest.raises(ConfigError, match="--pad-to-max-length"):
        train(_args(tiny_model_dir, glue_dir, tmp_path, pad_to_max_length=0))
