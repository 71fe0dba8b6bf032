"""Run untrusted, model-written Python in a locked-down subprocess.

    python -c "from rewards.sandbox import run_python; print(run_python('print(6 * 7)'))"
    python -m pytest tests/unit/test_sandbox.py -q

`run_python` does not use `preexec_fn`: Python code between fork and exec can deadlock in a
process that has threads (a Ray actor always has them; the subprocess docs call preexec_fn
unsafe there). It starts a launcher instead (rewards/sandbox_launch.py, in a fresh
single-threaded `python -I -S` run as the caller), which locks itself down and `execve`s the
sandbox interpreter on the code. It costs one extra interpreter start (about 30 ms).

What is isolated (Linux; each SandboxResult says what its run achieved):
- Files. With a mount namespace (root, or an unprivileged user namespace) the code runs in a
  private root: a fresh tmpfs made the root with pivot_root, holding only the sandbox
  interpreter, its standard library (site-packages hidden), the shared libraries they load (as
  `ldd` lists them), /etc/ld.so.cache and /dev/{null,zero,full,random,urandom}, each bound
  read-only at its own path, plus /tmp (also on /var/tmp and /dev/shm): one private tmpfs of
  disk_mb, the working directory /tmp/job, gone when the run ends. Nothing else of the host's
  tree is reachable: no /etc/passwd, no /home, no project directory, no /proc, no /sys.
  Where that cannot be set up, a warning is logged once and the run goes on with the host's
  tree (`private_root=False`): /tmp alone is private if the mount namespace works, else the
  working directory is a temporary directory on disk, removed afterwards, and files written to
  world-writable directories stay; the code can then read every world-readable file (nothing
  read can leave except through stdout and stderr). One file is at most max_file_mb
  (RLIMIT_FSIZE). As a private uid the code can write nothing of the caller's.
- Processes. Root ignores RLIMIT_NPROC (the kernel skips the check for root and for
  CAP_SYS_RESOURCE/CAP_SYS_ADMIN), so as root the code runs as a fresh unprivileged uid,
  _BASE_UID + launcher pid, with RLIMIT_NPROC = max_processes: an exact cap on the processes
  and threads of this run alone. At the end every process of that uid is killed, also ones
  that left the process group. Not root: the code runs in a user namespace where the kernel
  allows one, and kernel >= 5.14 counts RLIMIT_NPROC per user namespace, so the cap is exact
  again; where not, RLIMIT_NPROC counts all of the caller's tasks, so it is their current
  number + max_processes (a loose cap). Not root, the watchdog below is one of those tasks,
  and cleanup is by process group only.
- Network. unshare(CLONE_NEWNET) (with CLONE_NEWUSER when not root): the code sees only a
  loopback interface that is down, so it cannot connect anywhere, the host's 127.0.0.1
  services included. Unix sockets on the filesystem are out of reach in the private root;
  without it, the private uid's file permissions are what guards them. Where unshare is refused
  (e.g. a container without CAP_SYS_ADMIN and without user namespaces) the run goes on with the
  network of the host, `network_isolated=False`, and a warning is logged once.
- Memory and time. RLIMIT_AS = memory_mb and RLIMIT_CPU = cpu_s, each per process (so up to
  max_processes x memory_mb in all); RLIMIT_CORE = 0; wall clock timeout_s, then SIGKILL to the
  process group (and uid). A root-owned watchdog forked by the launcher kills everything at
  timeout_s + 2 s even if the caller died, and the leader gets SIGKILL when the calling
  thread exits (PR_SET_PDEATHSIG).
- Environment and interpreter. Only PATH, LANG, LC_ALL, HOME and TMPDIR are set (no WANDB_*,
  AWS_*, HF_* ...). Flags -I -S -B: no site-packages, no PYTHON* variables, no script
  directory on sys.path: the code gets the standard library of the sandbox interpreter only.
  That interpreter is the base one of a virtual environment (its stdlib is the same), so no
  path of the project shows in the private root; as root it must also be reachable by other
  users (one under a 0700 /root is not), so the first world-executable one of it and the
  system python3 is used.
- Not isolated: the PID namespace (pids are shared; without /proc the code cannot list
  processes, but not root it runs as the caller's uid and could signal the caller's processes
  by pid), SysV IPC where CLONE_NEWIPC is refused, kernel attack surface (no seccomp), timing
  side channels. This guards against sloppy, runaway or mildly hostile model code, not
  against a determined attacker with a kernel exploit.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

from rewards.sandbox_launch import _BASE_UID, _kill_uid, _live_uid  # noqa: F401 - _live_uid: tests
from rewards.sandbox_root import ENV, root_plan, sandbox_python

log = logging.getLogger(__name__)

_SETUP_TIMEOUT_S = 30.0  # launcher start to exec; seconds on a loaded machine, never near this
_DRAIN_S = 1.0  # after the kill, how long to wait for the pipes to close
# The launcher loads its file by path, not `rewards.sandbox_launch`: rewards/__init__.py may one day import
# what a `-I -S` interpreter (no site-packages) cannot. That file imports only the standard library.
_LAUNCH = (
    "import importlib.util, sys; "
    "spec = importlib.util.spec_from_file_location('tether_sandbox_launcher', "
    f"{os.path.join(os.path.dirname(os.path.abspath(__file__)), 'sandbox_launch.py')!r}); "
    "module = sys.modules[spec.name] = importlib.util.module_from_spec(spec); "
    "spec.loader.exec_module(module); module._launch()"
)


@dataclass(frozen=True)
class SandboxResult:
    returncode: int | None  # negative: killed by that signal (as subprocess reports it)
    stdout: str  # at most max_output_bytes, decoded as UTF-8 with replacement
    stderr: str
    timed_out: bool
    killed_reason: str | None  # None (exited), timeout, output_limit, cpu_limit, file_size_limit, signal:NAME
    network_isolated: bool  # own network namespace: only a down loopback
    private_uid: bool  # ran as a fresh unprivileged uid: cannot touch the caller's files; cleanup by uid
    process_cap_exact: bool  # RLIMIT_NPROC counts this run's tasks only (private uid or user namespace)
    private_tmp: bool  # /tmp, /var/tmp, /dev/shm and the working directory are a private tmpfs
    private_root: bool  # the code sees only the interpreter, its stdlib and libraries, a few devices and /tmp
    duration_s: float


def run_python(
    code: str,
    *,
    stdin: str = "",
    timeout_s: float = 5.0,
    memory_mb: int = 256,
    max_file_mb: int = 1,
    max_processes: int = 16,
    cpu_s: float | None = None,
    disk_mb: int = 32,
    max_output_bytes: int = 64 * 1024,
) -> SandboxResult:
    """Run `code` as a script in the sandbox described in the module docstring.

    cpu_s defaults to timeout_s + 1: the wall clock is the limit that normally acts; the CPU
    limit is the backstop when the parent is gone. Output beyond max_output_bytes on either
    stream kills the run (killed_reason="output_limit"). Raises RuntimeError only when the
    sandbox itself cannot be set up (never for anything the code does).
    """
    _check_limits(timeout_s=timeout_s, memory_mb=memory_mb, max_file_mb=max_file_mb, max_processes=max_processes,
                  disk_mb=disk_mb, max_output_bytes=max_output_bytes)
    cpu_s = timeout_s + 1.0 if cpu_s is None else cpu_s
    if cpu_s <= 0:
        raise ValueError(f"cpu_s={cpu_s} must be > 0; leave it None for timeout_s + 1")
    python = sandbox_python(os.geteuid() == 0)
    root, root_warning = root_plan(python)
    spec = {
        "python": python,
        "root": root,
        "timeout_s": timeout_s,
        "memory_mb": memory_mb,
        "max_file_mb": max_file_mb,
        "max_processes": max_processes,
        "cpu_s": cpu_s,
        "disk_mb": disk_mb,
    }
    start = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="tether-sandbox-")
    proc = None
    status_r, status_w = os.pipe()
    report: dict = {}
    try:
        spec["workdir"] = workdir
        spec["status_fd"] = status_w
        with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8", errors="replace") as f:
            f.write(code)
        stdin_path = os.path.join(workdir, "stdin.txt")
        with open(stdin_path, "w", encoding="utf-8", errors="replace") as f:
            f.write(stdin)
        with open(stdin_path, "rb") as stdin_file:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-B", "-c", _LAUNCH, json.dumps(spec)],
                stdin=stdin_file, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(ENV), cwd=workdir,
                start_new_session=True, pass_fds=(status_w,),
            )
        os.close(status_w)
        status_w = None
        report = _read_status(status_r, proc)
        if "error" in report:
            raise RuntimeError(f"sandbox setup failed in the launcher: {report['error']}")
        if root_warning:
            report["warnings"].append(root_warning)
        _warn_once(report)
        stdout, stderr, reason = _collect(proc, time.monotonic() + timeout_s, max_output_bytes, report["uid"])
        returncode = proc.returncode
    finally:
        if status_w is not None:
            os.close(status_w)
        os.close(status_r)
        if proc is not None:
            _cleanup(proc, report.get("uid"))
        shutil.rmtree(workdir, ignore_errors=True)
    if reason is None and returncode is not None and returncode < 0:
        reason = _signal_reason(-returncode)
    return SandboxResult(
        returncode=returncode,
        stdout=stdout.decode("utf-8", "replace"),
        stderr=stderr.decode("utf-8", "replace"),
        timed_out=reason == "timeout",
        killed_reason=reason,
        network_isolated=report["network_isolated"],
        private_uid=report["private_uid"],
        process_cap_exact=report["process_cap_exact"],
        private_tmp=report["private_tmp"],
        private_root=report["private_root"],
        duration_s=time.monotonic() - start,
    )


def _check_limits(**limits) -> None:
    for name, value in limits.items():
        if not value > 0:
            raise ValueError(f"run_python({name}={value!r}): must be > 0")


def _read_status(fd: int, proc: subprocess.Popen) -> dict:
    """The launcher's report, read until the fd closes (at its exec, or when it dies)."""
    data = b""
    deadline = time.monotonic() + _SETUP_TIMEOUT_S
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return {"error": f"the launcher did not exec within {_SETUP_TIMEOUT_S} s"}
            if not sel.select(min(remaining, 0.5)):
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            data += chunk
    report = {}
    for line in data.decode().splitlines():
        report.update(json.loads(line))
    if not report:  # died before writing anything: its stderr says why
        proc.kill()
        report["error"] = f"launcher exited without a report: {proc.stderr.read(4096).decode(errors='replace')!r}"
    return report


