"""What the sandbox's private root holds (rewards/sandbox.py): the interpreter the code runs in, its
standard library (site-packages hidden), the shared libraries they load and a few devices.

    python = sandbox_python(as_root)       # the base interpreter of a venv; as root, one other uids can run
    ops, why_not = root_plan(python)       # (op, path, symlink target) to build the root, or (None, why)
"""

from __future__ import annotations

import functools
import json
import os
import re
import stat
import subprocess
import sys

ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}  # the code's environment
_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
_HIDDEN = ("site-packages", "dist-packages")  # inside a stdlib directory: not the standard library


@functools.lru_cache(maxsize=2)
def sandbox_python(as_root: bool) -> str:
    """The interpreter the code runs in: the base one of a virtual environment (with -I -S it has the same
    standard library, and no project path shows in the private root); as root, one an unprivileged uid
    can execute."""
    candidates = [getattr(sys, "_base_executable", None), sys.executable]
    if not as_root:
        return next(path for path in candidates if path and os.path.exists(path))
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


@functools.lru_cache(maxsize=4)
def root_plan(python: str) -> tuple[list[tuple[str, str, str]] | None, str | None]:
    """What the private root holds for `python`, as (op, path, symlink target) with op one of dir,
    file, dev (bound read-only at `path`), symlink (made at `path`, as on the host), hide (an empty
    read-only tmpfs over `path`); or (None, why not). Worked out once per interpreter: one run of it
    for its sys.path and one `ldd` of it and its extension modules (about 0.2 s)."""
    env = dict(ENV)
    try:
        out = subprocess.run([python, "-I", "-S", "-B", "-c", "import json, sys; print(json.dumps(sys.path))"],
                             capture_output=True, text=True, env=env, timeout=60, check=True).stdout
        stdlib = [p for p in json.loads(out) if p and os.path.exists(p)]
        extensions = [os.path.join(d, f) for d in stdlib if os.path.isdir(d) for f in sorted(os.listdir(d))
                      if f.endswith(".so")]
        # exit status 1 when one of the files is not dynamic (a static build): the others are still listed
        ldd = subprocess.run(["ldd", python, *extensions], capture_output=True, text=True, env=env, timeout=60)
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        return None, (f"no private root: could not list what {python} loads ({type(e).__name__}: {e}); "
                      "the code can read the host's world-readable files")
    libraries = re.findall(r"(/\S+) \(0x[0-9a-f]+\)", ldd.stdout)  # "libc.so.6 => /lib/.../libc.so.6 (0x7f..)"
    files = [python, *libraries, "/etc/ld.so.cache", *_DEVICES]
    ops: dict[str, tuple[str, str, str]] = {}
    for path in [*stdlib, *files]:
        if os.path.exists(path):
            for op in _chain(os.path.abspath(path)):
                ops.setdefault(op[1], op)
    bound = sorted(path for path, (op, _, _) in ops.items() if op == "dir")
    keep = [op for path, op in sorted(ops.items()) if not any(path.startswith(d + "/") for d in bound)]
    hides = [("hide", os.path.join(d, name), "") for d in bound for name in _HIDDEN
             if os.path.isdir(os.path.join(d, name))]
    return keep + hides, None


def _chain(path: str) -> list[tuple[str, str, str]]:
    """The ops that make `path` resolve in the private root as on the host: every symlink met on
    the way (recreated), then a bind of the real file or directory."""
    parts = path.strip("/").split("/")
    for i in range(1, len(parts) + 1):
        here = "/" + "/".join(parts[:i])
        if os.path.islink(here):
            target = os.readlink(here)
            # `here`'s parent holds no symlink (checked above), so joining and normalising is exact
            resolved = os.path.normpath(os.path.join(os.path.dirname(here), target, *parts[i:]))
            return [("symlink", here, target), *_chain(resolved)]
    mode = os.stat(path).st_mode
    return [("dir" if stat.S_ISDIR(mode) else "dev" if stat.S_ISCHR(mode) else "file", path, "")]
