"""Starts every user process in the agent's container, as the agent user.

Stdlib only. The host runs it as ``<python> -I -S -c <userfilter.py + this file> MODE ...``
(no file to plant or replace). Before anything else it installs ``userfilter``'s
seccomp filter, so no agent process has more kernel surface than a plain
``--cap-drop ALL`` container; if that fails, nothing runs (exit 126).

Modes:
  run TIMEOUT ARGV...  the command in its own session; past TIMEOUT seconds every
                       process it started is killed, ``setsid`` ones included (this
                       process is their subreaper, so none can slip out of its tree)
  write PATH           stdin into PATH
  extract DIR          a tar on stdin (directories and regular files only) into DIR
Writes happen with the agent's own rights, so a path the agent swapped for a symlink
leads only where the agent could write anyway.
"""

import contextlib
import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import time

PR_SET_CHILD_SUBREAPER = 36

# The host hands the command's loader variables over in this one (JSON) and keeps them
# out of our own environment: the loader acts on them before the filter is in place.
CHILD_ENV = "AGENTBOX_CHILD_ENV"
LOADER_PREFIXES = ("LD_", "MALLOC_")
# glibc's unsecvars.h: what it drops for setuid programs.
LOADER_NAMES = frozenset(
    ("GCONV_PATH", "GETCONF_DIR", "GLIBC_TUNABLES", "HOSTALIASES", "LOCALDOMAIN", "LOCPATH",
     "MALLOC_TRACE", "NIS_PATH", "NLSPATH", "RESOLV_HOST_CONF", "RES_OPTIONS", "TMPDIR", "TZDIR")
)  # fmt: skip


def is_loader_variable(name):
    """True for a variable the dynamic loader or libc acts on before any of our code."""
    return name in LOADER_NAMES or name.startswith(LOADER_PREFIXES)


def child_env(environ):
    """The command's environment: ours, plus the loader variables meant for it alone."""
    env = dict(environ)
    handed = json.loads(env.pop(CHILD_ENV, "") or "{}")
    env.update({str(k): str(v) for k, v in handed.items()})
    return env


def parent_of(pid):
    """``pid``'s parent (0 when it is gone); a zombie still has one."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return int(fh.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def descendants(root):
    """Every live process below ``root`` (via /proc: our own uid's are visible to us)."""
    children = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                ppid = int(fh.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(name))
    found, todo = [], [root]
    while todo:
        for pid in children.get(todo.pop(), ()):
            found.append(pid)
            todo.append(pid)
    return found


def kill_tree(group=0, limit=10.0):
    """Stop, then SIGKILL and reap, everything below us until nothing is left.

    SIGSTOP first: a stopped process cannot fork, so a fork bomb cannot replace its
    members faster than they die (SIGKILL alone races it, for seconds on a busy pids
    cgroup). A pass that finds nobody new means the whole tree is frozen. Bounded by
    ``limit`` seconds; it returns early once nothing is left. ``group``, the command's
    process group, is stopped in one call first: a starved runner (a bomb's members
    share its CPU) would otherwise take many passes just to reach them one by one.
    Returns (processes killed, processes still there at the end).
    """
    me, end, killed = os.getpid(), time.monotonic() + limit, set()
    while time.monotonic() < end:
        if group and parent_of(group) == me:
            # Only while its leader is our unreaped child: until then no other group can
            # have that id (a stopped stranger would never be killed).
            with contextlib.suppress(OSError):
                os.killpg(group, signal.SIGSTOP)
        frozen = set()
        while time.monotonic() < end:
            # A member caught mid-fork leaves a child that the next pass stops.
            new = [pid for pid in descendants(me) if pid not in frozen]
            if not new:
                break
            for pid in new:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGSTOP)
            frozen.update(new)
        for pid in frozen.union(descendants(me)):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
        reap()
        if not descendants(me):
            return len(killed), 0
        time.sleep(0.005)
    return len(killed), len(descendants(me))


def reap():
    """Collect every child that has ended (a killed one reparented to us included)."""
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                return
        except ChildProcessError:
            return