_ISOLATION = ("network_isolated", "private_uid", "process_cap_exact", "private_tmp", "private_root")
_warned_lock = threading.Lock()
_warned: set[tuple[bool, ...]] = set()  # isolation outcomes already logged


def _warn_once(report: dict) -> None:
    """Log what isolation runs get, once per process for each outcome (a later run that gets less
    than the first, e.g. a private root that fails, is logged too)."""
    outcome = tuple(report[key] for key in _ISOLATION)
    with _warned_lock:
        if outcome in _warned:
            return
        _warned.add(outcome)
    if report["warnings"]:
        log.warning("Sandbox isolation is partial on this machine; runs go on without it: %s",
                    "; ".join(report["warnings"]))
    log.info("Sandbox isolation: %s", " ".join(f"{key}={report[key]}" for key in _ISOLATION))


def _collect(proc: subprocess.Popen, deadline: float, cap: int, uid: int) -> tuple[bytes, bytes, str | None]:
    """Read both pipes until the leader exits, the deadline passes or the output cap is hit."""
    out, err = bytearray(), bytearray()
    bufs = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
    reason = None
    with selectors.DefaultSelector() as sel:
        for fd in bufs:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map() and reason is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                reason = "timeout"
                break
            for key, _ in sel.select(min(remaining, 0.05)):  # 50 ms: how often a silent run is checked for exit
                reason = _read_into(sel, key.fd, bufs[key.fd], cap) or reason
            if _exited(proc.pid):
                break
        # Kill whatever is left (children holding the pipes, or the run itself), then drain.
        _kill_all(proc.pid, uid)
        drain_until = time.monotonic() + _DRAIN_S
        while sel.get_map() and time.monotonic() < drain_until:
            for key, _ in sel.select(0.05):
                _read_into(sel, key.fd, bufs[key.fd], cap)
    proc.wait()
    return bytes(out), bytes(err), reason


