"""The sandbox launcher: the child side of `rewards.sandbox.run_python`.

    python -m pytest tests/unit/test_sandbox.py -q

`run_python` starts `python -I -S -B -c <load this file by path> spec`; `_launch` locks the
process down and `execve`s the sandbox interpreter on the code, in this order: watchdog,
namespaces, private root (or private /tmp), rlimits, uid, PR_SET_PDEATHSIG. This file imports
only the standard library: a `-I -S` interpreter has no site-packages, and it is loaded by
path, not as `rewards.sandbox_launch` (the parent imports it normally for the helpers below).
"""

from __future__ import annotations

import json
import os
import platform
import signal
import sys
import time

_BASE_UID = 2_000_000_000  # + launcher pid (< 2**22): above the ranges distros and systemd hand out, below 2**31
_WATCHDOG_GRACE_S = 2.0  # the parent kills at timeout_s; the watchdog only acts if the parent could not
_ROOT_TMPFS = b"size=1m,nr_inodes=4096,mode=0755"  # mount points and symlinks only; /tmp is its own tmpfs

# linux/sched.h, linux/mount.h, linux/prctl.h
_CLONE_NEWNS, _CLONE_NEWIPC, _CLONE_NEWUSER, _CLONE_NEWNET = 0x00020000, 0x08000000, 0x10000000, 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REMOUNT = 1, 2, 4, 8, 32
_MS_NOATIME, _MS_NODIRATIME, _MS_BIND, _MS_REC, _MS_PRIVATE, _MS_RELATIME = 1024, 2048, 4096, 16384, 1 << 18, 1 << 21
_MNT_DETACH = 2
_PR_SET_PDEATHSIG = 1
# glibc has no pivot_root wrapper; elsewhere chroot does (see _enter_root)
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}.get(platform.machine())
# statvfs f_flag bit -> the mount flag a remount must keep (a user namespace may not clear these)
_LOCKED_FLAGS = ((os.ST_NOSUID, _MS_NOSUID), (os.ST_NODEV, _MS_NODEV), (os.ST_NOEXEC, _MS_NOEXEC),
                 (os.ST_NOATIME, _MS_NOATIME), (os.ST_NODIRATIME, _MS_NODIRATIME), (os.ST_RELATIME, _MS_RELATIME))


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
    uid, gid = (_BASE_UID + os.getpid(),) * 2 if as_root else (os.getuid(), os.getgid())
    # Forked first, in the host's namespaces: it keeps the host's /proc (to kill by uid) after the pivot below.
    _fork_watchdog(spec["timeout_s"] + _WATCHDOG_GRACE_S, uid if as_root else None)
    net, mnt, userns = _unshare(as_root, warnings)
    private_root = workdir = None
    if mnt and _make_mounts_private(warnings):
        workdir = _private_root(spec, uid, gid, code, warnings)
        private_root = workdir is not None
        if workdir is None:
            workdir = _mount_tmp("", spec["disk_mb"], uid, gid, code, warnings)
    if workdir is None:
        workdir = spec["workdir"]
        if as_root:
            os.chown(workdir, uid, gid)
            os.chown(os.path.join(workdir, "main.py"), uid, gid)
    os.chdir(workdir)

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
            "private_tmp": workdir == "/tmp/job", "private_root": bool(private_root),
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


def _make_mounts_private(warnings: list[str]) -> bool:
    try:
        _libc_call("mount", b"none", b"/", None, _MS_REC | _MS_PRIVATE, None)  # nothing propagates to the host
        return True
    except OSError as e:
        warnings.append(f"mounts not made private ({e.strerror}): no private root or /tmp; the working directory "
                        "is on disk")
        return False


# ---- the private root ----------------------------------------------------------------------------


