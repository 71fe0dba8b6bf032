"""run_python contains what model-written code does; python_exec_reward scores it.

The fork-bomb test runs only where the sandbox gives each run its own uid with RLIMIT_NPROC
(an exact cap, checked first); this machine is shared.
"""

import ast
import functools
import logging
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from rewards import code_task, sandbox
from rewards.code_task import _PROBLEMS, extract_code, make_code_splits, python_exec_reward
from rewards.sandbox import _live_uid, run_python

REPO = Path(__file__).resolve().parents[2]


@functools.lru_cache(maxsize=1)
def probe():
    """What the sandbox achieves here: (result, uid, RLIMIT_NPROC soft limit) of a harmless run."""
    r = run_python("import os, resource\nprint(os.getuid(), resource.getrlimit(resource.RLIMIT_NPROC)[0])",
                   max_processes=8)
    uid, nproc = (int(x) for x in r.stdout.split())
    return r, uid, nproc


def live_processes_of(uid: int) -> list[str]:
    return [pid for pid in os.listdir("/proc") if pid.isdigit() and _live_uid(pid) == uid]


def test_runs_code_with_stdin():
    r = run_python("import sys\nprint(sum(int(x) for x in sys.stdin.read().split()))", stdin="1 2 3\n")
    assert (r.returncode, r.stdout, r.timed_out, r.killed_reason) == (0, "6\n", False, None)


def test_unbounded_allocation_hits_the_memory_limit():
    r = run_python("blocks = []\nwhile True:\n    blocks.append(bytearray(32 * 2**20))", memory_mb=128, timeout_s=10)
    assert r.returncode == 1 and "MemoryError" in r.stderr and not r.timed_out
    r = run_python("x = bytearray(2**31)", memory_mb=128)
    assert r.returncode == 1 and "MemoryError" in r.stderr
    assert run_python("print('host fine')").stdout == "host fine\n"  # and this process is untouched


def test_fork_bomb_is_capped_and_cleaned_up():
    result, uid, nproc = probe()
    if not result.process_cap_exact or uid == 0 or nproc > 8:
        pytest.skip(f"no exact per-run process cap here (process_cap_exact={result.process_cap_exact}, uid={uid}, "
                    f"RLIMIT_NPROC={nproc}); not running a fork bomb on a shared machine")
    # The bomb checks its own cap before the first fork and refuses to start without it.
    bomb = (
        "import os, resource, time\n"
        "if os.getuid() == 0 or resource.getrlimit(resource.RLIMIT_NPROC)[0] > 8:\n"
        "    raise SystemExit(99)\n"
        "os.write(1, f'uid={os.getuid()}\\n'.encode())\n"
        "while True:\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            os.write(1, b'+')  # one '+' per process ever created; none of them exits\n"
        "    except OSError:\n"
        "        time.sleep(0.05)\n"
    )
    start = time.monotonic()
    r = run_python(bomb, timeout_s=2.0, max_processes=8)
    elapsed = time.monotonic() - start
    assert r.returncode != 99, "the cap was not in place"
    assert r.timed_out and elapsed < 2.0 + 3.0
    assert 0 < r.stdout.count("+") <= 7  # 8 processes at most: the leader and 7 children
    if r.private_uid:  # else its processes share the caller's uid; the kill was by process group
        assert live_processes_of(int(r.stdout.split("uid=")[1].split()[0])) == []


def test_a_huge_file_stops_at_the_size_limit():
    code = (
        "import os\n"
        "try:\n"
        "    with open('big', 'wb') as f:\n"
        "        f.write(b'x' * (10 * 2**20))\n"
        "except OSError as e:\n"
        "    print(e.strerror)\n"
        "print(os.path.getsize('big'))\n"
    )
    r = run_python(code, max_file_mb=1)
    assert r.stdout.splitlines() == ["File too large", str(2**20)]


def test_no_network_not_even_the_hosts_loopback():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.setblocking(False)
    port = server.getsockname()[1]
    code = (
        "import socket\n"
        f"for address in [('127.0.0.1', {port}), ('1.1.1.1', 53)]:\n"
        "    try:\n"
        "        socket.create_connection(address, timeout=1).close()\n"
        "        print('connected')\n"
        "    except OSError as e:\n"
        "        print('refused', e.errno)\n"
    )
    try:
        r = run_python(code)
        if not r.network_isolated:
            pytest.skip("this OS refused unshare(CLONE_NEWNET) (and user namespaces): "
                        "the sandbox has the host's network")
        assert "connected" not in r.stdout and r.stdout.count("refused") == 2
        with pytest.raises(BlockingIOError):
            server.accept()
    finally:
        server.close()


