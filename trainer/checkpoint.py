"""Checkpoint directories: written atomically, found again by `checkpoint.resume=auto`.

    <output_dir>/checkpoints/step_00000012/
        trainer.pt    weights (LoRA: adapters), optimizer, scheduler, EWMA, RNG  (torch.save, tensors only)
        driver.json   step, data cursor and staleness counters, evals so far, wandb run id
        COMPLETE      written last, inside the temporary directory, before the rename

A checkpoint is assembled under a temporary name (`.step_00000012.tmp`) and renamed when every
file is in place, so a run killed mid-write leaves only a temporary directory, which `latest`
never returns (and the next save removes).

`Checkpointer` is what the driver loop talks to (docs/design.md section 10): `should_save(step)`,
`write(step)` while admission is paused (the trainer state and the data cursor of that version),
`commit(...)` once the step's row is in metrics.jsonl (so a run stopped at any moment resumes from
a step whose row was written), `load(path)` to continue.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from pathlib import Path

log = logging.getLogger("tether")

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


class Checkpointer:
    """Checkpoints of a run: the trainer ranks' state (through the fleet) and the driver's."""

    def __init__(self, cfg, fleet, output_dir: Path) -> None:
        self.cfg, self.fleet, self.output_dir = cfg, fleet, Path(output_dir)

    def should_save(self, step: int, give_up: bool = False) -> bool:
        """At checkpoint.every_steps, at the last step, and when the run gives up on non-finite steps."""
        ck = self.cfg.checkpoint
        every = bool(ck.every_steps) and step % ck.every_steps == 0
        return ck.enabled and (give_up or step == self.cfg.trainer.max_steps or every)

    def write(self, step: int) -> tuple[Path, dict, float]:
        """The trainer state and the data cursor of step `step`, into a temporary directory. Call while
        admission is paused: the staleness service's state then belongs to this version."""
        t0 = time.perf_counter()
        tmp = begin(self.output_dir, step)
        self.fleet.all_trainers("save", str(tmp))
        return tmp, {"step": step, "service": self.fleet.service_snapshot()}, time.perf_counter() - t0

    def commit(self, written: tuple[Path, dict, float], progress: dict, wandb_run_id: str | None) -> Path:
        """Make a written checkpoint the latest complete one, with the driver's counters as they stand
        after the step (its tokens, lags and evaluation counted)."""
        t0 = time.perf_counter()
        tmp, state, write_s = written
        path = commit(tmp, state["step"], {**state, **progress, "wandb_run_id": wandb_run_id})
        prune(self.output_dir, self.cfg.checkpoint.keep_last)
        log.info("checkpoint after step %d: %s (%.1f s)", state["step"], path, write_s + time.perf_counter() - t0)
        return path

    def latest(self) -> Path | None:
        """The latest complete checkpoint of this run (None with checkpoint.enabled=false or none yet)."""
        return latest(self.output_dir) if self.cfg.checkpoint.enabled else None

    def load(self, path: Path) -> dict:
        """Every trainer rank and the staleness service back to checkpoint `path`; its driver state."""
        state = driver_state(path)
        steps = set(self.fleet.all_trainers_each("load", str(path)))
        if steps != {state["step"]}:
            raise RuntimeError(f"checkpoint {path}: trainer state is at step(s) {steps}, driver state at {state['step']}")
        self.fleet.restore_service(state["service"])
        return state
