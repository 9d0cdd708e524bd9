"""Root-only hardening of a fresh sandbox, run before any user code.

This file is stdlib-only on purpose: the host runs it inside the sandbox as root, its
source and then one JSON line of options given on stdin (see
:func:`pytest_agentbox.backends.tools.tool_command`). It prints one JSON line
describing what it did. The host side (:func:`check`) turns that into pass, warning or a fail-closed
:class:`~pytest_agentbox.errors.HardeningError`.

Steps, in order:
0. probe that a process may become a child subreaper (every runner is one); where it
   cannot (gVisor), stop here: the host refuses the sandbox;
1. make sure the unprivileged user exists (create it when the image lacks one), make the
   root-only 0700 tools directory (unpredictable name) holding the key proxy's and the
   egress forwarder's sources, and the agent's app directory;
2. delete sudo, su and friends, strip every setuid/setgid bit on the root file system
   (the host scans each image once per process and passes the list to later sandboxes),
   then read each file back and report anything left;
3. remount ``/proc`` with ``hidepid=2`` and read ``/proc/mounts`` back to verify it;
4. write the CA bundle when extra CAs are given (the fake upstream's test CA);
5. report the interpreter every later step runs (absolute, and only if root owns it and
   every directory above it, so nothing but root can swap it);
6. remount the image's VOLUME directories read-only (the engine fills them from the
   image onto the host's disk, outside every cap), then ``/``, last: from here on the
   agent can write only to its home and ``/tmp`` (size-capped tmpfs volumes, filled
   from the image's home in step 1) and the engine's 64m ``/dev/shm``.

Every program it runs is named by absolute path, never found through PATH.
"""

from __future__ import annotations

import base64
import io
import json
import os
import stat
import subprocess
import sys
import tarfile

ESCALATION_TOOLS = ("sudo", "sudoedit", "su", "doas", "pkexec", "runuser", "newgrp", "sg")
BIN_DIRS = ("/bin", "/sbin", "/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin")


def _program(name: str) -> str:
    """The first ``name`` in the standard directories (absolute), or "" when there is none."""
    for d in ("/usr/bin", "/bin", "/usr/sbin", "/sbin"):
        if os.access(os.path.join(d, name), os.X_OK):
            return os.path.join(d, name)
    return ""


def _root_only(path: str) -> str:
    """Why ``path`` could be swapped by someone other than root ("" when it cannot)."""
    path = os.path.realpath(path)
    while True:
        st = os.lstat(path)
        if st.st_uid != 0 or st.st_mode & 0o022:
            return f"{path} is owned by uid {st.st_uid} with mode {stat.filemode(st.st_mode)}"
        if path == "/":
            return ""
        path = os.path.dirname(path)


SKIP_TREES = ("/proc", "/sys", "/dev")


def _ensure_user(name: str, uid: int) -> dict:
    taken = set()
    with open("/etc/passwd", encoding="utf-8") as fh:
        for line in fh:
            parts = line.rstrip("\n").split(":")
            if len(parts) >= 7 and parts[0] == name:  # uid 0 is refused by check()
                return {"name": name, "uid": int(parts[2]), "gid": int(parts[3]), "home": parts[5]}
            if len(parts) >= 3 and parts[2].isdigit():
                taken.add(int(parts[2]))
    while uid in taken:  # e.g. "ubuntu" or "node" already holds 1000
        uid += 1
    home = "/home/" + name
    # Append rather than call useradd: minimal and distroless-ish images often lack it.
    with open("/etc/passwd", "a", encoding="utf-8") as fh:
        fh.write(f"{name}:x:{uid}:{uid}::{home}:/bin/sh\n")
    with open("/etc/group", "a", encoding="utf-8") as fh:
        fh.write(f"{name}:x:{uid}:\n")
    if os.path.exists("/etc/shadow"):
        with open("/etc/shadow", "a", encoding="utf-8") as fh:
            fh.write(f"{name}:!:19000::::::\n")
    os.makedirs(home, mode=0o750, exist_ok=True)  # chowned by _make_dirs
    return {"name": name, "uid": uid, "gid": uid, "home": home, "created": True}


