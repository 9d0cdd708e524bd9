"""A seccomp filter that takes back what ``SYS_ADMIN`` adds to the engine's default profile.

Stdlib only; the host puts this source in front of ``runner.py`` and runs both with
``python3 -I -S -c``, so it defines names and does nothing at import time.

The agent's container holds ``SYS_ADMIN`` (for the root ``hidepid=2`` remount), and the
engine's default seccomp profile then allows more syscalls to the whole container.
User code is non-root under no-new-privileges, so the kernel refuses the cap-gated
ones, but ``unshare(CLONE_NEWUSER)`` hands it a user namespace with every capability
inside. ``install()`` stacks a second filter (filters stack; the kernel applies the
strictest verdict) that answers exactly those widenings as the profile does without
``SYS_ADMIN``: EPERM, and ENOSYS for ``clone3`` (so libc falls back to ``clone``, whose
flags a classic BPF filter can inspect; ``clone3``'s live in memory it cannot read).

``GATED`` was established on Docker 20.10.24 by dumping the engine's filters of a
``--cap-drop ALL`` container with and without ``--cap-add SYS_ADMIN``
(PTRACE_SECCOMP_GET_FILTER) and diffing their verdicts for every number, arch and
argument bit. Numbers come from the kernel headers (x86, asm-generic) and the kernel's
arch/arm/tools/syscall.tbl. None is the arch lacking that call.
"""

import os
import struct

# name: (x86_64 and x32, i386 (also int 0x80 from 64-bit code), aarch64, arm EABI)
GATED = {
    "syslog": (103, 103, 116, 103),
    "mount": (165, 21, 40, 21),
    "umount": (None, 22, None, None),  # arm's 22 is OABI-only, unreachable under seccomp
    "umount2": (166, 52, 39, 52),
    "sethostname": (170, 74, 161, 74),
    "setdomainname": (171, 121, 162, 121),
    "quotactl": (179, 131, 60, 131),
    "lookup_dcookie": (212, 253, 18, 249),
    "unshare": (272, 310, 97, 337),
    "perf_event_open": (298, 336, 241, 364),
    "fanotify_init": (300, 338, 262, 367),
    "name_to_handle_at": (303, 341, 264, 370),
    "setns": (308, 346, 268, 375),
    "bpf": (321, 357, 280, 386),
    "open_tree": (428, 428, 428, 428),
    "move_mount": (429, 429, 429, 429),
    "fsopen": (430, 430, 430, 430),
    "fsconfig": (431, 431, 431, 431),
    "fsmount": (432, 432, 432, 432),
    "fspick": (433, 433, 433, 433),
    "mount_setattr": (442, 442, 442, 442),
    "quotactl_fd": (443, 443, 443, 443),
}
CLONE = (56, 120, 220, 120)  # flags are args[0] on all four (s390 differs; not handled)
CLONE3 = 435  # the same number on all four

# The profile without SYS_ADMIN allows clone only when (flags & this) == 0: CLONE_NEWNS,
# NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET. CLONE_NEWTIME (0x80) is absent on
# purpose, as in the profile: for clone() that bit belongs to the exit signal (CSIGNAL),
# the kernel never reads it as a namespace flag (time namespaces need unshare/clone3).
CLONE_NS_MASK = 0x7E020000

X32_BIT = 0x40000000  # x32 shares AUDIT_ARCH_X86_64; its numbers are x86_64's | this bit
# (abi, AUDIT_ARCH_*, column in GATED, number bias). Every other arch: EPERM for all.
ABIS = (
    ("x86_64", 0xC000003E, 0, 0),
    ("x32", 0xC000003E, 0, X32_BIT),
    ("i386", 0x40000003, 1, 0),
    ("aarch64", 0xC00000B7, 2, 0),
    ("arm", 0x40000028, 3, 0),
)

DENIED = {  # abi -> {name: nr}, the table install() enforces (clone: by its flags)
    abi: {n: t[col] + bias for n, t in GATED.items() if t[col] is not None}
    for abi, _arch, col, bias in ABIS
}

# uname's machine names for kernels whose every ABI is in ABIS (a 64-bit kernel also
# runs its 32-bit programs: i386 on x86_64, arm on aarch64).
MACHINES = ("x86_64", "amd64", "i386", "i486", "i586", "i686", "aarch64", "arm64")

