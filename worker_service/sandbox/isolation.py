"""The kernel's separation of a sandbox from everything else: its own uid,
its own namespaces, its own view of the file system, no capabilities.

Run in the sandbox's keeper process (forked by the zygote) before it forks
the sandbox proper, and in the sandbox right after; see `__init__.py` for
where these sit among the other layers. Everything is best effort where the
kernel may lack a feature (a kernel without user namespaces, a root file
system pivot_root cannot leave), and `Isolation` records what took effect,
so the worker can log which layers are on.

The standard library has no unshare, mount, pivot_root or capset before
Python 3.12, so they are called through ctypes (libc's own wrappers where
glibc has them, the raw system call where it does not).
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from dataclasses import dataclass, field

# A worker running as root gives each sandbox a uid and gid of its own:
# this base plus the keeper's pid, so no two live sandboxes on one host share
# one. 0x70000000 lies in the range systemd leaves unused (above container
# ranges, below 2**31, which some tools mishandle).
SANDBOX_ID_BASE = 0x7000_0000
# The uid and gid a sandbox sees itself as, inside its user namespace.
INSIDE_ID = 65534

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
_OTHER_NAMESPACES = CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWPID | CLONE_NEWNET

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
MNT_DETACH = 2
# statvfs flag -> mount flag a bind remount inside a user namespace must keep
_LOCKED_FLAGS = (
    (os.ST_NOSUID, MS_NOSUID),
    (os.ST_NODEV, MS_NODEV),
    (os.ST_NOEXEC, MS_NOEXEC),
    (os.ST_NOATIME, MS_NOATIME),
    (os.ST_NODIRATIME, MS_NODIRATIME),
    (os.ST_RELATIME, MS_RELATIME),
)

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_SYSCALLS = {
    "x86_64": {"capset": 126, "pivot_root": 155},
    "aarch64": {"capset": 91, "pivot_root": 41},
}

# Where the sandbox's new root (a small tmpfs) is built before pivot_root:
# a directory every system has; the mount covers it in the sandbox's own
# mount namespace only.
NEW_ROOT_MOUNT_POINT = "/tmp"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mount.argtypes = (ctypes.c_char_p,) * 3 + (ctypes.c_ulong, ctypes.c_char_p)


def _check(result: int, what: str) -> None:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def _syscall(name: str, *args) -> int:
    numbers = _SYSCALLS.get(platform.machine())
    if numbers is None:
        raise OSError(errno.ENOSYS, f"{name}: unknown architecture {platform.machine()}")
    return _libc.syscall(ctypes.c_long(numbers[name]), *args)


def prctl(option: int, value: int = 0) -> None:
    _check(
        _libc.prctl(ctypes.c_int(option), ctypes.c_ulong(value), ctypes.c_ulong(0),
                    ctypes.c_ulong(0), ctypes.c_ulong(0)),
        f"prctl({option})",
    )  # fmt: skip


def die_with_parent() -> None:
    """PR_SET_PDEATHSIG: SIGKILL when the parent dies (cleared by a change
    of uid, so set after one)."""
    prctl(PR_SET_PDEATHSIG, 9)


@dataclass
class Isolation:
    """What took effect for one sandbox (reported in its greeting)."""

    uid: int = -1  # the sandbox's uid as the host sees it
    dedicated_uid: bool = False
    namespaces: list[str] = field(default_factory=list)
    filesystem: str = "host"  # "pivot_root", "chroot" or "host"
    capabilities_dropped: bool = False
    problems: list[str] = field(default_factory=list)


# -- the keeper: namespaces, file system view, uid ----------------------------


def _unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def _write(path: str, text: str, proc: int) -> None:
    fd = os.open(path, os.O_WRONLY, dir_fd=proc)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _enter_user_namespace(outer_uid: int, outer_gid: int, extra_flags: int, proc: int) -> None:
    """A new user namespace (plus `extra_flags` namespaces) in which the
    caller is INSIDE_ID, mapped to its own uid and gid outside: the only
    mapping an unprivileged process may write, so it gains nothing outside.
    `proc` is the caller's /proc/PID directory, opened before the file
    system view hid /proc."""
    _unshare(CLONE_NEWUSER | extra_flags)
    prctl(PR_SET_DUMPABLE, 1)  # /proc/PID/*_map belong to root otherwise
    _write("setgroups", "deny", proc)
    _write("uid_map", f"{INSIDE_ID} {outer_uid} 1\n", proc)
    _write("gid_map", f"{INSIDE_ID} {outer_gid} 1\n", proc)


_NAMESPACE_NAMES = ((CLONE_NEWNS, "mount"), (CLONE_NEWPID, "pid"), (CLONE_NEWIPC, "ipc"),
                    (CLONE_NEWNET, "network"))  # fmt: skip


def _names(flags: int) -> list[str]:
    return [name for flag, name in _NAMESPACE_NAMES if flags & flag]


def isolate_keeper(
    read_paths: tuple[str, ...], isolation: Isolation, *, off: frozenset[str] = frozenset()
) -> None:
    """In the keeper, before it forks the sandbox: new namespaces (the pid
    namespace takes effect for that child), a file system holding only
    `read_paths`, read-only, and the sandbox's own unprivileged uid. `off`
    names layers a test switched off ("uid", "namespaces", "filesystem")."""
    if "namespaces" in off:
        off = off | {"filesystem"}  # a view of its own needs a mount namespace
    if "uid" in off or ("namespaces" in off and os.geteuid() != 0):
        isolation.uid = os.geteuid()
        isolation.problems.append("uid: switched off")
        if "namespaces" not in off:
            isolation.problems.append("namespaces: need the uid layer when not root")
        return
    proc = os.open(f"/proc/{os.getpid()}", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if os.geteuid() == 0:
            if "namespaces" not in off:
                _unshare(_OTHER_NAMESPACES)  # root needs no user namespace for these
                isolation.namespaces += _names(_OTHER_NAMESPACES)
            if "filesystem" not in off:
                _build_root(read_paths, isolation)
            uid = SANDBOX_ID_BASE + os.getpid()
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)  # from root to not-root: every capability goes
            isolation.dedicated_uid = True
            isolation.uid = uid
            try:  # and a user namespace on top, where the kernel lets users make one
                if "namespaces" not in off:
                    _enter_user_namespace(uid, uid, 0, proc)
                    isolation.namespaces.insert(0, "user")
            except OSError as error:
                isolation.problems.append(f"user namespace: {error}")
        else:
            isolation.uid = os.getuid()
            try:
                _enter_user_namespace(os.getuid(), os.getgid(), _OTHER_NAMESPACES, proc)
                isolation.namespaces += ["user", *_names(_OTHER_NAMESPACES)]
            except OSError as error:
                isolation.problems.append(f"user namespace (so no other namespace): {error}")
            if "mount" in isolation.namespaces and "filesystem" not in off:
                _build_root(read_paths, isolation)
    finally:
        os.close(proc)


def _locked_flags(fd: int) -> int:
    """The flags of the mount under `fd` that a bind remount must keep."""
    flags = os.statvfs(fd).f_flag
    return sum(mount_flag for st_flag, mount_flag in _LOCKED_FLAGS if flags & st_flag)


def _mount(
    source: str | None, target: str, fstype: str | None, flags: int, data: str | None
) -> None:
    encode = lambda s: s.encode() if s is not None else None  # noqa: E731
    _check(
        _libc.mount(encode(source), encode(target), encode(fstype), flags,
                    encode(data)),
        f"mount {target}",
    )  # fmt: skip


def _build_root(read_paths: tuple[str, ...], isolation: Isolation) -> None:
    """Replace the file system by a read-only tmpfs that holds only
    `read_paths` (bind mounts at their own paths, read-only): nothing else of
    the host (no /proc, /home, /etc, /root, no identity file) exists for the
    sandbox, whatever its uid could read."""
    try:
        _mount(None, "/", None, MS_REC | MS_PRIVATE, None)  # nothing propagates to the host
        # The sources are opened first: the tmpfs may cover one of them.
        sources = []
        for path in read_paths:
            try:
                sources.append((path, os.open(path, os.O_PATH | os.O_CLOEXEC)))
            except OSError:
                continue
        new = NEW_ROOT_MOUNT_POINT
        _mount("ec262-sandbox", new, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=0755")
        for path, fd in sources:
            target = new + path
            if os.path.isdir(f"/proc/self/fd/{fd}"):
                os.makedirs(target, mode=0o755, exist_ok=True)
            else:
                os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
                os.close(os.open(target, os.O_WRONLY | os.O_CREAT, 0o444))
            _mount(f"/proc/self/fd/{fd}", target, None, MS_BIND | MS_REC, None)
            keep = _locked_flags(fd) | MS_NOSUID | MS_NODEV
            _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | keep, None)
            os.close(fd)
        os.chdir(new)
        try:
            _check(_syscall("pivot_root", b".", b"."), "pivot_root")
            _check(_libc.umount2(b".", ctypes.c_int(MNT_DETACH)), "umount old root")
            isolation.filesystem = "pivot_root"
        except OSError as error:  # e.g. an initramfs root, which cannot be pivoted away
            os.chroot(".")
            isolation.filesystem = "chroot"
            isolation.problems.append(f"pivot_root: {error}; chroot instead")
        os.chdir("/")
        _mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, None)
    except OSError as error:
        isolation.problems.append(f"file system view: {error}")


# -- the sandbox itself ------------------------------------------------------------


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]  # fmt: skip


def drop_capabilities(isolation: Isolation) -> None:
    """No capability in any set, nor any way back (empty bounding and ambient
    sets, no_new_privs): the caps a process holds in the user namespace it
    made do not follow it into user code."""
    try:
        for cap in range(64):  # past the kernel's last capability: EINVAL
            try:
                prctl(PR_CAPBSET_DROP, cap)
            except OSError as error:
                if error.errno not in (errno.EINVAL, errno.EPERM):
                    raise
        _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
        header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
        data = (_CapData * 2)()
        _check(_syscall("capset", ctypes.byref(header), ctypes.byref(data)), "capset")
        prctl(PR_SET_NO_NEW_PRIVS, 1)
        isolation.capabilities_dropped = capabilities_empty()
    except OSError as error:
        isolation.problems.append(f"capabilities: {error}")


def capabilities_empty() -> bool:
    """The kernel's own word (capget), as /proc is not there to read."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _libc.capget.restype = ctypes.c_int
    if _libc.capget(ctypes.byref(header), ctypes.byref(data)) != 0:
        return False
    return all(d.effective == d.permitted == d.inheritable == 0 for d in data)
