"""userfilter.py: the seccomp filter that undoes what SYS_ADMIN adds to the engine's profile.

Real containers: the probe as uid 1000 in a plain ``--cap-drop ALL`` container and in one
with the sandbox's capabilities behind the filter must see identical verdicts. Pure
logic: the assembled BPF, run by a small interpreter, per arch and number.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import re
import secrets
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pytest_agentbox import paths
from pytest_agentbox.inside import userfilter

PROBE = (Path(__file__).parent / "probes" / "syscalls.py").read_text()
FILTER = Path(userfilter.__file__).read_text()
RUNNER = (Path(userfilter.__file__).parent / "runner.py").read_text()
SANDBOX_CAPS = ["SYS_ADMIN", "CHOWN", "FOWNER"]
ALLOW, EPERM, ENOSYS = 0x7FFF0000, 0x00050001, 0x00050026
# Fixed here, not read from userfilter: dropping an ABI there must fail these tests.
# abi: (AUDIT_ARCH_*, number bias, column in userfilter.GATED)
ABIS = {
    "x86_64": (0xC000003E, 0, 0), "x32": (0xC000003E, 1 << 30, 0), "i386": (0x40000003, 0, 1),
    "aarch64": (0xC00000B7, 0, 2), "arm": (0x40000028, 0, 3),
}  # fmt: skip
ARCH = {abi: arch for abi, (arch, _b, _c) in ABIS.items()}
GATED_NAMES = {  # what Docker 20.10's default profile allows only with CAP_SYS_ADMIN
    "syslog", "mount", "umount", "umount2", "sethostname", "setdomainname", "quotactl",
    "lookup_dcookie", "unshare", "perf_event_open", "fanotify_init", "name_to_handle_at",
    "setns", "bpf", "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick",
    "mount_setattr", "quotactl_fd",
}  # fmt: skip


def run_container(
    client: Any, image: str, argv: list[str], caps: list[str]
) -> tuple[int, str, str]:
    """argv as uid 1000, no-new-privileges, no network, ``--cap-drop ALL`` plus caps."""
    c = client.containers.create(
        image, argv, user="1000", cap_drop=["ALL"], cap_add=caps or None,
        security_opt=["no-new-privileges"], network_mode="none",
        name=paths.unique_name("probe"),
        labels=paths.Owner.current("probe-" + secrets.token_hex(4)).labels("probe"),
    )  # fmt: skip
    try:
        c.start()
        code = c.wait(timeout=60)["StatusCode"]
        out = c.logs(stdout=True, stderr=False).decode()
        return code, out, c.logs(stdout=False, stderr=True).decode()
    finally:
        with contextlib.suppress(Exception):
            c.remove(force=True)


def verdicts(result: tuple[int, str, str]) -> dict[str, str]:
    code, out, err = result
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])


def filtered(code: str) -> list[str]:
    return ["python3", "-I", "-S", "-c", FILTER + "\ninstall()\n" + code]


def test_sysadmin_container_behind_the_filter_sees_what_plain_docker_sees(
    docker_client: Any, base_image: str
) -> None:
    runs = {
        "plain": (["python3", "-c", PROBE], []),
        "filtered": (filtered(PROBE), SANDBOX_CAPS),
        "unfiltered": (["python3", "-c", PROBE], SANDBOX_CAPS),
    }
    with concurrent.futures.ThreadPoolExecutor(len(runs)) as pool:
        futures = {
            k: pool.submit(run_container, docker_client, base_image, *v) for k, v in runs.items()
        }
        got = {k: verdicts(f.result()) for k, f in futures.items()}
    plain, ours, bare = got["plain"], got["filtered"], got["unfiltered"]
    assert ours == plain
    assert len(plain) >= 30 and plain["getpid (control)"] == plain["clone plain (control)"] == "ok"
    # The probe sees the hole the filter closes: without it, SYS_ADMIN in the container's
    # set lets uid 1000 reach unshare (whatever this kernel then says) and clone3.
    for probe in ("unshare(CLONE_NEWUSER)", "unshare(0)", "clone3", "unshare x32 ABI"):
        assert bare[probe] != plain[probe], (probe, bare[probe])
    assert plain["unshare x32 ABI"] == "EPERM"  # the x32 number is denied, not a bypass


def test_runner_refuses_to_run_anything_when_the_filter_cannot_be_installed(
    docker_client: Any, base_image: str
) -> None:
    # An unusable libc, as on an image whose ctypes cannot find one: install() fails,
    # and the runner (which puts this file first) must run nothing and exit 126.
    sabotage = "import ctypes\ndef _no_libc(*a, **k):\n    raise OSError('no libc here')\n"
    sabotage += "ctypes.CDLL = _no_libc\n"
    cmd = ["run", "30", "/bin/sh", "-c", "echo THE-COMMAND-RAN"]
    src = FILTER + "\n" + RUNNER
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        py = ["python3", "-I", "-S", "-c"]
        broken = pool.submit(
            run_container, docker_client, base_image, [*py, sabotage + src, *cmd], SANDBOX_CAPS
        )
        fine = pool.submit(run_container, docker_client, base_image, [*py, src, *cmd], SANDBOX_CAPS)
        code, out, err = broken.result()
        ok_code, ok_out, ok_err = fine.result()
    assert code == 126 and "THE-COMMAND-RAN" not in out, (code, out, err)
    assert "cannot restrict the agent's system calls" in err and "no libc here" in err, err
    assert ok_code == 0 and "THE-COMMAND-RAN" in ok_out, (ok_code, ok_out, ok_err)


def _install_in_a_fresh_python(prelude: str) -> str:
    """install() in a python of its own (never in this process), after ``prelude``."""
    code = prelude + "\n" + FILTER + "\ntry:\n    install()\nexcept Exception as e:\n"
    code += "    print(type(e).__name__, e)\nelse:\n    print('INSTALLED')\n"
    r = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True,
                       timeout=30)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


@pytest.mark.parametrize(
    ("prelude", "expected"),
    [
        ("import ctypes\nctypes.CDLL = lambda *a, **k: object()", "no usable ctypes/libc"),
        ("import sys\nsys.modules['ctypes'] = None", "no usable ctypes/libc"),
        ("import ctypes\nclass L:\n    def prctl(self, *a):\n        ctypes.set_errno(22)\n"
         "        return -1\n    unshare = None\nctypes.CDLL = lambda *a, **k: L()",
         "OSError [Errno 22] seccomp filter: prctl(38) failed"),
        ("import ctypes\nclass L:\n    prctl = unshare = staticmethod(lambda *a: 0)\n"
         "ctypes.CDLL = lambda *a, **k: L()", "installed but unshare(0) was not refused"),
        ("import threading, time\nthreading.Thread(target=time.sleep, args=(3,), daemon=True)"
         ".start()", "must run before any thread starts"),
    ],
    ids=["libc-without-prctl", "no-ctypes", "prctl-fails", "filter-not-in-force", "threads"],
)  # fmt: skip
def test_install_fails_closed_with_a_readable_reason(prelude: str, expected: str) -> None:
    out = _install_in_a_fresh_python(prelude)
    assert expected in out and "INSTALLED" not in out, out


# --- pure logic: the assembled program, run instruction by instruction ----------------


def bpf_run(
    prog: list[tuple[int, int, int, int]], nr: int, arch: int, args: tuple[int, ...] = ()
) -> int:
    """A classic-BPF interpreter for the instructions seccomp filters use."""
    data = struct.pack("<iIQ6Q", nr, arch, 0, *(list(args) + [0] * 6)[:6])
    acc, pc = 0, 0
    while True:
        code, jt, jf, k = prog[pc]
        pc += 1
        if code == 0x20:  # ld [k]
            acc = struct.unpack_from("<I", data, k)[0]
        elif code == 0x06:  # ret k
            return k
        elif code == 0x05:  # ja
            pc += k
        elif code in (0x15, 0x45, 0x25, 0x35):  # jeq, jset, jgt, jge
            hit = {0x15: acc == k, 0x45: acc & k != 0, 0x25: acc > k, 0x35: acc >= k}[code]
            pc += jt if hit else jf
        elif code == 0x54:  # and k
            acc &= k
        elif code == 0x00:  # ld #k
            acc = k
        else:
            raise AssertionError(f"unexpected BPF opcode {code:#x}")


CLONE_NEW = {"NS": 0x20000, "CGROUP": 0x2000000, "UTS": 0x4000000, "IPC": 0x8000000,
             "USER": 0x10000000, "PID": 0x20000000, "NET": 0x40000000}  # fmt: skip
HARMLESS = {"x86_64": (0, 39), "x32": (0 | 1 << 30, 39 | 1 << 30), "i386": (3, 20),
            "aarch64": (63, 172), "arm": (3, 20)}  # read, getpid  # fmt: skip


@pytest.mark.parametrize("abi", list(ABIS))
def test_program_denies_exactly_the_gated_calls_per_arch(abi: str) -> None:
    prog = userfilter.build()
    arch, bias, col = ABIS[abi]
    assert set(userfilter.GATED) == GATED_NAMES
    expected = {n for n, nrs in userfilter.GATED.items() if nrs[col] is not None}
    assert set(userfilter.DENIED[abi]) == expected and len(expected) >= 21
    denied = set(userfilter.DENIED[abi].values())
    assert denied == {userfilter.GATED[n][col] + bias for n in expected}
    for nr in denied:
        assert bpf_run(prog, nr, arch) == EPERM, nr
    clone, clone3 = userfilter.CLONE[col] + bias, userfilter.CLONE3 + bias
    assert bpf_run(prog, clone3, arch) == ENOSYS
    for name, flag in CLONE_NEW.items():
        assert bpf_run(prog, clone, arch, (flag | 17,)) == EPERM, name
        assert bpf_run(prog, clone, arch, (flag | 1 << 32,)) == EPERM, name  # low 32 bits
    # fork, threads, vfork, and CLONE_NEWTIME's bit, which clone() reads as exit signal
    for flags in (17, 0x3D0F00, 0x4111, 0x80 | 17, 1 << 32 | 17):
        assert bpf_run(prog, clone, arch, (flags,)) == ALLOW, hex(flags)
    for nr in HARMLESS[abi]:
        assert bpf_run(prog, nr, arch) == ALLOW, nr
    # Exactly those: every other number of this ABI passes through to the engine's filter.
    for nr in range(bias, bias + 1100):
        if nr not in denied | {clone, clone3}:
            assert bpf_run(prog, nr, arch) == ALLOW, nr


def test_unknown_arches_get_eperm_for_everything() -> None:
    prog = userfilter.build()
    for arch in (0, 0x12345678, 0x800000B7, 0x4000003E, 0xC0000028):  # ... aarch64 big-endian
        for nr in (0, 20, 39, 172, 272, 1 << 30):
            assert bpf_run(prog, nr, arch) == EPERM, (hex(arch), nr)
    # a table that forgets i386 turns int 0x80 into EPERM, not into a bypass
    only64 = userfilter.build(userfilter.ABIS[:2])
    assert bpf_run(only64, 20, ARCH["i386"]) == EPERM
    assert bpf_run(only64, 39, ARCH["x86_64"]) == ALLOW


def test_link_refuses_a_jump_it_cannot_encode() -> None:
    code: list[Any] = [(0x15, "far", 0, 1), *[(0x20, 0, 0, 0)] * 300, "far", (0x06, 0, 0, 0)]
    with pytest.raises(RuntimeError, match="jump out of range"):
        userfilter._link(code)


HEADERS = {
    "x86_64": (0, "/usr/include/x86_64-linux-gnu/asm/unistd_64.h"),
    "x32": (0, "/usr/include/x86_64-linux-gnu/asm/unistd_x32.h"),
    "i386": (1, "/usr/include/x86_64-linux-gnu/asm/unistd_32.h"),
    "aarch64": (2, "/usr/include/asm-generic/unistd.h"),
}


@pytest.mark.parametrize("abi", list(HEADERS))
def test_numbers_match_this_machines_kernel_headers(abi: str) -> None:
    col, header = HEADERS[abi]
    if not os.path.exists(header):
        pytest.skip(f"{header} not installed")
    text = Path(header).read_text()
    for name in [*userfilter.GATED, "clone", "clone3"]:
        m = re.search(rf"#define __NR_{name}\s+\(?(?:__X32_SYSCALL_BIT \+ )?(\d+)", text)
        want = None if m is None else int(m.group(1))
        have = {"clone": userfilter.CLONE[col], "clone3": userfilter.CLONE3}.get(name)
        if have is None:
            have = userfilter.GATED[name][col]
        assert have == want, (abi, name)


# --- the engine's own filters: what SYS_ADMIN adds, and that the stack takes it back ----

DUMP = """
import ctypes, json, os, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.restype = ctypes.c_long
pt = lambda req, pid, a=0, d=None: libc.ptrace(ctypes.c_long(req), ctypes.c_long(pid),
                                               ctypes.c_void_p(a), d)