def _seed_home(home: str, seed: str, user: dict) -> dict:
    """Fill the empty home volume with the image's own home (a tar the host read from it).

    The tar comes from the untouched image, through the engine, before anything ran here;
    it is still unpacked defensively: plain names only, no device or fifo, no setuid or
    setgid bit, nothing followed through a link. Directory owners and modes are applied
    last, deepest first: root holds no CAP_DAC_OVERRIDE, so it must not lock itself out.
    """
    dirs = []
    top = None
    files = 0
    if seed:
        with tarfile.open(fileobj=io.BytesIO(base64.b64decode(seed)), mode="r:") as tar:
            for member in tar:
                parts = member.name.split("/")
                if not parts or parts[0] in ("", ".", "..") or ".." in parts or "" in parts[1:]:
                    continue
                if len(parts) == 1:  # the home itself
                    top = member if member.isdir() else top
                    continue
                path = os.path.join(home, *parts[1:])
                if os.path.realpath(os.path.dirname(path)) != os.path.dirname(path):
                    continue  # under a link the tar made: it could point anywhere
                mode = member.mode & 0o1777
                if member.isdir():
                    os.mkdir(path, 0o700)
                    dirs.append((path, member))
                elif member.issym():
                    os.symlink(member.linkname, path)
                    os.chown(path, member.uid, member.gid, follow_symlinks=False)
                elif member.isreg() or member.islnk():
                    src = tar.extractfile(member)
                    if src is None:
                        continue
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                    with os.fdopen(fd, "wb") as dst:
                        while chunk := src.read(1 << 20):
                            dst.write(chunk)
                        os.fchown(dst.fileno(), member.uid, member.gid)
                        os.fchmod(dst.fileno(), mode)
                    os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)
                    files += 1
    for path, member in reversed(dirs):
        os.chown(path, member.uid, member.gid, follow_symlinks=False)
        os.chmod(path, member.mode & 0o1777)
    if top is not None:
        uid, gid, mode = top.uid, top.gid, top.mode & 0o1777
    else:  # the image has no such directory: the user's own, as a created user's is
        uid, gid, mode = user["uid"], user["gid"], 0o750
    os.chown(home, uid, gid)
    os.chmod(home, mode)
    return {"seeded_files": files}


def _remount_read_only(where: str, extra: str = "") -> str:
    """Remount ``where`` read-only (this mount only: the engine's own view stays
    writable); "" when the flag reads back set, else why not. Read back rather than
    trusted: a flag the agent, holding no capability, cannot clear (a user namespace it
    might make locks inherited flags)."""
    error = ""
    try:
        opts = f"remount,bind,ro{extra}"
        proc = subprocess.run([_program("mount"), "-o", opts, where], capture_output=True)
        error = proc.stderr.decode("utf-8", "replace").strip()
    except OSError as exc:
        error = f"no mount program ({exc})"
    return "" if os.statvfs(where).f_flag & os.ST_RDONLY else (error or "not applied")


def _read_only_root() -> dict:
    """Remount ``/`` read-only, last: from then on the agent writes only where capped.

    Where that is refused, what ``/`` is (file system type) and whether the kernel is
    gVisor's (its own boot line): the host accepts a writable root only as gVisor's
    in-memory overlay on a runtime it knows keeps the root in memory.
    """
    error = _remount_read_only("/")
    out = {"root_readonly": not error, "root_readonly_error": error}
    if error:
        out["root_fs"] = _mount_on_top("/")[0]
    return out


def _mount_on_top(where: str) -> tuple[str, str]:
    """(file system type, options) of the mount on top at ``where``; ("", "") if none."""
    found = ("", "")
    with open("/proc/mounts", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) > 3 and parts[1] == where:
                found = (parts[2], parts[3])  # a later line is mounted over an earlier
    return found


