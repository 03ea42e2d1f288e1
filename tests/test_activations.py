"""Relufication: swapping the MLP activation by name, and training/measuring a relufied model."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModel

from deft import ActivationProbe, cli
from deft.inference.activations import swap_activation
from deft.testing import tiny_config

CASES = [  # model type, expected number of swapped modules (tiny configs have 2 layers)
    ("bert", 2),
    ("gpt2", 2),
    ("llama", 2),
    ("opt", 2),
    ("t5", 4),
    ("vit", 2),
]


@pytest.mark.parametrize("model_type, n", CASES)
def test_swapped_activation_is_relu_and_makes_exact_zeros(model_type, n):
    torch.manual_seed(0)
    cfg = tiny_config(model_type)
    model = AutoModel.from_config(cfg).eval()
    names = swap_activation(model, "relu")
    assert len(names) == n
    seen = []

    def check(mod, args, out):  # independent of deft: the module's output is relu of its input
        torch.testing.assert_close(out, torch.relu(args[0]))
        seen.append(mod)

    hooks = [model.get_submodule(x).register_forward_hook(check) for x in names]
    if model_type == "vit":
        batch = {"pixel_values": torch.randn(2, 3, 16, 16)}
    else:
        ids = torch.randint(3, 100, (2, 7))
        batch = {"input_ids": ids}
        if cfg.is_encoder_decoder:
            batch["decoder_input_ids"] = ids[:, :5]
    with torch.no_grad(), ActivationProbe(model, point="activation") as probe:
        model(**batch)
    for h in hooks:
        h.remove()
    assert len(seen) == n
    # random pre-activations are about half negative: ReLU zeroes about half the units
    dens = list(probe.densities().values())
    assert len(dens) == n and all(0.2 < d < 0.8 for d in dens)


def test_swap_activation_errors_name_the_thing():
    model = AutoModel.from_config(tiny_config("bert"))
    with pytest.raises(ValueError, match="'reluu' is not a transformers activation"):
        swap_activation(model, "reluu")
    with pytest.raises(ValueError, match="no MLP activation module"):
        swap_activation(_without_acts(model), "relu")


def _without_acts(model):
    for layer in model.encoder.layer:
        del layer.intermediate.intermediate_act_fn
    return model


def test_train_relufied_with_tanh_then_measure(tiny_model_dir, glue_dir, tmp_path):
    out = tmp_path / "relu"
    flags = [
        "train",
        "--model",
        str(tiny_model_dir),
        "--task",
        "sst2",
        "--data-dir",
        str(glue_dir),
        "--output",
        str(out),
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--max-length",
        "32",
        "--quiet",
        "--activation",
        "relu",
        "--loss",
        "tanh",
        "--alpha",
        "1",
    ]
    assert cli.main(flags) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["activation"] == "relu"
    assert res["density"]["overall"] < 0.8  # ReLU: exact zeros, unlike the GELU tiny model (~100 %)
    # the adapter is measured on the relufied model: the run's own density comes back
    assert (
        cli.main(
            [
                "measure",
                "--model",
                str(tiny_model_dir),
                "--task",
                "sst2",
                "--data-dir",
                str(glue_dir),
                "--adapter",
                str(out / "adapter"),
                "--activation",
                "relu",
                "--max-length",
                "32",
                "--output",
                str(tmp_path / "m"),
            ]
        )
        == 0
    )
    measured = json.loads((tmp_path / "m" / "density.json").read_text())["density"]
    assert measured["overall"] == pytest.approx(res["density"]["overall"], abs=1e-9)