pid = int(sys.argv[1])
if pt(0x4206, pid) or pt(0x4207, pid):  # PTRACE_SEIZE, PTRACE_INTERRUPT
    sys.exit("ptrace: " + os.strerror(ctypes.get_errno()))
os.waitpid(pid, 0x40000000)
progs, n = [], 0
while (size := pt(0x420C, pid, len(progs))) > 0:  # PTRACE_SECCOMP_GET_FILTER
    buf = ctypes.create_string_buffer(size * 8)
    pt(0x420C, pid, len(progs), buf)
    progs.append([struct.unpack_from("=HBBI", buf.raw, 8 * i) for i in range(size)])
pt(17, pid)  # PTRACE_DETACH
print(json.dumps(progs))
"""


def engine_filter(client: Any, image: str, caps: list[str]) -> list[tuple[int, int, int, int]]:
    """The engine's seccomp program of a container with ``caps``, read with ptrace."""
    c = client.containers.run(
        image, ["sleep", "60"], detach=True, user="1000", cap_drop=["ALL"], cap_add=caps or None,
        security_opt=["no-new-privileges"], network_mode="none",
        name=paths.unique_name("probe"),
        labels=paths.Owner.current("probe-" + secrets.token_hex(4)).labels("probe"),
    )  # fmt: skip
    try:
        c.reload()
        pid = c.attrs["State"]["Pid"]
        try:  # the engine's pid must be this host's, or ptrace would hit a stranger
            ours = c.id in Path(f"/proc/{pid}/cgroup").read_text()
        except OSError:
            ours = False
        if not ours:
            pytest.skip("the engine runs on another host (or in another pid namespace)")
        r = subprocess.run([sys.executable, "-I", "-c", DUMP, str(pid)],
                           capture_output=True, text=True, timeout=30)  # fmt: skip
        if r.returncode:
            pytest.skip(f"cannot read the engine's filter: {r.stderr.strip()[-200:]}")
        (prog,) = json.loads(r.stdout)  # the engine installs exactly one
        return [tuple(i) for i in prog]
    finally:
        with contextlib.suppress(Exception):
            c.remove(force=True)