_LD, _JEQ, _JSET, _JA, _RET = 0x20, 0x15, 0x45, 0x05, 0x06  # BPF_LD|W|ABS, JMP|*|K, RET|K
_ALLOW, _ERRNO, _EPERM, _ENOSYS = 0x7FFF0000, 0x00050000, 1, 38
_NR, _ARCH, _ARG0_LO = 0, 4, 16  # offsets in struct seccomp_data (little-endian arches)


def build(abis=ABIS):
    """The filter as [(code, jt, jf, k)]; jumps are resolved from labels."""
    code = [(_LD, 0, 0, _ARCH)]
    arches = {}
    for abi, arch, _col, _bias in abis:
        arches.setdefault(arch, []).append(abi)
    for arch in arches:  # jump tables: jf skips the ja to the next jeq
        code += [(_JEQ, 0, 1, arch), (_JA, 0, 0, f"arch{arch}")]
    code.append((_RET, 0, 0, _ERRNO | _EPERM))  # an arch we do not know: fail closed
    for arch, names in arches.items():
        code += [f"arch{arch}", (_LD, 0, 0, _NR)]
        for abi in names:
            col, bias = next((c, b) for a, _, c, b in abis if a == abi)
            code += [(_JEQ, f"deny{arch}", 0, nr) for nr in DENIED[abi].values()]
            code += [(_JEQ, f"nosys{arch}", 0, CLONE3 + bias)]
            code += [(_JEQ, f"clone{arch}", 0, CLONE[col] + bias)]
        code += [(_RET, 0, 0, _ALLOW), f"clone{arch}", (_LD, 0, 0, _ARG0_LO)]
        code += [(_JSET, f"deny{arch}", 0, CLONE_NS_MASK), (_RET, 0, 0, _ALLOW)]
        code += [f"deny{arch}", (_RET, 0, 0, _ERRNO | _EPERM)]
        code += [f"nosys{arch}", (_RET, 0, 0, _ERRNO | _ENOSYS)]
    return _link(code)


def _link(code):
    labels, prog = {}, []
    for item in code:
        if isinstance(item, str):
            labels[item] = len(prog)
        else:
            prog.append(item)
    out = []
    for pc, (op, jt, jf, k) in enumerate(prog):
        jt, jf = (labels[j] - pc - 1 if isinstance(j, str) else j for j in (jt, jf))
        k = labels[k] - pc - 1 if isinstance(k, str) else k
        if not (0 <= jt < 256 and 0 <= jf < 256 and 0 <= k < 2**32):
            raise RuntimeError(f"seccomp filter: jump out of range at {pc}")
        out.append((op, jt, jf, k))
    return out


def install():
    """Stack the filter on this process and all it will start; raise if that fails."""
    if len(os.listdir("/proc/self/task")) != 1:
        # A filter set with prctl covers the calling thread only.
        raise RuntimeError("seccomp filter: install() must run before any thread starts")
    machine = os.uname().machine
    if machine not in MACHINES and not machine.startswith("arm"):
        # The program answers EPERM to every call of an arch it has no table for: the
        # runner could not even write why it stopped.
        raise RuntimeError(
            f"seccomp filter: this machine's architecture {machine!r} is not one it knows "
            "(x86_64, i386, aarch64, arm), and behind it every system call would fail. Run "
            "the sandbox on one of those, or add the architecture's numbers to "
            "userfilter.GATED and ABIS"
        )
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        prctl, unshare = libc.prctl, libc.unshare
    except (ImportError, OSError, AttributeError) as exc:
        raise RuntimeError(f"seccomp filter: no usable ctypes/libc ({exc})") from exc

    class SockFprog(ctypes.Structure):
        _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))

    prog = build()
    buf = ctypes.create_string_buffer(b"".join(struct.pack("=HBBI", *i) for i in prog))
    fprog = SockFprog(len(prog), ctypes.addressof(buf))
    ul = ctypes.c_ulong
    # PR_SET_NO_NEW_PRIVS (38) is already set by the engine; setting it again is a no-op
    # and makes install() work even where it is not. PR_SET_SECCOMP 22, MODE_FILTER 2.
    for args in ((38, 1, 0, 0, 0), (22, 2, ctypes.addressof(fprog), 0, 0)):
        if prctl(*(ul(a) for a in args)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"seccomp filter: prctl({args[0]}) failed: {os.strerror(err)}")
    # Prove it is in force: unshare(0) is a no-op the filter must refuse.
    if unshare(0) != -1 or ctypes.get_errno() != _EPERM:
        raise RuntimeError("seccomp filter: installed but unshare(0) was not refused")