def _close_root_writes(user: dict, skip: list) -> dict:
    """Where ``/`` stays writable (gVisor's in-memory root): nothing on it for the agent.

    World-writable files and directories (``/var/tmp`` and the like) lose that bit, read
    back; what the agent's own uid or gid may write is reported for the host to refuse.
    The agent's writes then land only in its capped home and ``/tmp`` and the engine's
    64m ``/dev/shm``, as under a read-only root: a full place answers "no space left",
    it never grows the sandbox's memory until the kernel kills it.
    """
    find = _program("find")
    if not find:
        return {"root_agent_writable": ["(no find program to check the root file system)"]}
    uid, gid = str(user["uid"]), str(user["gid"])
    prune = []
    for where in skip:
        prune += ["-path", where, "-prune", "-o"]
    test = ["(", "-perm", "-0002", "-o", "-user", uid]
    test += ["-o", "(", "-group", gid, "-perm", "-0020", ")", ")"]
    out = subprocess.run(
        [find, "/", "-xdev", *prune, "!", "-type", "l", *test, "-print0"], capture_output=True
    ).stdout
    left, closed = [], []
    for raw in out.split(b"\0"):
        path = raw.decode("utf-8", "surrogateescape")
        if not path:
            continue
        try:
            st = os.lstat(path)
            if st.st_mode & 0o002:
                os.chmod(path, stat.S_IMODE(st.st_mode) & ~0o002)
                closed.append(path)
                st = os.lstat(path)
            own = st.st_uid == user["uid"] or (st.st_gid == user["gid"] and st.st_mode & 0o020)
            if st.st_mode & 0o002 or own:
                left.append(path)
        except OSError:
            continue  # gone: nothing left to write to
    return {"root_agent_writable": left, "root_closed": closed}


def _subreaper() -> dict:
    """Whether a process here can become a child subreaper, as every runner must.

    A command's ``setsid`` grandchildren reparent to the runner only through it; without
    it they go to init, out of reach of ``run(timeout=)`` (gVisor refuses it: EINVAL).
    Probed on this process (it exits soon), read back with PR_GET_CHILD_SUBREAPER.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
            return {"subreaper": False, "subreaper_error": os.strerror(ctypes.get_errno())}
        flag = ctypes.c_int(0)
        libc.prctl(37, ctypes.byref(flag), 0, 0, 0)  # PR_GET_CHILD_SUBREAPER
    except (ImportError, OSError, AttributeError) as exc:
        return {"subreaper": False, "subreaper_error": f"no usable ctypes/libc ({exc})"}
    ok = flag.value == 1
    return {"subreaper": ok, "subreaper_error": "" if ok else "set, but reads back unset"}


def _gvisor() -> bool:
    """Whether this kernel is gVisor's: its log starts with its own boot line."""
    dmesg = _program("dmesg")
    if not dmesg:
        return False
    try:
        log = subprocess.run([dmesg], capture_output=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return b"Starting gVisor" in log[:4096]


def _read_only_volumes(volumes: list) -> dict:
    """Remount each of the image's VOLUMEs read-only, nosuid, nodev.

    The engine fills them from the image onto the host's disk, outside every cap: the
    agent may read what the image put there, never write (its home and /tmp are the
    capped places).
    """
    dirs = [w for w in volumes if os.path.isdir(w) and not os.path.islink(w)]
    errors = {w: _remount_read_only(w, ",nosuid,nodev") for w in dirs}
    return {"volumes_writable": {w: e for w, e in errors.items() if e}}


def _privileged_files(roots: list) -> list:
    """Every setuid/setgid regular file on the root file system and the image's volumes."""
    find = _program("find")
    if find:
        # find(1) walks ~4x faster than Python; POSIX -perm forms so busybox works too.
        # Its exit status is ignored: unreadable dirs (a 0700 home) are skipped either way.
        out = subprocess.run(
            [
                find,
                *roots,
                "-xdev",
                "-type",
                "f",
                "(",
                "-perm",
                "-4000",
                "-o",
                "-perm",
                "-2000",
                ")",
                "-print0",
            ],
            capture_output=True,
        ).stdout
        return [p.decode("utf-8", "surrogateescape") for p in out.split(b"\0") if p]
    found = []
    for root in roots:
        root_dev = os.lstat(root).st_dev
        for dirpath, dirnames, filenames in os.walk(root):
            if dirpath in SKIP_TREES:
                dirnames[:] = []
                continue
            for name in filenames:
                path = os.path.join(dirpath, name)
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                if st.st_dev == root_dev and stat.S_ISREG(st.st_mode) and st.st_mode & 0o6000:
                    found.append(path)
    return found


def _strip_privileges(known: list | None, volumes: list) -> dict:
    removed = []
    for d in BIN_DIRS:
        for tool in ESCALATION_TOOLS:
            path = os.path.join(d, tool)
            if os.path.lexists(path) and not os.path.islink(os.path.dirname(path)):
                try:
                    os.unlink(path)
                    removed.append(path)
                except OSError:
                    pass
    # ``known`` is this image's earlier scan: a fresh container's root file system is its
    # image's, and nothing has run in it before this script, so the scan need not repeat.
    roots = ["/", *[v for v in volumes if os.path.isdir(v) and not os.path.islink(v)]]
    found = _privileged_files(roots) if known is None else [p for p in known if os.path.lexists(p)]
    stripped, left = [], []
    for path in found:
        try:
            os.chmod(path, stat.S_IMODE(os.lstat(path).st_mode) & ~0o6000)
            stripped.append(path)
        except OSError:
            pass
        # Read back rather than trust chmod: a read-only layer or an odd file system
        # can leave the bit in place, and then the sandbox must not be used.
        try:
            if os.lstat(path).st_mode & 0o6000:
                left.append(path)
        except OSError:
            pass
    in_volumes = [p for p in stripped if any(p.startswith(v.rstrip("/") + "/") for v in volumes)]
    return {
        "removed": removed,
        "found": found,
        "scanned": known is None,
        "stripped": stripped,
        "left": left,
        "volume_setid": in_volumes,
    }


def _hidepid() -> dict:
    mount = _program("mount")
    try:
        proc = subprocess.run([mount, "-o", "remount,hidepid=2", "/proc"], capture_output=True)
        error = proc.stderr.decode("utf-8", "replace").strip()
    except OSError as exc:  # no mount binary in this image
        error = f"no mount program ({exc})"
    opts = _mount_on_top("/proc")[1]
    # The kernel reports hidepid=2 as "invisible" since 5.8.
    ok = any(o in ("hidepid=2", "hidepid=invisible") for o in opts.split(","))
    return {"hidepid": ok, "hidepid_error": "" if ok else (error or "not applied")}


def _make_dirs(opts: dict, user: dict) -> dict:
    """Our root-only tools directory with the daemons' sources, and the agent's app/."""
    os.mkdir(opts["tools_dir"], 0o700)
    for name, source in (opts.get("tools") or {}).items():
        path = os.path.join(opts["tools_dir"], os.path.basename(name))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o700)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(source)
    made = False
    if opts.get("app"):
        home, app = user["home"], os.path.join(user["home"], opts["app"])
        # Root holds no CAP_DAC_OVERRIDE, so it opens the user's home for a moment with
        # CAP_FOWNER (no user code runs yet) instead of paying for an archive upload.
        try:
            mode = stat.S_IMODE(os.lstat(home).st_mode)
            os.chmod(home, mode | 0o003)  # noqa: S103 - restored below, nothing else runs yet
            try:
                os.mkdir(app, 0o755)
                os.chown(app, user["uid"], user["gid"])
                made = True
            finally:
                os.chmod(home, mode)
        except OSError:  # the host uploads it instead
            pass
    if user.get("created"):  # only now: once it is the user's, root may not write in it
        os.chown(user["home"], user["uid"], user["gid"])
    return {"app": made}