def _private_root(spec: dict, uid: int, gid: int, code: bytes, warnings: list[str]) -> str | None:
    """Make a fresh tmpfs the root: `spec["root"]` (the interpreter, its standard library, the shared
    libraries they load, a few devices; see rewards.sandbox_root.root_plan) bound read-only at their own
    paths, plus the private /tmp. The host's root is detached from this mount namespace. Returns
    the working directory, or None (with a warning) where the kernel refused a step."""
    plan = spec["root"]
    if plan is None:
        return None  # the parent could not work out what the interpreter needs; it said why
    new = spec["workdir"].encode()  # a directory the parent made; main.py is already read
    try:
        _mount(b"tmpfs", new, b"tmpfs", _MS_NOSUID | _MS_NODEV, _ROOT_TMPFS)
    except OSError as e:
        warnings.append(f"private root not mounted ({e}); the code can read the host's world-readable files")
        return None
    try:
        symlinks, hides = [], []
        for op, path, target in plan:
            if op == "symlink":
                symlinks.append((path, target))  # last: no directory made below can go through one
            elif op == "hide":
                hides.append(path)  # after the binds it sits in
            else:
                _bind_read_only(path, new + path.encode(), device=op == "dev")
        workdir = _mount_tmp(new.decode(), spec["disk_mb"], uid, gid, code, warnings, strict=True)
        for path in hides:
            _mount(b"tmpfs", new + path.encode(), b"tmpfs", _MS_RDONLY | _MS_NOSUID | _MS_NODEV, b"size=4k,mode=0755")
        for path, target in symlinks:
            os.makedirs(os.path.dirname(new + path.encode()), mode=0o755, exist_ok=True)
            os.symlink(target, new + path.encode())
        _enter_root(new)
    except OSError as e:
        warnings.append(f"private root not set up ({e}); the code can read the host's world-readable files")
        try:
            _libc_call("umount2", new, _MNT_DETACH)  # the binds and tmpfs below go with it
        except OSError:
            pass
        return None
    try:  # the root's own mount points and symlinks read-only too; /tmp is its own mount and stays writable
        _mount(None, b"/", None, _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV, None)
    except OSError as e:
        warnings.append(f"the private root's top level stays writable ({e})")
    return workdir


def _bind_read_only(source: str, target: bytes, device: bool) -> None:
    parent = os.path.dirname(target)
    os.makedirs(parent, mode=0o755, exist_ok=True)
    if os.path.isdir(source):
        os.makedirs(target, mode=0o755, exist_ok=True)
    elif not os.path.exists(target):
        os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o644))  # a file to mount on
    _mount(source.encode(), target, None, _MS_BIND, None)
    # A bind shares the source's flags; read-only needs a remount, which must keep the flags a user
    # namespace may not clear (nosuid, nodev, noexec, atime) or the kernel refuses it.
    kept = os.statvfs(source).f_flag
    flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | (0 if device else _MS_NODEV)
    flags |= sum(ms for st, ms in _LOCKED_FLAGS if kept & st)
    _mount(None, target, None, flags, None)


def _enter_root(new: bytes) -> None:
    """pivot_root to `new` and detach the old root: nothing of the host's tree is left in this mount
    namespace. Where pivot_root is unavailable (no syscall number for this machine, or EINVAL, e.g.
    the host root is an initramfs), chroot: the code, without CAP_SYS_CHROOT, cannot leave it."""
    os.chdir(new)
    try:
        if _SYS_PIVOT_ROOT is None:
            raise OSError(0, "no pivot_root syscall number for this machine")
        _libc_call("syscall", _SYS_PIVOT_ROOT, b".", b".")  # the old root is now stacked on "."
        _libc_call("umount2", b".", _MNT_DETACH)
    except OSError:
        os.chroot(".")
    os.chdir("/")


def _mount_tmp(root: str, disk_mb: int, uid: int, gid: int, code: bytes, warnings: list[str],
               strict: bool = False) -> str | None:
    """One tmpfs of disk_mb on root/tmp, bound on root/var/tmp and root/dev/shm; the code runs in
    /tmp/job. strict (in the private root): any failure raises instead of a warning."""
    tmp = f"{root}/tmp"
    try:
        os.makedirs(tmp, mode=0o755, exist_ok=True)
        _mount(b"tmpfs", tmp.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, f"size={disk_mb}m,mode=1777".encode())
    except OSError as e:
        if strict:
            raise
        warnings.append(f"private /tmp not mounted ({e.strerror}); the working directory is on disk")
        return None
    for path in (f"{root}/var/tmp", f"{root}/dev/shm"):
        try:
            if root:
                os.makedirs(path, mode=0o755, exist_ok=True)
            if os.path.isdir(path):
                _mount(tmp.encode(), path.encode(), None, _MS_BIND, None)
        except OSError as e:
            if strict:
                raise
            warnings.append(f"{path} not covered by the private tmpfs ({e.strerror})")
    os.mkdir(f"{tmp}/job", 0o700)
    with open(f"{tmp}/job/main.py", "wb") as f:
        f.write(code)
    if os.geteuid() == 0 and uid != 0:
        os.chown(f"{tmp}/job", uid, gid)
        os.chown(f"{tmp}/job/main.py", uid, gid)
    return "/tmp/job"


def _mount(source: bytes | None, target: bytes, fstype: bytes | None, flags: int, data: bytes | None) -> None:
    try:
        _libc_call("mount", source, target, fstype, flags, data)
    except OSError as e:
        raise OSError(e.errno, f"mount {target.decode(errors='replace')}: {e.strerror}") from None


# ---- the watchdog and kills by uid ---------------------------------------------------------------


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


def _kill_uid(uid: int) -> bool:
    """SIGKILL every live process whose real uid is `uid`, until none is left (then True).

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
            return True
        time.sleep(0.001)
    return False


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
