"""Syscall probe: prints one JSON object, probe name -> "ok" or the errno name.

Stdlib only; run it as the unprivileged user inside a container: ``python3 syscalls.py``
(or after other code, e.g. a seccomp filter, with ``python3 -I -S -c``). Each probe runs
in a forked child, so a namespace it gains or a mount it makes never affects the next
probe, and whatever succeeds is undone (fds closed, tmpfs unmounted, table deleted).
Most probes pass invalid fds or no-op arguments, so even success changes nothing.
"""

import ctypes
import errno
import json
import mmap
import os
import platform
import signal
import socket
import struct
import tempfile

ARCH = platform.machine()
# fmt: off
NAMES = (
    "syslog", "mount", "umount2", "sethostname", "setdomainname", "quotactl",
    "lookup_dcookie", "keyctl", "unshare", "perf_event_open", "fanotify_init",
    "name_to_handle_at", "setns", "bpf", "io_uring_setup", "open_tree", "move_mount",
    "fsopen", "fsconfig", "fsmount", "fspick", "clone3", "mount_setattr", "quotactl_fd",
    "clone", "getpid",
)
TABLES = {  # x86_64 from asm/unistd_64.h, aarch64 from asm-generic/unistd.h
    "x86_64": (103, 165, 166, 170, 171, 179, 212, 250, 272, 298, 300, 303, 308, 321, 425,
               428, 429, 430, 431, 432, 433, 435, 442, 443, 56, 39),
    "aarch64": (116, 40, 39, 161, 162, 60, 18, 219, 97, 241, 262, 264, 268, 280, 425,
                428, 429, 430, 431, 432, 433, 435, 442, 443, 220, 172),
}
# fmt: on
NR = dict(zip(NAMES, TABLES[ARCH], strict=True)) if ARCH in TABLES else {}
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET, SIGCHLD = 0x20000, 0x10000000, 0x40000000, 17
AT_FDCWD, AT_EMPTY_PATH = -100, 0x1000

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


class Denied(Exception):
    pass


def sys_(name, *args):
    """The raw syscall; returns its result, raises OSError on -1."""
    conv = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    res = libc.syscall(ctypes.c_long(NR[name]), *conv)
    if res == -1:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return res


def fd_probe(name, *args):
    os.close(sys_(name, *args))


def clone_probe(flags):
    pid = sys_("clone", flags | SIGCHLD, 0, 0, 0, 0)  # no stack: fork-like
    if pid == 0:
        os._exit(0)  # the child does nothing at all
    os.waitpid(pid, 0)


def x32_unshare():
    if ARCH != "x86_64":
        raise Denied("not x86_64")
    libc.syscall(ctypes.c_long(272 | 0x40000000), ctypes.c_long(CLONE_NEWUSER))
    err = ctypes.get_errno()
    raise OSError(err, os.strerror(err))  # no x32 call returns -1 with errno 0


def i386_unshare():
    """unshare(CLONE_NEWUSER) through int 0x80: the i386 table, from 64-bit code."""
    if ARCH != "x86_64":
        raise Denied("not x86_64")
    # push rbx; mov eax, 310 (i386 unshare); mov ebx, edi; int 0x80; pop rbx; ret
    code = bytes.fromhex("53b83601000089fbcd805bc3")
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(code)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(page))
    res = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)(addr)(CLONE_NEWUSER)
    if res < 0:
        raise OSError(-res, os.strerror(-res))


def mount_tmpfs():
    where = tempfile.mkdtemp()
    try:
        sys_("mount", b"none", where.encode(), b"tmpfs", 0, None)
        sys_("umount2", where.encode(), 2)  # MNT_DETACH
    finally:
        os.rmdir(where)


def umount2():
    where = tempfile.mkdtemp()  # not a mount point: success is impossible
    try:
        sys_("umount2", where.encode(), 0)
    finally:
        os.rmdir(where)


def setns():
    fd = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        sys_("setns", fd, CLONE_NEWNET)  # our own namespace: a no-op even if allowed
    finally:
        os.close(fd)


def af_packet():
    socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003)).close()


def nf_tables():
    """An nf_tables batch creating table inet agentbox_probe; the ack's errno."""

    def msg(mtype, flags, family, seq, payload=b""):
        body = struct.pack("=BBH", family, 0, socket.htons(10 if mtype in (16, 17) else 0))
        body += payload
        return struct.pack("=IHHII", 16 + len(body), mtype, flags, seq, 0) + body

    name = b"agentbox_probe\0\0"  # NFTA_TABLE_NAME, nul-terminated, 4-byte padded
    attr = struct.pack("=HH", 4 + 15, 1) + name

    def batch(mtype, flags):
        return msg(16, 1, 0, 1) + msg(mtype, flags, 1, 2, attr) + msg(17, 1, 0, 3)

    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12) as s:  # NETLINK_NETFILTER
        s.settimeout(3)
        s.send(batch(0x0A00, 1 | 4 | 0x400))  # NFT_MSG_NEWTABLE, REQUEST|ACK|CREATE
        data = s.recv(65536)
        while data:
            length, mtype = struct.unpack_from("=IH", data)
            if mtype == 2:  # NLMSG_ERROR: its int is -errno, 0 is the ack
                err = -struct.unpack_from("=i", data, 16)[0]
                if err:
                    raise OSError(err, os.strerror(err))
                s.send(batch(0x0A02, 1 | 4))  # NFT_MSG_DELTABLE: undo
                return
            data = data[(length + 3) & ~3 :]
        raise Denied("no ack")