def test_secrets_in_the_environment_are_not_visible(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "wandb-secret-1234")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret-5678")
    code = (
        "import os\n"
        "print(sorted(os.environ))\n"
        "for path in ['/proc/self/environ', '/proc/%d/environ']:\n"
        "    try:\n        print(open(path).read())\n"
        "    except OSError as e:\n        print(path, e.strerror)\n"
    ) % os.getpid()
    r = run_python(code)
    assert r.returncode == 0
    assert "secret" not in r.stdout and "WANDB" not in r.stdout and "AWS" not in r.stdout
    assert ast.literal_eval(r.stdout.splitlines()[0]) == ["HOME", "LANG", "LC_ALL", "PATH", "TMPDIR"]
    if r.private_root:  # no /proc at all
        assert f"/proc/{os.getpid()}/environ No such file or directory" in r.stdout
    elif r.private_uid:  # another uid may not read this process's environment
        assert f"/proc/{os.getpid()}/environ Permission denied" in r.stdout


# ---- the private root ----

# Lists every path below / (not descending into the standard library's directories, which are
# bound whole) if the first word on stdin is "walk", then tries to read the files named after it.
_EXPLORE = """
import os, sys
walk, *paths = sys.stdin.read().split()
bound = set(sys.path)
for top, dirs, files in os.walk('/') if walk == 'walk' else ():
    dirs[:] = [d for d in dirs if os.path.join(top, d) not in bound]
    for name in dirs + files:
        print('seen', os.path.join(top, name))
for path in paths:
    try:
        with open(path, 'rb') as f:
            f.read(1)
        print('read', path)
    except OSError as e:
        print('refused', path, e.strerror)
"""


def _world_readable_file(base, prefix: str, name: str, text: str) -> tuple[str, str]:
    """(its directory, the file): a file anyone may read, in a fresh directory anyone may enter under `base`."""
    top = tempfile.mkdtemp(prefix=prefix, dir=base)
    os.chmod(top, 0o755)
    path = os.path.join(top, name)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o644)
    return top, path


@pytest.fixture
def outside_file():
    """A world-readable file outside the sandbox (a private uid could read it without a private root)."""
    top, path = _world_readable_file("/tmp", "tether-outside-", "secret.txt", "outside")
    yield path
    shutil.rmtree(top)


# what the sandbox covers with its private tmpfs whenever it has a mount namespace, private root or not
PRIVATE_MOUNTS = (Path("/tmp"), Path("/var/tmp"), Path("/dev/shm"))


def _under_private_mount(path: Path) -> bool:
    path = path.resolve()
    return any(path == top or top in path.parents for top in PRIVATE_MOUNTS)


@pytest.fixture
def host_file():
    """A world-readable file of the host's tree outside the private /tmp, /var/tmp and /dev/shm: without
    a private root the sandboxed code can read it. Made here rather than taken from the repository,
    which may itself lie under /tmp (a clone there is covered by the private /tmp)."""
    as_root = os.geteuid() == 0  # the code then runs as a private uid: every directory above must let others through
    for base in (Path.home(), Path("/var/lib"), Path("/opt")):
        base = base.resolve()
        if _under_private_mount(base) or not os.access(base, os.W_OK | os.X_OK):
            continue
        if as_root and not all(d.stat().st_mode & stat.S_IXOTH for d in (base, *base.parents)):
            continue
        top, path = _world_readable_file(base, "tether-host-", "host.txt", "host")
        yield path
        shutil.rmtree(top)
        return
    pytest.skip("no writable directory outside /tmp, /var/tmp and /dev/shm that the sandbox's uid can reach")


def _explore(outside: str, walk: bool = True, extra: tuple[str, ...] = ()) -> tuple[sandbox.SandboxResult, set[str],
                                                                                    dict[str, str]]:
    targets = [outside, "/etc/passwd", str(REPO / "README.md"), str(REPO / "rewards" / "sandbox.py"), sys.executable,
               *extra]
    r = run_python(_EXPLORE, stdin="\n".join(["walk" if walk else "no-walk", *targets]))
    assert r.returncode == 0, r.stderr
    seen = {line.split(" ", 1)[1] for line in r.stdout.splitlines() if line.startswith("seen ")}
    outcome = {line.split()[1]: line.split()[0] for line in r.stdout.splitlines()
               if line.startswith(("read", "refused"))}
    return r, seen, outcome


