"""The worker's sandbox: strangers' code runs here, and nothing it does may
change the worker, the zygote, other sandboxes or the host
(docs/protocol.md section 5).

Processes. The worker starts one zygote (`zygote.py`: single-threaded, the
allowed modules imported, a clean environment). For each sandbox the zygote
forks a keeper, which isolates itself and forks the sandbox proper, then
waits for it; the pool (`pool.py`) talks to the sandbox over one socket,
with a watchdog (`watchdog.py`) killing it at the task's deadline. The
sandbox (`child.py`) loads one function payload and runs its tasks.

Layers, in the order they go on, and what each one stops:

In the zygote, before the keeper is forked:
 1. cgroup (`cgroups.py`, where one can be made: v2, or the v1 memory, pids
    and cpu controllers): memory and process count bounded by the kernel, a
    CPU weight below the worker's; rlimits (7) otherwise.
In the keeper, before it forks the sandbox (`isolation.py`):
 2. namespaces: new pid (the sandbox is pid 1 and sees no other process:
    nothing to signal, ptrace, renice, pin or limit), IPC (no System V or
    POSIX object is shared with the host, and all of them die with it),
    network (no interface but a dead loopback), mount (below), and user
    (for a worker that is not root, the only way to make the others);
 3. file system view: pivot_root into a read-only tmpfs holding only the
    interpreter's library directories, bound read-only: no /proc, /etc,
    /home, /root, /tmp, no identity file exists for the sandbox;
 4. uid: a worker running as root gives each sandbox a uid and gid of its
    own (SANDBOX_ID_BASE + keeper pid: distinct from every user's and from
    every other sandbox's); an unprivileged worker's sandbox is its uid
    mapped into the user namespace. Leaving root drops every capability.
In the sandbox itself (`child.py`, then `lockdown.py`, `landlock.py`,
`seccomp.py`):
 5. PR_SET_PDEATHSIG: it dies with its keeper, which dies with the zygote,
    which dies with the worker;
 6. no capabilities, in any set, and no_new_privs: what a user namespace
    grants its creator does not reach user code;
 7. rlimits: address space, file size 0, open files, no core file;
 8. Landlock: files readable only under the library, nothing writable, no
    TCP, no signals or abstract sockets outside its domain;
 9. seccomp allow-list: only what CPython needs to compute in memory and
    answer on its pipe; every other system call (processes, threads, timers,
    signal handlers, signals to others, sockets, IPC, mounts, namespaces,
    priorities, affinity, limits, clocks, keys, BPF, perf, io_uring,
    ptrace, reboot, syslog, fanotify...) fails with EPERM;
10. bounded stdout/stderr: print() works and costs little; the tail goes
    into the error report;
11. the PEP 578 audit hook, restricted builtins and an import allow-list:
    clear errors for what is not allowed, in Python's own terms.
After each task:
12. the integrity check: a tampered hook, a thread, an interval timer or a
    signal handler left behind makes the task a violation and the sandbox
    is discarded;
13. an idle sandbox is stopped (SIGSTOP) until its next task, so nothing it
    left running (say, after forging its own reply) runs meanwhile.

Layers 10-12 live in the sandbox's own address space: user code that reaches
frames can tamper with them, and layers 1-9 are the boundary. Where the
kernel lacks a layer, the sandbox reports it and the worker logs, at start,
which layers are on and which are off (`pool.log_layers`). Tests switch
layers off one at a time (`SandboxLimits.layers_off`) to show what each
alone stops.
"""