def run(limit, argv):
    import ctypes  # here, not at the top: without it install() must fail first (exit 126)

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        # The root step probes this; here again, so no command runs with a timeout that
        # its setsid grandchildren could outlive.
        why = os.strerror(ctypes.get_errno())
        sys.stderr.write(f"agentbox: cannot become the command's subreaper ({why}); no run\n")
        return 126
    try:
        proc = subprocess.Popen(argv, start_new_session=True, env=child_env(os.environ))
    except (FileNotFoundError, NotADirectoryError):
        sys.stderr.write(f"agentbox: {argv[0]}: command not found (no such file or directory)\n")
        return 127  # the shell's code for a missing command
    except OSError as exc:  # EACCES, ENOEXEC, ...: there, but not something exec can start
        why = "not executable" if exc.errno == errno.EACCES else exc.strerror
        sys.stderr.write(f"agentbox: {argv[0]}: cannot execute ({why})\n")
        return 126
    fired = []

    def expire(*_):
        start = time.monotonic()
        fired.append((*kill_tree(proc.pid), time.monotonic() - start))

    # A blocking wait plus SIGALRM sees the command's end at once (Popen.wait with a
    # timeout polls, up to 50 ms late on every command).
    signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(limit, 1e-3))
    code = proc.wait()
    signal.setitimer(signal.ITIMER_REAL, 0)
    if fired:
        killed, _, seconds = fired[0]
        killed += kill_tree()[0]  # the group's leader is reaped: its id may be anyone's
        left = len(descendants(os.getpid()))
        what = f"{killed} processes stopped and killed in {seconds:.2f}s"
        if left:
            what += f"; {left} still there, the pids limit bounds them"
        sys.stderr.write(f"agentbox: command timed out after {limit:g}s and was killed ({what})\n")
        return 124
    return code


def extract(dest):
    os.makedirs(dest, exist_ok=True)
    with tarfile.open(fileobj=sys.stdin.buffer, mode="r|") as tar:
        for member in tar:
            parts = [p for p in member.name.split("/") if p not in ("", ".")]
            if not parts or ".." in parts or not (member.isdir() or member.isreg()):
                continue
            path = os.path.join(dest, *parts)
            if member.isdir():
                os.makedirs(path, exist_ok=True)
                continue
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open_regular(path) as out:
                shutil.copyfileobj(tar.extractfile(member), out)
            os.chmod(path, member.mode & 0o777)
    return 0


def open_regular(path):
    """``path`` opened for writing, refused unless it is a regular file (a FIFO the agent
    put there would otherwise block the test forever)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NONBLOCK, 0o644)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path} is not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "wb")


def write(path):
    with open_regular(path) as out:
        shutil.copyfileobj(sys.stdin.buffer, out)
    return 0


def runner_main(argv):
    # The host never lets these reach us; if one did, the loader already acted on it
    # without the filter: refuse rather than run the command as if nothing happened.
    leaked = sorted(n for n in os.environ if is_loader_variable(n))
    if leaked:
        sys.stderr.write(f"agentbox: loader variables reached the runner ({', '.join(leaked)}); "
                         "nothing was run\n")  # fmt: skip
        return 126
    try:
        install()  # noqa: F821 - defined by userfilter.py, which the host puts first
    except Exception as exc:
        sys.stderr.write(f"agentbox: cannot restrict the agent's system calls ({exc}); "
                         "nothing was run\n")  # fmt: skip
        return 126
    mode, args = argv[1], argv[2:]
    try:
        if mode == "run":
            return run(float(args[0]), args[1:])
        if mode == "extract":
            return extract(args[0])
        if mode == "write":
            return write(args[0])
    except (OSError, tarfile.TarError) as exc:
        sys.stderr.write(f"agentbox: {mode} failed: {exc}\n")
        return 1
    sys.stderr.write(f"agentbox: unknown runner mode {mode!r}\n")
    return 2


if __name__ == "__main__":
    sys.exit(runner_main(sys.argv))