def test_the_private_root_hides_the_hosts_files(outside_file):
    r, seen, outcome = _explore(outside_file)
    if not r.private_tmp:
        pytest.skip("no mount namespace here (not root and no unprivileged user namespaces): the sandbox sees the "
                    "host's files, as its warning says")
    assert r.private_root, "a mount namespace was available, but the private root was not set up"
    # nothing outside is readable: a file made for the test, /etc/passwd, the project, the venv's python
    assert set(outcome.values()) == {"refused"} and len(outcome) == 5, outcome
    # the whole tree: the plan's paths (the interpreter, its libraries, a few devices), their parent
    # directories, the standard library's directories (not descended into) and the private /tmp
    plan, _ = sandbox.root_plan(sandbox.sandbox_python(os.geteuid() == 0))
    allowed = {path for _, path, _ in plan}
    parents = {str(parent) for path in allowed for parent in Path(path).parents}
    private = {"/tmp", "/var", "/var/tmp", "/dev/shm"}
    stray = {p for p in seen
             if p not in allowed | parents | private and not p.startswith(("/tmp/", "/var/tmp/", "/dev/shm/"))}
    assert not stray, stray
    assert {"/etc/passwd", "/proc", "/sys", "/home", "/root", str(REPO)}.isdisjoint(seen)
    # and the code still has its whole standard library, its extension modules and their libraries
    code = ("import ctypes, decimal, hashlib, json, lzma, sqlite3, ssl, subprocess, sys, zlib\n"
            "out = subprocess.run([sys.executable, '-c', 'print(6 * 7)'], capture_output=True, text=True).stdout\n"
            "print(out, end='')")
    assert run_python(code).stdout == "42\n"


def test_without_a_private_root_a_warning_is_logged_once_and_runs_go_on(monkeypatch, caplog, outside_file, host_file):
    python = sandbox.sandbox_python(os.geteuid() == 0)
    plan, _ = sandbox.root_plan(python)
    if plan is None or not run_python("").private_root:
        pytest.skip("no private root on this machine to take away")
    # a real failure inside the launcher: a bind mount of a path that does not exist
    broken = [("file", "/nonexistent-tether-path/lib.so", ""), *plan]
    monkeypatch.setattr(sandbox, "root_plan", lambda _: (broken, None))
    monkeypatch.setattr(sandbox, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="rewards.sandbox"):
        runs = [_explore(outside_file, walk=False, extra=(host_file,)) for _ in range(2)]
    readme = str(REPO / "README.md")
    for r, _, outcome in runs:
        assert not r.private_root and r.private_tmp  # /tmp is still private; the rest is the host's tree
        assert outcome["/etc/passwd"] == outcome[host_file] == "read"
        assert outcome[outside_file] == "refused"  # under /tmp, which the private tmpfs covers
        # the project's files likewise, unless the repository itself lies under one of the private mounts
        assert outcome[readme] == ("refused" if _under_private_mount(REPO) else "read")
    warnings = [rec.getMessage() for rec in caplog.records if "private root not set up" in rec.getMessage()]
    assert len(warnings) == 1 and "/nonexistent-tether-path" in warnings[0], warnings


def test_the_private_root_as_an_unprivileged_user(outside_file):
    """Not root: the private root is built inside an unprivileged user namespace (bind mounts keep
    the host's locked mount flags). Runs the sandbox as `nobody` under the system python3."""
    python = "/usr/bin/python3"
    if os.geteuid() != 0 or not shutil.which("setpriv") or not os.path.exists(python):
        pytest.skip("needs root (to become nobody), setpriv and /usr/bin/python3")
    script = (
        f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
        "from rewards.sandbox import run_python\n"
        f"r = run_python({f'print(open({outside_file!r}).read())'!r})\n"
        "print(r.private_uid, r.private_tmp, r.private_root, r.returncode, r.stderr.strip().splitlines()[-1:])\n"
    )
    out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, "-I", "-c", script],
                         capture_output=True, text=True, timeout=60, cwd="/tmp")
    assert out.returncode == 0, out.stderr
    private_uid, private_tmp, private_root, returncode, last_error = out.stdout.split(maxsplit=4)
    if private_tmp == "False":
        pytest.skip("this kernel refuses unprivileged user namespaces")
    assert (private_uid, private_root, returncode) == ("False", "True", "1")
    assert "FileNotFoundError" in last_error