def _read_into(sel: selectors.BaseSelector, fd: int, buf: bytearray, cap: int) -> str | None:
    try:
        chunk = os.read(fd, 65536)
    except BlockingIOError:
        return None
    if not chunk:
        sel.unregister(fd)
        return None
    buf += chunk
    if len(buf) > cap:
        del buf[cap:]
        return "output_limit"
    return None


def _exited(pid: int) -> bool:
    """True once the leader has exited; WNOWAIT leaves it a zombie, so its pid (and uid) stay ours."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # reaped by someone else
        return True


def _cleanup(proc: subprocess.Popen, uid: int | None) -> None:
    if proc.returncode is None:
        _kill_all(proc.pid, uid)
        proc.wait()
    for pipe in (proc.stdout, proc.stderr):
        pipe.close()


def _kill_all(pgid: int, uid: int | None) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if uid is not None and uid >= _BASE_UID and not _kill_uid(uid):
        log.warning("Processes of sandbox uid %d survived 100 kill passes; they end at their RLIMIT_CPU", uid)


def _signal_reason(signum: int) -> str:
    if signum == signal.SIGXCPU:
        return "cpu_limit"
    if signum == signal.SIGXFSZ:
        return "file_size_limit"
    try:
        return f"signal:{signal.Signals(signum).name}"
    except ValueError:
        return f"signal:{signum}"
