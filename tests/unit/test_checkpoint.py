"""Checkpoint directories: only complete ones are resumed from; older ones are pruned."""

import pytest

from trainer import checkpoint


def _complete(out, step):
    tmp = checkpoint.begin(out, step)
    (tmp / "trainer.pt").write_bytes(b"x")
    return checkpoint.commit(tmp, step, {"step": step})


def test_latest_skips_partial_checkpoints(tmp_path):
    assert checkpoint.latest(tmp_path) is None and checkpoint.resolve("auto", tmp_path) is None
    _complete(tmp_path, 2)
    _complete(tmp_path, 10)
    root = checkpoint.root(tmp_path)
    (root / ".step_00000011.tmp").mkdir()  # killed mid-write
    (root / "step_00000012").mkdir()  # no marker
    (root / "step_00000012" / "trainer.pt").write_bytes(b"half")
    assert checkpoint.latest(tmp_path).name == "step_00000010"
    assert checkpoint.resolve("never", tmp_path) is None
    assert checkpoint.resolve(str(root / "step_00000002"), tmp_path).name == "step_00000002"
    with pytest.raises(FileNotFoundError, match="checkpoint.resume=.*step_00000012"):
        checkpoint.resolve(str(root / "step_00000012"), tmp_path)
    assert checkpoint.driver_state(checkpoint.latest(tmp_path)) == {"step": 10}


def test_prune_keeps_the_last_complete(tmp_path):
    for step in (1, 2, 3):
        _complete(tmp_path, step)
    checkpoint.prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in checkpoint.root(tmp_path).iterdir()) == ["step_00000002", "step_00000003"]