def test_an_infinite_loop_times_out():
    start = time.monotonic()
    r = run_python("while True:\n    pass", timeout_s=1.0)
    assert r.timed_out and r.killed_reason == "timeout" and r.returncode is not None and r.returncode < 0
    assert time.monotonic() - start < 1.0 + 3.0


def test_output_is_capped():
    r = run_python("while True:\n    print('x' * 1000)", max_output_bytes=10_000)
    assert r.killed_reason == "output_limit" and len(r.stdout) <= 10_000


def test_children_left_behind_are_killed():
    code = (
        "import os, subprocess, sys, time\n"
        "print(os.getuid(), flush=True)\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "if os.fork() == 0:\n"
        "    os.setsid()  # leaves the process group\n"
        "    time.sleep(60)\n"
    )
    start = time.monotonic()
    r = run_python(code, timeout_s=5.0)
    assert r.returncode == 0 and time.monotonic() - start < 5.0
    if r.private_uid:
        assert live_processes_of(int(r.stdout.split()[0])) == []


# ---- the code task ----

_SOLUTIONS = {
    "add": "def add(a, b):\n    return a + b",
    "is_palindrome": "def is_palindrome(s):\n    return s == s[::-1]",
    "fizzbuzz": ("def fizzbuzz(n):\n    return ['FizzBuzz' if i % 15 == 0 else 'Fizz' if i % 3 == 0 else "
                 "'Buzz' if i % 5 == 0 else str(i) for i in range(1, n + 1)]"),
    "factorial": "import math\ndef factorial(n):\n    return math.factorial(n)",
    "fibonacci": "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a",
    "reverse_words": "def reverse_words(s):\n    return ' '.join(reversed(s.split()))",
    "count_vowels": "def count_vowels(s):\n    return sum(c in 'aeiouAEIOU' for c in s)",
    "running_sum": "import itertools\ndef running_sum(xs):\n    return list(itertools.accumulate(xs))",
    "is_prime": "def is_prime(n):\n    return n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1))",
    "flatten": "def flatten(xss):\n    return [x for xs in xss for x in xs]",
    "char_count": "from collections import Counter\ndef char_count(s):\n    return dict(Counter(s))",
    "gcd": "import math\ndef gcd(a, b):\n    return math.gcd(a, b)",
}


def test_every_problem_is_solvable_and_the_splits_are_seeded():
    train, eval_ = make_code_splits(seed=0, num_eval=3)
    assert len(train) == len(_PROBLEMS) - 3 and len(eval_) == 3
    assert make_code_splits(0, 3) == (train, eval_) and make_code_splits(1, 3) != (train, eval_)
    for problem in train + eval_:
        name = problem.question.split("`")[1].split("(")[0]
        response = f"Sure:\n```python\n{_SOLUTIONS[name]}\n```\nThis works."
        assert python_exec_reward(response, problem.answer) == 1.0, name
    with pytest.raises(ValueError, match="task.num_eval=12"):
        make_code_splits(seed=0, num_eval=12)


@pytest.mark.parametrize("code", [
    "def add(a, b):\n    return a - b",  # wrong
    "def add(a, b):\n    return a + b +",  # syntax error
    "def add(a, b):\n    return a + b\nimport sys\nsys.exit(0)",  # exits before the tests run
    "class Yes:\n    def __eq__(self, other):\n        return True\ndef add(a, b):\n    return Yes()",  # equal to all
    "def add(a, b):\n    while True:\n        pass",  # never returns
])
def test_python_exec_reward_rejects(code, monkeypatch):
    monkeypatch.setattr(code_task, "SANDBOX_TIMEOUT_S", 1.0)  # the endless one ends sooner
    tests = "assert _same(add(2, 3), 5)\nassert _same(add(-1, 1), 0)"
    assert python_exec_reward(code, tests) == 0.0


def test_python_exec_reward_accepts_a_correct_solution():
    assert python_exec_reward("def add(a, b):\n    return a + b", "assert _same(add(2, 3), 5)") == 1.0


@pytest.mark.parametrize("response,code", [
    ("x = 1", "x = 1"),  # no fence: the whole text
    ("Here:\n```python\nx = 1\n```\nand\n```py\ny = 2\n```", "x = 1\n\ny = 2"),
    ("```\nx = 1\n```", "x = 1"),  # unlabelled
    ("```text\nnot code\n```\n```python\nx = 1\n```", "x = 1"),  # a python block wins over others
    ("```python\nx = 1\ny = 2", "x = 1\ny = 2"),  # cut off at the token limit
])
def test_extract_code(response, code):
    assert extract_code(response) == code