def _runner_python(where: str, python: str) -> dict:
    """An execute-only copy of the interpreter for the user-command runner.

    The kernel marks a process that execs a file it cannot read as not dumpable, before
    any of its code runs: a leftover agent process can then neither ptrace a starting
    runner nor write its memory (same uid, no Yama needed) in the moment before the
    runner's seccomp filter is installed. ``pyvenv.cfg`` points the copy at the
    interpreter's own standard library.
    """
    os.mkdir(where, 0o711)
    os.chmod(where, 0o711)  # noqa: S103 - others may traverse it, not list or write it
    copy = os.path.join(where, "python3")
    with open(python, "rb") as src:
        fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o700)
        with os.fdopen(fd, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
    os.chmod(copy, 0o711)  # noqa: S103 - execute-only is the point: not readable
    fd = os.open(os.path.join(where, "pyvenv.cfg"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(f"home = {os.path.dirname(python)}\n")
    os.chmod(os.path.join(where, "pyvenv.cfg"), 0o644)
    probe = subprocess.run([copy, "-I", "-S", "-c", "import ctypes, tarfile"], capture_output=True)
    if probe.returncode != 0 or probe.stderr:
        why = probe.stderr.decode("utf-8", "replace").strip()[-300:] or f"exit {probe.returncode}"
        return {"runner_python": "", "runner_python_error": why}
    return {"runner_python": copy}


def _install_ca(ca: dict) -> dict:
    """One CA bundle the agent can read: the system CAs plus the extra ones (test CAs)."""
    data = b""
    for path in ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt"):
        try:
            with open(path, "rb") as fh:
                data += fh.read().rstrip(b"\n") + b"\n"
        except OSError:
            pass
    fd = os.open(ca["path"], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data + ca["pem"].encode())
    os.chmod(ca["path"], 0o644)  # whatever the umask
    return {"ca_bundle": ca["path"]}


def main() -> int:
    opts = json.loads(sys.stdin.readline())  # after this file's own source, see the docstring
    result = {"user": _ensure_user(opts["user"], int(opts["uid"]))}
    result["gvisor"] = _gvisor()
    result.update(_subreaper())
    if not result["subreaper"]:
        # The host refuses this sandbox whatever else holds: no scan (under gVisor one
        # walk of / takes seconds), nothing changed.
        print(json.dumps(result))
        return 0
    storage = dict(opts.get("storage") or {})
    if storage.get("home") and storage["home"] == result["user"]["home"]:
        storage.update(_seed_home(storage["home"], storage.pop("seed", ""), result["user"]))
    storage.pop("seed", None)
    result.update(_make_dirs(opts, result["user"]))
    result.update(_strip_privileges(opts.get("setid"), list(opts.get("volumes") or [])))
    result.update(_hidepid())
    if opts.get("ca"):
        result.update(_install_ca(opts["ca"]))
    result["tools_dir"] = opts["tools_dir"]
    result["python"] = os.path.realpath(sys.executable)
    result["python_unsafe"] = _root_only(sys.executable)
    result.update(_runner_python(opts["tools_dir"] + "-py", result["python"]))
    # Names only (no values): the host judges them against the runner's loader list.
    result["env_names"] = sorted(os.environ)
    if storage:
        storage.update(_read_only_volumes(list(opts.get("volumes") or [])))
        storage.update(_read_only_root())
        if not storage["root_readonly"] and result["gvisor"]:
            home, skip = storage.get("home") or "", [opts["tools_dir"], "/tmp"]
            storage.update(_close_root_writes(result["user"], [*skip, home] if home else skip))
        result["storage"] = storage
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())


# ---- host side -------------------------------------------------------------------


def check(
    result: dict,
    *,
    keys_in_use: bool,
    image: str = "",
    gvisor: bool = False,
    root_in_memory: bool = False,
) -> list[str]:
    """Judge the in-sandbox report; returns warnings, raises when the sandbox may not be used.

    Fail closed: a setuid/setgid file that could not be stripped always aborts; a
    ``/proc`` without ``hidepid=2`` aborts when keys are in use (the key proxy's process
    would be visible to the agent) and is only a warning otherwise. A root file system
    left writable, or a user whose home is not the capped home volume, always aborts:
    the agent could otherwise write past its storage cap onto the host's disk. The one
    writable root accepted is gVisor's in-memory overlay, and only when the host, too,
    says the box's runtime keeps its root in memory (``root_in_memory``): its writes
    are then charged to the sandbox's memory limit, never to the host's disk. The box's
    word that it runs under gVisor counts only where the host's runtime is gVisor.
    """
    from pytest_agentbox.errors import HardeningError

    if result.get("gvisor") and not gvisor:
        raise HardeningError(
            f"image {image!r}: the root setup step found a gVisor kernel log, but the engine "
            "does not run this box under gVisor (runsc). Something in the image fakes it "
            "(its dmesg); use an image that does not."
        )

    if not result.get("subreaper"):
        raise HardeningError(
            "sandbox hardening failed closed: this kernel refuses PR_SET_CHILD_SUBREAPER "
            f"({result.get('subreaper_error') or 'unknown reason'}), so run(timeout=) could "
            "not end the processes a command moves into a session of their own (setsid)."
            + (
                " gVisor (runsc) lacks it; run such tests under runc."
                if result.get("gvisor")
                else ""
            )
        )
    user = result.get("user") or {}
    if user.get("uid") == 0:
        raise HardeningError(
            f"image {image!r}: the sandbox user {user.get('name')!r} has uid 0 (root), so "
            "user code would run as root. Use another user name (SandboxConfig.user) or an "
            "image whose user is not root."
        )
    if result.get("python_unsafe"):
        raise HardeningError(
            f"image {image!r}: its python3 could be replaced by a non-root user "
            f"({result['python_unsafe']}); every root step and the seccomp filter of user "
            "code start through it. Use an image whose python3 and its directories are "
            "root-owned and not group- or world-writable."
        )
    from pytest_agentbox.inside.runner import is_loader_variable

    loader = [n for n in result.get("env_names") or [] if is_loader_variable(n)]
    if loader:
        # The host unsets them for every root exec; one that still arrives means the
        # engine passed the image's ENV through regardless: nothing here can be trusted.
        raise HardeningError(
            f"image {image!r}: loader variables ({', '.join(loader)}) reached the root setup "
            "step although the host unsets them; the dynamic loader acts on them before any "
            "of the step's code. Remove them from the image's ENV."
        )
    if not result.get("runner_python"):
        raise HardeningError(
            f"image {image!r}: its python3 does not run from an execute-only copy "
            f"({result.get('runner_python_error', 'unknown reason')}), which keeps starting "
            "user commands safe from the agent's own leftover processes. Use an image whose "
            "python3 finds its standard library from a pyvenv.cfg (CPython 3.3+ does)."
        )
    if result.get("left"):
        raise HardeningError(
            "sandbox hardening failed: setuid/setgid files remain after stripping: "
            + ", ".join(result["left"][:10])
            + ". Use an image whose root file system is writable."
        )
    warnings = []
    if result.get("volume_setid"):
        warnings.append(
            "setuid/setgid bits stripped from files in the image's volumes: "
            + ", ".join(result["volume_setid"][:10])
        )
    if not result.get("hidepid"):
        why = result.get("hidepid_error") or "unknown reason"
        if keys_in_use:
            raise HardeningError(
                f"sandbox hardening failed closed: /proc could not be remounted with hidepid=2 "
                f"({why}) and this sandbox would hold API keys, so it was not created. The "
                "sandbox needs CAP_SYS_ADMIN for its root setup step and an engine that "
                "allows the remount (no AppArmor profile denying mount)."
                + (
                    " gVisor's /proc has no hidepid: a sandbox with keys cannot run under "
                    "gVisor (use runc for tests that declare keys)."
                    if result.get("gvisor")
                    else ""
                )
            )
        warnings.append(
            f"/proc is not mounted with hidepid=2 ({why}); no keys are in use, continuing"
        )
    storage = result.get("storage")
    if storage is not None:
        home = user.get("home")
        if home != storage.get("home"):
            raise HardeningError(
                f"image {image!r}: the sandbox user's home is {home!r}, but the sandbox's "
                f"capped writable storage is {storage.get('home')!r} (the root file system is "
                "read-only). Use an image whose user's home is /home/<user>, or another user "
                "name (SandboxConfig.user)."
            )
        if storage.get("volumes_writable"):
            where = ", ".join(f"{k} ({v})" for k, v in sorted(storage["volumes_writable"].items()))
            raise HardeningError(
                "sandbox hardening failed closed: the image's VOLUME directories could not "
                f"be made read-only: {where}; the agent could write there past its storage "
                "cap onto the host's disk. Remove the VOLUME lines from the image, or give "
                "the sandbox CAP_SYS_ADMIN for its root setup step (the default)."
            )
        if not storage.get("root_readonly") and not _memory_root(result, root_in_memory):
            if storage.get("root_agent_writable"):
                raise HardeningError(
                    "sandbox hardening failed closed: under gVisor the root file system stays "
                    "writable (in memory), and the sandbox user could write there: "
                    f"{', '.join(storage['root_agent_writable'][:10])}. Use an image that "
                    "gives the sandbox user nothing outside its home, or runc."
                )
            hint = (
                " Under gVisor, register runsc with --overlay2=root:memory (scripts/engine2 "
                "does) so that the root lives in the sandbox's memory."
                if result.get("gvisor")
                else ""
            )
            raise HardeningError(
                "sandbox hardening failed closed: the root file system could not be made "
                f"read-only ({storage.get('root_readonly_error') or 'unknown reason'}), so "
                "the agent could write past its storage cap onto the host's disk. The "
                "sandbox needs CAP_SYS_ADMIN for its root setup step and an engine that "
                "allows the remount (no AppArmor profile denying mount)." + hint
            )
        if not storage.get("root_readonly"):
            storage["mode"] = "tmpfs volumes, gVisor in-memory root closed to the agent"
    return warnings


def _memory_root(result: dict, root_in_memory: bool) -> bool:
    """A writable ``/`` that cannot reach the host's disk (both sides say so), and in
    which the agent can write nothing."""
    storage = result.get("storage") or {}
    on_top = storage.get("root_fs")
    closed = storage.get("root_agent_writable") == []
    return root_in_memory and bool(result.get("gvisor")) and on_top == "overlay" and closed
