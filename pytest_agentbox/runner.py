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
import os
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import time

PR_SET_CHILD_SUBREAPER = 36


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


def kill_tree():
    """SIGKILL and reap everything below us until nothing is left (bounded rounds)."""
    for _ in range(100):
        pids = descendants(os.getpid())
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        while True:
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break
        time.sleep(0.01)


def run(limit, argv):
    import ctypes  # here, not at the top: without it install() must fail first (exit 126)

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    proc = subprocess.Popen(argv, start_new_session=True)
    fired = []

    def expire(*_):
        fired.append(1)
        kill_tree()

    # A blocking wait plus SIGALRM sees the command's end at once (Popen.wait with a
    # timeout polls, up to 50 ms late on every command).
    signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(limit, 1e-3))
    code = proc.wait()
    signal.setitimer(signal.ITIMER_REAL, 0)
    if fired:
        kill_tree()
        sys.stderr.write(f"agentbox: command timed out after {limit:g}s and was killed\n")
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
