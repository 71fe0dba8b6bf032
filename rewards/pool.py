"""Score responses in worker processes, so a reward function that raises, hangs or crashes costs one 0.0.

    pool = RewardPool(python_exec_reward, num_workers=4, timeout_s=10.0)
    reward, error = await pool.score(response_text, problem.answer)   # error: None or a kind below
    pool.stats()   # {"calls": ..., "ok": ..., "errors": {"exception": ..., ...}, "worker_restarts": ...}

Error kinds (each scores 0.0, is counted, and is logged once, the first time it happens):
- "exception": reward_fn raised (its traceback is logged).
- "timeout": no result within timeout_s; the worker's process group is SIGKILLed, the
  worker replaced. (A ProcessPoolExecutor cannot do this: it has no way to stop a running
  call, so one hung call would hold a worker for good.)
- "crash": the worker died mid-call (os._exit, a segfault, the OOM killer).
- "invalid": reward_fn returned something that is not a finite real number.

How the workers start. Each worker is a fresh interpreter started with subprocess (spawn
semantics) that imports reward_fn by name and talks length-prefixed pickles over its
stdin/stdout. Not fork: the caller is a Ray actor with threads (and maybe CUDA), which
fork does not copy safely. Not multiprocessing's spawn or forkserver either: both re-run
the parent's __main__ module in the child, which in a Ray worker is Ray's own entry script.
Starting one costs an interpreter plus reward_fn's imports (a few hundred ms); workers start
on first use and after a kill, and that time is not part of timeout_s.

Each call runs on one of num_workers threads owned by the pool (the asyncio loop only
awaits), so the pool works from any event loop, or several in turn. Give timeout_s some
headroom over what reward_fn itself allows (e.g. the sandbox's timeout_s + 2 s), so that its
own cleanup runs before the pool kills it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import numbers
import os
import pickle
import queue
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)

ERROR_KINDS = ("exception", "timeout", "crash", "invalid")
_HEADER = struct.Struct(">Q")  # payload length
_WORKER_CMD = "from rewards.pool import _worker_main; _worker_main()"


class RewardPool:
    """Run `reward_fn(response, answer) -> float` in `num_workers` processes, `timeout_s` per call."""

    def __init__(self, reward_fn: Callable[[str, str], float], num_workers: int, timeout_s: float,
                 *, start_timeout_s: float = 60.0):
        if num_workers < 1:
            raise ValueError(f"RewardPool(num_workers={num_workers}) must be >= 1")
        if not timeout_s > 0:
            raise ValueError(f"RewardPool(timeout_s={timeout_s}) must be > 0")
        self._fn_name = getattr(reward_fn, "__qualname__", repr(reward_fn))
        self._fn_bytes = _pickle_reward_fn(reward_fn)
        self._timeout_s = timeout_s
        self._start_timeout_s = start_timeout_s
        self._idle: queue.SimpleQueue[_Worker | None] = queue.SimpleQueue()
        for _ in range(num_workers):
            self._idle.put(None)  # started on first use
        # Exactly num_workers threads: a running call always finds a worker slot in _idle.
        self._threads = ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="reward-pool")
        self._lock = threading.Lock()
        self._live: set[_Worker] = set()
        self._calls = 0
        self._errors = dict.fromkeys(ERROR_KINDS, 0)
        self._restarts = 0
        self._closed = False

    async def score(self, response: str, answer: str) -> tuple[float, str | None]:
        """(reward, None) or (0.0, error kind). Raises only when the pool is closed or a worker cannot start."""
        if self._closed:
            raise RuntimeError("RewardPool.score called after close()")
        return await asyncio.get_running_loop().run_in_executor(self._threads, self._score_blocking, response, answer)

    def stats(self) -> dict:
        with self._lock:
            errors = dict(self._errors)
            return {"calls": self._calls, "ok": self._calls - sum(errors.values()), "errors": errors,
                    "worker_restarts": self._restarts}

    def close(self) -> None:
        """Kill every worker. Calls still running end as "crash"; later score() calls raise."""
        self._closed = True
        self._threads.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            workers = list(self._live)
            self._live.clear()
        for worker in workers:
            worker.kill()

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _score_blocking(self, response: str, answer: str) -> tuple[float, str | None]:
        worker = self._idle.get_nowait()  # never empty: at most num_workers calls run at once
        try:
            if worker is None or not worker.alive():
                worker = self._start_worker(replacing=worker)
            reward, kind, detail = worker.call(response, answer, self._timeout_s)
            if kind in ("timeout", "crash"):
                self._retire(worker)
                worker = None
        except BaseException:
            if worker is not None:
                self._retire(worker)
            worker = None
            raise
        finally:
            self._idle.put(worker)
        self._record(kind, detail)
        return reward, kind

    def _start_worker(self, replacing: _Worker | None) -> _Worker:
        if replacing is not None:  # died while idle
            self._retire(replacing)
        worker = _Worker(self._fn_bytes, self._start_timeout_s)
        with self._lock:
            if self._closed:
                worker.kill()
                raise RuntimeError("RewardPool was closed while a worker started")
            self._live.add(worker)
        return worker

    def _retire(self, worker: _Worker) -> None:
        worker.kill()
        with self._lock:
            self._live.discard(worker)
            self._restarts += 1

    def _record(self, kind: str | None, detail: str) -> None:
        with self._lock:
            self._calls += 1
            if kind is None:
                return
            self._errors[kind] += 1
            first = self._errors[kind] == 1
            call = self._calls
        if first:
            log.warning("Reward fn %s: %s on call %d; scored 0.0. Later %r errors are only counted "
                        "(RewardPool.stats()).\n%s", self._fn_name, kind, call, kind, detail)


def _pickle_reward_fn(reward_fn: Callable) -> bytes:
    if not callable(reward_fn):
        raise TypeError(f"RewardPool(reward_fn={reward_fn!r}) is not callable")
    if getattr(reward_fn, "__module__", None) == "__main__":
        raise TypeError(f"RewardPool(reward_fn={reward_fn.__qualname__}) is defined in __main__, which the worker "
                        "processes cannot import; move it to a module")
    try:
        return pickle.dumps(reward_fn)
    except (pickle.PicklingError, AttributeError, TypeError) as e:
        raise TypeError(f"RewardPool(reward_fn={reward_fn!r}) cannot be pickled ({e}); it runs in worker processes, "
                        "so it must be a module-level function (or a functools.partial of one), not a lambda, "
                        "closure or bound method of an unpicklable object") from None


class _Worker:
    """One worker process; used by one thread at a time."""

    def __init__(self, fn_bytes: bytes, start_timeout_s: float):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))  # import what the parent can
        # Own session: a kill takes the reward fn's children too. No preexec_fn: not thread-safe.
        self.proc = subprocess.Popen([sys.executable, "-c", _WORKER_CMD], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env, start_new_session=True, bufsize=0)
        try:
            _write_frame(self.proc.stdin, fn_bytes)
            status, detail = pickle.loads(_read_frame(self.proc.stdout.fileno(), time.monotonic() + start_timeout_s))
        except (OSError, EOFError, TimeoutError) as e:
            self.kill()
            raise RuntimeError(f"reward worker failed to start ({type(e).__name__}: {e}); its stderr is in this "
                               "process's stderr") from None
        if status != "ready":
            self.kill()
            raise RuntimeError(f"reward worker could not load reward_fn:\n{detail}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def call(self, response: str, answer: str, timeout_s: float) -> tuple[float, str | None, str]:
        """(reward, error kind, detail for the log)."""
        try:
            _write_frame(self.proc.stdin, pickle.dumps((response, answer)))
            status, value = pickle.loads(_read_frame(self.proc.stdout.fileno(), time.monotonic() + timeout_s))
        except TimeoutError:
            return 0.0, "timeout", f"no result within timeout_s={timeout_s}; worker pid {self.proc.pid} killed"
        except (OSError, EOFError, ValueError):  # ValueError: close() shut the pipes meanwhile
            self.kill()
            return 0.0, "crash", f"worker pid {self.proc.pid} died mid-call ({_exit_text(self.proc.returncode)})"
        if status == "ok":
            return value, None, ""
        return 0.0, status, value

    def kill(self) -> None:
        if self.proc.returncode is not None:  # already reaped: its pid may belong to someone else now
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            pipe.close()


def _exit_text(returncode: int | None) -> str:
    if returncode is not None and returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    return f"exit code {returncode}"


def _write_frame(pipe, payload: bytes) -> None:
    pipe.write(_HEADER.pack(len(payload)))
    view = memoryview(payload)
    while view:  # an unbuffered pipe may take part of it
        view = view[pipe.write(view):]


def _read_frame(fd: int, deadline: float) -> bytes:
    """One frame from `fd`; TimeoutError past `deadline`, EOFError when the writer is gone."""
    header = _read_exact(fd, _HEADER.size, deadline)
    return _read_exact(fd, _HEADER.unpack(header)[0], deadline)


def _read_exact(fd: int, n: int, deadline: float) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        remaining = None if deadline == math.inf else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise TimeoutError
        if not select.select([fd], [], [], remaining)[0]:
            continue
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


# ---- the worker process ----


def _worker_main() -> None:
    # The protocol keeps private copies of fds 0 and 1: prints and input() in reward_fn then go to
    # stderr and /dev/null instead of corrupting the frames.
    proto_in, proto_out = os.fdopen(os.dup(0), "rb", buffering=0), os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(2, 1)
    _die_with_parent()
    try:
        reward_fn = pickle.loads(_read_frame(proto_in.fileno(), math.inf))
    except EOFError:
        return
    except BaseException:  # noqa: BLE001 - sent to the parent, which raises it
        _write_frame(proto_out, pickle.dumps(("init_error", traceback.format_exc())))
        return
    _write_frame(proto_out, pickle.dumps(("ready", None)))
    while True:
        try:
            response, answer = pickle.loads(_read_frame(proto_in.fileno(), math.inf))
        except EOFError:  # the pool closed or its process died
            return
        try:
            value = reward_fn(response, answer)
        except BaseException:  # noqa: BLE001 - SystemExit from a reward fn is an error too, not a worker exit
            _write_frame(proto_out, pickle.dumps(("exception", traceback.format_exc())))
            continue
        _write_frame(proto_out, pickle.dumps(_check_reward(value)))


def _check_reward(value) -> tuple[str, float | str]:
    if isinstance(value, numbers.Real):  # int, float, bool, numpy scalars
        reward = float(value)
        if math.isfinite(reward):
            return "ok", reward
        return "invalid", f"reward_fn returned {reward!r}, not a finite number"
    return "invalid", f"reward_fn returned {type(value).__name__} {repr(value)[:200]}, not a real number"


def _die_with_parent() -> None:
    """SIGKILL this worker when the pool thread that started it exits (Linux; best effort)."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