def stacked(progs: list[Any], nr: int, arch: int, args: tuple[int, ...] = ()) -> int:
    """The kernel's verdict for stacked filters: lowest action wins, ties to the newest."""
    rets = [bpf_run(p, nr, arch, args) for p in progs]  # newest first
    return min(rets, key=lambda v: struct.unpack("<i", struct.pack("<I", v & 0xFFFF0000))[0])


def test_engine_default_profile_plus_filter_equals_the_cap_dropped_profile(
    docker_client: Any, base_image: str
) -> None:
    """userfilter.GATED re-derived from the engine this test runs against: its filter for
    a ``--cap-drop ALL`` container, for one with the sandbox's caps, and ours, compared
    for every number of every ABI (all 64 bits of clone's flags; other calls with zero
    arguments: the profile's capability rules test no other argument)."""
    if os.geteuid() != 0 or os.environ.get("DOCKER_HOST", "unix://").startswith(("tcp:", "ssh:")):
        pytest.skip("reading the engine's filters needs root on the engine's own host")
    plain = engine_filter(docker_client, base_image, [])
    admin = engine_filter(docker_client, base_image, SANDBOX_CAPS)
    ours = userfilter.build()
    widened, mismatches = set(), []
    for abi, (arch, bias, _col) in ABIS.items():
        for nr in range(bias, bias + 1100):
            vectors = [(), *[(1 << b,) for b in range(64)]] if nr % 1024 in (56, 120, 220) else [()]
            for args in vectors:
                want = bpf_run(plain, nr, arch, args)
                if bpf_run(admin, nr, arch, args) != want:
                    widened.add((abi, nr - bias))
                if stacked([ours, admin], nr, arch, args) != want:
                    mismatches.append((abi, nr - bias, args))
    assert mismatches == []
    ours_gated = {
        (abi, nr - bias)
        for abi, _arch, col, bias in userfilter.ABIS
        for nr in [
            *userfilter.DENIED[abi].values(),
            userfilter.CLONE[col] + bias,
            userfilter.CLONE3 + bias,
        ]
    }
    native = {abi for abi, _nr in widened}  # the arches this engine's profile knows
    # Nothing we deny needlessly there (clone: only by its namespace flags).
    assert {(abi, nr) for abi, nr in ours_gated if abi in native} == widened