def perf_event_open():
    attr = bytearray(128)  # type SOFTWARE, size, CPU_CLOCK, disabled|exclude_kernel|_hv
    struct.pack_into("=IIQ", attr, 0, 1, 128, 0)
    struct.pack_into("=Q", attr, 40, 1 | 32 | 64)
    fd_probe("perf_event_open", ctypes.create_string_buffer(bytes(attr)), 0, -1, -1, 8)


def bpf_map_create():
    attr = ctypes.create_string_buffer(struct.pack("=IIII", 2, 4, 4, 1) + bytes(112))
    fd_probe("bpf", 0, attr, 128)  # BPF_MAP_CREATE, an ARRAY of one u32


def io_uring_setup():
    fd_probe("io_uring_setup", 1, ctypes.create_string_buffer(120))


def name_to_handle_at():
    handle = ctypes.create_string_buffer(struct.pack("=Ii", 128, 0) + bytes(128))
    sys_("name_to_handle_at", AT_FDCWD, b"/", handle, ctypes.byref(ctypes.c_int()), 0)


def in_userns(probe):
    """What the widening buys: the probe inside a fresh user+mount+net namespace."""

    def run():
        sys_("unshare", CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET)
        probe()  # the namespaces die with this child, and anything made in them

    return run


def same_name(call, path):
    with open(path, "rb") as fh:  # set it to what it already is
        value = fh.read().strip()
    sys_(call, value, len(value))


PROBES = {
    "getpid (control)": lambda: sys_("getpid"),
    "clone plain (control)": lambda: clone_probe(0),
    "unshare(CLONE_NEWUSER)": lambda: sys_("unshare", CLONE_NEWUSER),
    "unshare(CLONE_NEWNS)": lambda: sys_("unshare", CLONE_NEWNS),
    "unshare(0)": lambda: sys_("unshare", 0),
    "unshare x32 ABI": x32_unshare,
    "unshare i386 ABI (int 0x80)": i386_unshare,
    "clone(CLONE_NEWUSER)": lambda: clone_probe(CLONE_NEWUSER),
    "clone(CLONE_NEWNS)": lambda: clone_probe(CLONE_NEWNS),
    "clone3": lambda: sys_("clone3", None, 0),  # invalid size: EINVAL if it gets through
    "setns(net)": setns,
    "mount tmpfs": mount_tmpfs,
    "umount2": umount2,
    "socket(AF_PACKET, SOCK_RAW)": af_packet,
    "netlink nf_tables NEWTABLE": nf_tables,
    "perf_event_open": perf_event_open,
    "bpf(BPF_MAP_CREATE)": bpf_map_create,
    "keyctl": lambda: sys_("keyctl", 0, -3, 0),  # GET_KEYRING_ID session, no create
    "io_uring_setup": io_uring_setup,
    "name_to_handle_at": name_to_handle_at,
    "sethostname": lambda: same_name("sethostname", "/proc/sys/kernel/hostname"),
    "setdomainname": lambda: same_name("setdomainname", "/proc/sys/kernel/domainname"),
    "syslog": lambda: sys_("syslog", 10, None, 0),  # SYSLOG_ACTION_SIZE_BUFFER
    "fanotify_init": lambda: fd_probe("fanotify_init", 0x200, 0),  # NOTIF|REPORT_FID
    "open_tree": lambda: fd_probe("open_tree", AT_FDCWD, b"/tmp", 0o2000000),  # CLOEXEC
    "fsopen": lambda: fd_probe("fsopen", b"tmpfs", 1),
    "fsconfig": lambda: sys_("fsconfig", -1, 0, None, None, 0),  # bad fd
    "fsmount": lambda: sys_("fsmount", -1, 0, 0),
    "fspick": lambda: fd_probe("fspick", AT_FDCWD, b"/tmp", 0),
    "move_mount": lambda: sys_("move_mount", -1, b"", -1, b"", 0),
    "mount_setattr": lambda: sys_("mount_setattr", -1, b"", AT_EMPTY_PATH, None, 0),
    "quotactl": lambda: sys_("quotactl", 0x80000400, b"/", 0, None),  # Q_GETFMT, not a bdev
    "quotactl_fd": lambda: sys_("quotactl_fd", -1, 0x80000400, 0, None),
    "lookup_dcookie": lambda: sys_("lookup_dcookie", 0, None, 0),
    "userns: mount tmpfs": in_userns(mount_tmpfs),
    "userns: socket(AF_PACKET, SOCK_RAW)": in_userns(af_packet),
    "userns: netlink nf_tables NEWTABLE": in_userns(nf_tables),
}


def verdict(probe):
    """Run one probe in a child of its own; its verdict comes back through a pipe."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        signal.alarm(5)
        try:
            probe()
            out = "ok"
        except OSError as exc:
            out = errno.errorcode.get(exc.errno, str(exc.errno))
        except Exception as exc:
            out = f"unavailable: {type(exc).__name__}: {exc}"
        os.write(wfd, out.encode())
        os._exit(0)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as fh:
        out = fh.read().decode()
    status = os.waitpid(pid, 0)[1]
    return out or f"died (status {status})"


def main():
    if not NR:
        raise SystemExit(f"no syscall table for {ARCH}")
    print(json.dumps({name: verdict(p) for name, p in PROBES.items()}, sort_keys=True))


if __name__ == "__main__":
    main()
