"""Seccomp profiles for the containers, from the Python data below. Same data, same bytes.

Tighter than Docker's default profile: everything not listed fails with EPERM; only the
64-bit native ABI of x86-64 and arm64 is accepted (no 32-bit compat syscalls); no
namespace, mount, module, BPF, perf, keyring, ptrace, io_uring or clock-setting calls;
``clone`` only without namespace flags (the mask Docker's default uses); ``personality``
only to query or keep PER_LINUX; sockets only for unix, IPv4 and IPv6.

Three profiles:

- ``agent``: clients only (agents, orchestrator, control). They connect out but cannot
  ``bind``, ``listen`` or ``accept``, so a compromised agent cannot serve anything on its
  network.
- ``server``: the processes that accept connections (nats-server, the egress proxy): the
  client set plus ``bind``, ``listen``, ``accept`` and ``accept4``.
- ``init``: the one-shot init container (root, no network): the client set plus the
  ``chown`` family, with which it hands each service's secret files to that service's uid.

Both cover CPython with asyncio and OpenSSL, Go's runtime (nats-server, and runc's own
init, which runs under the profile until it execs the entry point) and ``docker exec``
health probes. They assume ``no-new-privileges`` (compose.yaml sets it everywhere): runc then
loads the filter after switching to the container user, so setuid, setgroups and capset
need not be allowed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

# Why each group is allowed. Names unknown on an architecture (e.g. ``open`` on arm64) are
# skipped by runc, so the x86-64 spellings can sit next to the *at variants.
_PROCESS = (
    "execve", "exit", "exit_group", "wait4", "waitid", "kill", "tgkill", "tkill",
    "getpid", "getppid", "gettid", "getpgid", "getpgrp", "getsid", "setsid", "setpgid",
    "getuid", "geteuid", "getgid", "getegid", "getresuid", "getresgid", "getgroups",
    "capget", "prctl", "arch_prctl", "set_tid_address", "set_robust_list", "rseq",
    "fork", "vfork", "pidfd_open", "pidfd_send_signal",
    "getrlimit", "setrlimit", "prlimit64", "getrusage", "times", "uname", "umask",
    "sched_yield", "sched_getaffinity", "getcpu", "getrandom", "sysinfo",
)
_MEMORY = ("brk", "mmap", "munmap", "mprotect", "mremap", "madvise", "msync", "mincore")
_THREADS_AND_SIGNALS = (
    "futex", "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "rt_sigpending",
    "rt_sigsuspend", "rt_sigtimedwait", "sigaltstack", "pause", "restart_syscall",
    "alarm", "getitimer", "setitimer", "timer_create", "timer_settime", "timer_gettime",
    "timer_getoverrun", "timer_delete",
)
_TIME = ("clock_gettime", "clock_getres", "clock_nanosleep", "gettimeofday", "nanosleep", "time")
_FILES = (
    "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev", "preadv2",
    "pwritev2", "lseek", "open", "openat", "openat2", "close", "close_range", "dup", "dup2",
    "dup3", "fcntl", "flock", "ioctl", "pipe", "pipe2", "stat", "lstat", "fstat",
    "newfstatat", "statx", "fstatfs", "access", "faccessat", "faccessat2", "readlink",
    "readlinkat", "getdents", "getdents64", "getcwd", "chdir", "fchdir", "mkdir", "mkdirat",
    "rmdir", "unlink", "unlinkat", "rename", "renameat", "renameat2", "link", "linkat",
    "symlink", "symlinkat", "chmod", "fchmod", "fchmodat", "fchmodat2", "utime", "utimes",
    "utimensat", "truncate", "ftruncate", "fallocate", "fadvise64", "fsync", "fdatasync",
    "sendfile", "copy_file_range", "statfs",
)
_EVENTS = (
    "epoll_create", "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait", "epoll_pwait2",
    "eventfd", "eventfd2", "poll", "ppoll", "select", "pselect6",
)
_CLIENT_SOCKETS = (
    "connect", "getsockname", "getpeername", "setsockopt", "getsockopt", "sendto",
    "recvfrom", "sendmsg", "recvmsg", "sendmmsg", "recvmmsg", "shutdown",
)
_SERVER_SOCKETS = ("bind", "listen", "accept", "accept4")
_OWNERS = ("chown", "fchown", "fchownat", "lchown")

# The escape and escalation surface: never allowed by either profile (checked below and by
# the tests). Other calls (setuid, chown, mlock, ...) are simply not on the allow lists.
FORBIDDEN = frozenset({
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    "mount", "umount", "umount2", "pivot_root", "chroot", "unshare", "setns",
    "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "create_module", "swapon", "swapoff", "reboot", "open_by_handle_at", "name_to_handle_at",
    "io_uring_setup", "io_uring_enter", "io_uring_register", "iopl", "ioperm", "acct",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "sethostname",
    "setdomainname", "quotactl", "syslog", "vhangup", "lookup_dcookie", "uselib", "ustat",
    "sysfs", "_sysctl", "vm86", "vm86old", "mbind", "set_mempolicy", "migrate_pages",
    "move_pages", "memfd_create", "memfd_secret", "execveat", "fanotify_init", "nfsservctl",
})

# Arguments that need a filter rather than a plain allow.
CLONE_NAMESPACE_FLAGS = (
    0x00020000  # CLONE_NEWNS
    | 0x02000000  # CLONE_NEWCGROUP
    | 0x04000000  # CLONE_NEWUTS
    | 0x08000000  # CLONE_NEWIPC
    | 0x10000000  # CLONE_NEWUSER
    | 0x20000000  # CLONE_NEWPID
    | 0x40000000  # CLONE_NEWNET
)
PERSONALITY_ALLOWED = (0x0, 0xFFFFFFFF)  # PER_LINUX, and 0xffffffff = query only
SOCKET_FAMILIES = (1, 2, 10)  # AF_UNIX, AF_INET, AF_INET6
AF_UNIX = 1
ENOSYS = 38


@dataclass(frozen=True)
class Profile:
    name: str
    users: str
    allow: frozenset[str]


def _profiles() -> dict[str, Profile]:
    client = frozenset((*_PROCESS, *_MEMORY, *_THREADS_AND_SIGNALS, *_TIME, *_FILES, *_EVENTS,
                        *_CLIENT_SOCKETS))
    server = client | frozenset(_SERVER_SOCKETS)
    init = client | frozenset(_OWNERS)
    found = (client | server | init) & FORBIDDEN
    if found:  # a guard for whoever edits the lists above
        raise AssertionError(f"forbidden syscalls in an allow list: {sorted(found)}")
    return {
        "agent": Profile("agent", "clients: agents, orchestrator, control", client),
        "server": Profile("server", "listeners: nats-server, the egress proxy", server),
        "init": Profile("init", "the one-shot init, which hands secret files to other uids",
                        init),
    }


PROFILES = _profiles()
AGENT, SERVER, INIT = "agent", "server", "init"


def profile_path(name: str) -> str:
    """Where the profile is written, relative to the project root."""
    return f"seccomp/{name}.json"


def _arg(value: int, op: str = "SCMP_CMP_EQ", index: int = 0,
         value_two: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"index": index, "value": value}
    if value_two is not None:
        out["valueTwo"] = value_two
    out["op"] = op
    return out


def profile_document(profile: Profile) -> dict[str, Any]:
    rules: list[dict[str, Any]] = [
        {"names": sorted(profile.allow), "action": "SCMP_ACT_ALLOW"},
        # Threads and fork/vfork, never new namespaces (Docker's default uses this mask).
        {"names": ["clone"], "action": "SCMP_ACT_ALLOW",
         "args": [_arg(CLONE_NAMESPACE_FLAGS, "SCMP_CMP_MASKED_EQ", value_two=0)]},
        # clone3 passes its flags in memory, which seccomp cannot inspect: answer ENOSYS so
        # glibc falls back to clone (EPERM would make thread creation fail).
        {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS},
    ]
    rules += [{"names": ["personality"], "action": "SCMP_ACT_ALLOW", "args": [_arg(v)]}
              for v in PERSONALITY_ALLOWED]
    rules += [{"names": ["socket"], "action": "SCMP_ACT_ALLOW", "args": [_arg(family)]}
              for family in SOCKET_FAMILIES]
    rules.append({"names": ["socketpair"], "action": "SCMP_ACT_ALLOW", "args": [_arg(AF_UNIX)]})
    return {
        "comment": (f"Generated by `mas policy compile` from deploy/seccomp.py for the "
                    f"containers compose.yaml assigns it to ({profile.users}). "
                    "Do not edit by hand."),
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": 1,
        # Only the native 64-bit ABI: no 32-bit x86 or arm compat entry points.
        "archMap": [
            {"architecture": "SCMP_ARCH_X86_64", "subArchitectures": []},
            {"architecture": "SCMP_ARCH_AARCH64", "subArchitectures": []},
        ],
        "syscalls": rules,
    }


def render_profile(name: str) -> str:
    return json.dumps(profile_document(PROFILES[name]), indent=2) + "\n"
