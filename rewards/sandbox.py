"""Run untrusted, model-written Python in a locked-down subprocess.

    python -c "from rewards.sandbox import run_python; print(run_python('print(6 * 7)'))"
    python -m pytest tests/unit/test_sandbox.py -q

`run_python` does not use `preexec_fn`: Python code between fork and exec can deadlock in a
process that has threads (a Ray actor always has them; the subprocess docs call preexec_fn
unsafe there). It starts a launcher instead, `_launch` below in a fresh single-threaded
`python -I -S` run as the caller, which locks itself down and `execve`s the sandbox
interpreter on the code, in this order: namespaces, private /tmp, watchdog, rlimits, uid,
PR_SET_PDEATHSIG. It costs one extra interpreter start (about 30 ms).

What is isolated (Linux; each SandboxResult says what its run achieved):
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
  services included. Unix sockets on the filesystem are not covered by this; the private
  uid's file permissions are what guards them. Where unshare is refused (e.g. a container
  without CAP_SYS_ADMIN and without user namespaces) the run goes on with the network of the
  host, `network_isolated=False`, and a warning is logged once.
- Files. With a mount namespace, /tmp, /var/tmp, /dev/shm and the working directory are one
  private tmpfs of disk_mb, gone when the run ends. Without one, the working directory is a
  temporary directory on disk, removed afterwards, and files written to world-writable
  directories stay. One file is at most max_file_mb (RLIMIT_FSIZE). As a private uid the
  code can write nothing of the caller's; it can READ every world-readable file, though
  nothing read can leave except through stdout and stderr.
- Memory and time. RLIMIT_AS = memory_mb and RLIMIT_CPU = cpu_s, each per process (so up to
  max_processes x memory_mb in all); RLIMIT_CORE = 0; wall clock timeout_s, then SIGKILL to the
  process group (and uid). A root-owned watchdog forked by the launcher kills everything at
  timeout_s + 2 s even if the caller died, and the leader gets SIGKILL when the calling
  thread exits (PR_SET_PDEATHSIG).
- Environment and interpreter. Only PATH, LANG, LC_ALL, HOME and TMPDIR are set (no WANDB_*,
  AWS_*, HF_* ...). Flags -I -S -B: no site-packages, no PYTHON* variables, no script
  directory on sys.path: the code gets the standard library of the sandbox interpreter only.
  As root that interpreter must be reachable by other users (the venv's may sit under a
  0700 /root), so the first world-executable one of the current and the system python3 is
  used.
- Not isolated: the PID namespace (the code sees other processes and their command lines in
  /proc), SysV IPC where CLONE_NEWIPC is refused, kernel attack surface (no seccomp), timing
  side channels. This guards against sloppy, runaway or mildly hostile model code, not
  against a determined attacker with a kernel exploit.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

_BASE_UID = 2_000_000_000  # + launcher pid (< 2**22): above the ranges distros and systemd hand out, below 2**31
_WATCHDOG_GRACE_S = 2.0  # the parent kills at timeout_s; the watchdog only acts if the parent could not
_SETUP_TIMEOUT_S = 30.0  # launcher start to exec; seconds on a loaded machine, never near this
_DRAIN_S = 1.0  # after the kill, how long to wait for the pipes to close
_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
# The launcher loads this file by path, not `rewards.sandbox`: rewards/__init__.py may one day import
# what a `-I -S` interpreter (no site-packages) cannot. This module imports only the standard library.
_LAUNCH = (
    "import importlib.util, sys; "
    f"spec = importlib.util.spec_from_file_location('tether_sandbox_launcher', {os.path.abspath(__file__)!r}); "
    "module = sys.modules[spec.name] = importlib.util.module_from_spec(spec); "
    "spec.loader.exec_module(module); module._launch()"
)

# linux/sched.h, linux/mount.h, linux/prctl.h
_CLONE_NEWNS, _CLONE_NEWIPC, _CLONE_NEWUSER, _CLONE_NEWNET = 0x00020000, 0x08000000, 0x10000000, 0x40000000
_MS_NOSUID, _MS_NODEV, _MS_BIND, _MS_REC, _MS_PRIVATE = 2, 4, 4096, 16384, 1 << 18
_PR_SET_PDEATHSIG = 1


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
    spec = {
        "python": _sandbox_python(os.geteuid() == 0),
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
                stdin=stdin_file, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(_ENV), cwd=workdir,
                start_new_session=True, pass_fds=(status_w,),
            )
        os.close(status_w)
        status_w = None
        report = _read_status(status_r, proc)
        if "error" in report:
            raise RuntimeError(f"sandbox setup failed in the launcher: {report['error']}")
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
        duration_s=time.monotonic() - start,
    )


def _check_limits(**limits) -> None:
    for name, value in limits.items():
        if not value > 0:
            raise ValueError(f"run_python({name}={value!r}): must be > 0")


@functools.lru_cache(maxsize=2)
def _sandbox_python(as_root: bool) -> str:
    """The interpreter the code runs in: as root, one an unprivileged uid can execute."""
    candidates = [sys.executable, getattr(sys, "_base_executable", sys.executable)]
    if not as_root:
        return candidates[0]
    candidates += ["/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3"]
    for path in candidates:
        if path and os.path.exists(path) and _world_reachable(path):
            return path
    raise RuntimeError(
        f"run_python as root drops to an unprivileged uid, but none of {candidates} is executable by other users "
        "(e.g. the venv's python lives under a 0700 /root); install a system python3 (apt-get install python3-minimal)"
    )


def _world_reachable(path: str) -> bool:
    """Every directory on the way is o+x and the file is o+rx; so is the install's lib/ (the stdlib)."""
    real = os.path.realpath(path)
    lib = os.path.join(os.path.dirname(os.path.dirname(real)), "lib")
    for target, need in ((real, stat.S_IXOTH | stat.S_IROTH), (lib, stat.S_IXOTH | stat.S_IROTH)):
        if not os.path.exists(target) or os.stat(target).st_mode & need != need:
            return False
        parent = os.path.dirname(target)
        while parent != os.path.dirname(parent):
            if not os.stat(parent).st_mode & stat.S_IXOTH:
                return False
            parent = os.path.dirname(parent)
    return True


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


