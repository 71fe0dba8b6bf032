"""Checkpoint directories: written atomically, found again by `checkpoint.resume=auto`.

    <output_dir>/checkpoints/step_00000012/
        trainer.pt    weights (LoRA: adapters), optimizer, scheduler, EWMA, RNG  (torch.save, tensors only)
        driver.json   step, data cursor and staleness counters, evals so far, wandb run id
        COMPLETE      written last, inside the temporary directory, before the rename

A checkpoint is assembled under a temporary name (`.step_00000012.tmp`) and renamed when every
file is in place, so a run killed mid-write leaves only a temporary directory, which `latest`
never returns (and the next save removes).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

MARKER = "COMPLETE"
_NAME = re.compile(r"^step_(\d{8})$")


def root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def begin(output_dir: str | Path, step: int) -> Path:
    tmp = root(output_dir) / f".step_{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, step: int, driver_state: dict) -> Path:
    (tmp / "driver.json").write_text(json.dumps(driver_state, indent=1))
    (tmp / MARKER).write_text(json.dumps({"step": step, "files": sorted(p.name for p in tmp.iterdir())}))
    final = tmp.parent / f"step_{step:08d}"
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def is_complete(path: Path) -> bool:
    return _NAME.match(path.name) is not None and (path / MARKER).is_file() and (path / "trainer.pt").is_file()


def latest(output_dir: str | Path) -> Path | None:
    base = root(output_dir)
    found = [p for p in base.iterdir() if p.is_dir() and is_complete(p)] if base.is_dir() else []
    return max(found, key=lambda p: int(_NAME.match(p.name).group(1)), default=None)


def resolve(resume: str, output_dir: str | Path) -> Path | None:
    """The checkpoint to start from: auto = the latest complete one in output_dir (None if there is
    none), never = None, anything else = that directory, which must be a complete checkpoint."""
    if resume == "never":
        return None
    if resume == "auto":
        return latest(output_dir)
    path = Path(resume).expanduser().resolve()
    if not is_complete(path):
        raise FileNotFoundError(f"checkpoint.resume={resume!r} is not a complete checkpoint directory (a "
                                f"step_NNNNNNNN directory holding trainer.pt and {MARKER}); use auto, never or such a path")
    return path


def prune(output_dir: str | Path, keep_last: int) -> None:
    base = root(output_dir)
    done = sorted((p for p in base.iterdir() if p.is_dir() and is_complete(p)), key=lambda p: p.name)
    for old in done[:-keep_last]:
        shutil.rmtree(old)


def driver_state(path: Path) -> dict:
    return json.loads((path / "driver.json").read_text())