_warned_lock = threading.Lock()
_warned = False


def _warn_once(report: dict) -> None:
    global _warned
    with _warned_lock:
        if _warned:
            return
        _warned = True
    if report["warnings"]:
        log.warning("Sandbox isolation is partial on this machine; runs go on without it: %s",
                    "; ".join(report["warnings"]))
    log.info("Sandbox isolation: network=%s private_uid=%s process_cap_exact=%s private_tmp=%s",
             report["network_isolated"], report["private_uid"], report["process_cap_exact"], report["private_tmp"])


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
    if uid is not None and uid >= _BASE_UID:
        _kill_uid(uid)


def _kill_uid(uid: int) -> None:
    """SIGKILL every live process whose real uid is `uid`, until none is left.

    A pass kills what it saw; processes forked meanwhile are caught by the next one. With
    RLIMIT_NPROC on that uid this ends after a few passes.
    """
    for _ in range(100):
        found = False
        for name in os.listdir("/proc"):
            if name.isdigit() and _live_uid(name) == uid:
                found = True
                try:
                    os.kill(int(name), signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        if not found:
            return
        time.sleep(0.001)
    log.warning("Processes of sandbox uid %d survived 100 kill passes; they end at their RLIMIT_CPU", uid)


def _live_uid(pid: str) -> int | None:
    """Real uid of a process that is not a zombie, else None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        return None
    if fields.get("State", "Z").split()[0] in ("Z", "X"):
        return None
    return int(fields["Uid"].split()[0])


def _signal_reason(signum: int) -> str:
    if signum == signal.SIGXCPU:
        return "cpu_limit"
    if signum == signal.SIGXFSZ:
        return "file_size_limit"
    try:
        return f"signal:{signal.Signals(signum).name}"
    except ValueError:
        return f"signal:{signum}"


# ---- the launcher: runs in the child, `python -I -S -c _LAUNCH spec`, then execs the code ----


def _launch() -> None:
    spec = json.loads(sys.argv[1])
    status_fd = spec["status_fd"]
    try:
        report = _lock_down(spec)
        os.write(status_fd, (json.dumps(report) + "\n").encode())
        os.set_inheritable(status_fd, False)  # closes at exec: EOF tells the parent the code started
        env = dict(os.environ, HOME=report.pop("workdir"), TMPDIR="/tmp" if report["private_tmp"] else spec["workdir"])
        os.execve(spec["python"], [spec["python"], "-I", "-S", "-B", "main.py"], env)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises
        os.write(status_fd, (json.dumps({"error": f"{type(e).__name__}: {e}"}) + "\n").encode())
        os._exit(126)


def _lock_down(spec: dict) -> dict:
    import resource

    as_root = os.geteuid() == 0
    warnings: list[str] = []
    with open(os.path.join(spec["workdir"], "main.py"), "rb") as f:
        code = f.read()
    existing = 0 if as_root else _count_tasks(os.getuid())  # before a user namespace shows every other uid as 65534
    net, mnt, userns = _unshare(as_root, warnings)
    uid, gid = (_BASE_UID + os.getpid(),) * 2 if as_root else (os.getuid(), os.getgid())
    workdir = _private_tmp(spec["disk_mb"], uid, gid, code, warnings) if mnt else None
    if workdir is None:
        workdir = spec["workdir"]
        if as_root:
            os.chown(workdir, uid, gid)
            os.chown(os.path.join(workdir, "main.py"), uid, gid)
    os.chdir(workdir)
    _fork_watchdog(spec["timeout_s"] + _WATCHDOG_GRACE_S, uid if as_root else None)

    # Exact cap as root (a fresh uid) or in a user namespace (kernel >= 5.14 counts RLIMIT_NPROC per namespace);
    # otherwise it counts every task of the caller's uid.
    exact = as_root or (userns and _kernel_at_least(5, 14))
    nproc = spec["max_processes"] if exact else existing + spec["max_processes"]
    cpu = int(spec["cpu_s"] + 0.999)
    mb = 1024 * 1024
    for limit, soft, hard in (
        (resource.RLIMIT_CPU, cpu, cpu + 1),  # soft: SIGXCPU; hard, one second later: SIGKILL
        (resource.RLIMIT_AS, spec["memory_mb"] * mb, spec["memory_mb"] * mb),
        (resource.RLIMIT_FSIZE, spec["max_file_mb"] * mb, spec["max_file_mb"] * mb),
        (resource.RLIMIT_NPROC, nproc, nproc),
        (resource.RLIMIT_CORE, 0, 0),
        (resource.RLIMIT_NOFILE, 256, 256),
    ):
        current_hard = resource.getrlimit(limit)[1]  # not root: a hard limit can only be lowered
        if current_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, current_hard), min(hard, current_hard)
        resource.setrlimit(limit, (soft, hard))
    if as_root:  # fatal if it fails: untrusted code must not run as root
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    if not exact:
        warnings.append(f"no user namespace (or kernel < 5.14): RLIMIT_NPROC={nproc} is shared with the {existing} "
                        f"tasks uid {uid} already runs")
    if not as_root:
        warnings.append("not root: no private uid, so cleanup is by process group only")
    _libc_call("prctl", _PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # after setuid, which clears it
    return {"network_isolated": net, "private_uid": as_root, "process_cap_exact": exact,
            "private_tmp": workdir == "/tmp/job",
            "uid": uid, "workdir": workdir, "warnings": warnings}


def _unshare(as_root: bool, warnings: list[str]) -> tuple[bool, bool, bool]:
    """New network, mount and IPC namespaces where the kernel allows; (network, mount, user) achieved."""
    if not as_root:  # an unprivileged user namespace gives the capabilities the others need
        uid, gid = os.getuid(), os.getgid()
        if not _try_unshare(_CLONE_NEWUSER, "CLONE_NEWUSER", warnings):
            return False, False, False
        for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", f"{uid} {uid} 1"),
                           ("/proc/self/gid_map", f"{gid} {gid} 1")):
            with open(path, "w") as f:
                f.write(text)
    net = _try_unshare(_CLONE_NEWNET, "CLONE_NEWNET", warnings)
    mnt = _try_unshare(_CLONE_NEWNS, "CLONE_NEWNS", warnings)
    _try_unshare(_CLONE_NEWIPC, "CLONE_NEWIPC", warnings)
    return net, mnt, not as_root


def _try_unshare(flag: int, name: str, warnings: list[str]) -> bool:
    try:
        if hasattr(os, "unshare"):  # Python 3.12+
            os.unshare(flag)
        else:
            _libc_call("unshare", flag)
        return True
    except OSError as e:
        warnings.append(f"unshare({name}) refused ({e.strerror})")
        return False


def _private_tmp(disk_mb: int, uid: int, gid: int, code: bytes, warnings: list[str]) -> str | None:
    """Mount one tmpfs of disk_mb on /tmp (bound on /var/tmp and /dev/shm); the code runs in /tmp/job."""
    try:
        _libc_call("mount", b"none", b"/", None, _MS_REC | _MS_PRIVATE, None)  # nothing propagates to the host
        _libc_call("mount", b"tmpfs", b"/tmp", b"tmpfs", _MS_NOSUID | _MS_NODEV, f"size={disk_mb}m,mode=1777".encode())
    except OSError as e:
        warnings.append(f"private /tmp not mounted ({e.strerror}); the working directory is on disk")
        return None
    for path in ("/var/tmp", "/dev/shm"):
        if os.path.isdir(path):
            try:
                _libc_call("mount", b"/tmp", path.encode(), None, _MS_BIND, None)
            except OSError as e:
                warnings.append(f"{path} not covered by the private tmpfs ({e.strerror})")
    os.mkdir("/tmp/job", 0o700)
    with open("/tmp/job/main.py", "wb") as f:
        f.write(code)
    if os.geteuid() == 0 and uid != 0:
        os.chown("/tmp/job", uid, gid)
        os.chown("/tmp/job/main.py", uid, gid)
    return "/tmp/job"


def _fork_watchdog(after_s: float, uid: int | None) -> None:
    """A child that kills the whole run after `after_s`, in case the parent cannot.

    Forked before setuid, so as root the code cannot kill it; it shares the process group,
    so the parent's own kill at the end of a normal run removes it.
    """
    if os.fork():
        return
    try:
        os.closerange(0, 65536)  # hold no pipe open: the parent waits for their EOF
        time.sleep(after_s)
        if uid is not None:
            _kill_uid(uid)
        os.killpg(0, signal.SIGKILL)
    finally:
        os._exit(0)


def _count_tasks(uid: int) -> int:
    """Tasks (processes and threads) of `uid`: what RLIMIT_NPROC counts."""
    n = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/status") as f:
                    fields = dict(line.split(":", 1) for line in f if ":" in line)
                if int(fields["Uid"].split()[0]) == uid:
                    n += int(fields["Threads"])
            except (OSError, KeyError, ValueError):
                pass
    return n


def _kernel_at_least(major: int, minor: int) -> bool:
    try:
        found = tuple(int(x) for x in os.uname().release.split("-")[0].split(".")[:2])
    except ValueError:
        return False
    return found >= (major, minor)


def _libc_call(name: str, *args) -> int:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    result = getattr(libc, name)(*args)
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    return result
