"""Escape attempts against the worker's sandbox (docs/protocol.md section 5).

Every attack is a plain function (module-level, or local to its test) that a
stranger could submit as a mapper. `pack_functions` pickles it by value (dill,
recurse=True), with the module-level helpers it calls, so the attack code
really runs inside a sandbox process (the control test checks that). Each attack gets, as its row
value, the paths and port it should aim at:

- `dir`: a fresh directory where it tries to create files;
- `marker`: a file a shell command (`touch marker`) would create;
- `secret_file`: a stand-in for the worker's identity file (mode 0600) holding
  `secret`, which must never come back in a result;
- `port`: a listener on 127.0.0.1 that nobody may connect to.

`assert_contained` then checks the outcome: an error document, no new file,
no connection, no secret, and the pool still computes a word count for
another foreman. The corpus runs against a root worker's pool and an
unprivileged worker's (tests/sandbox_harness.py); the attacks of the
operating-system kind are in test_sandbox_os_attacks.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import threading
import time

import dill
import pytest

from ec262.encoding import decode_result
from ec262.payload import digest, pack_functions
from tests.sandbox_harness import (
    LIMITS,
    SECCOMP,
    TASK_TIMEOUT,
    Target,
    _caller_frames,
    _disable_audit_hook,
    _frame_global,
    _modules,
    _real_builtins,
    assert_contained,
    assert_still_serving,
    pool_kinds,
    pool_owner,
    run_attack,
    start_pool,
    unhooked_fork,
)
from worker_service.mapreduce import MAP
from worker_service.sandbox.pool import SandboxPool

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module", params=pool_kinds())
def pool(request):
    """The module's pool: a root worker's, and an unprivileged one's."""
    sandbox_pool = start_pool(request.param)
    yield sandbox_pool
    sandbox_pool.close()


def _new_pool() -> SandboxPool:
    return SandboxPool(LIMITS, size=2)


@pytest.fixture
def private_pool():
    """A pool of its own, for attacks that leave a sandbox busy or alive."""
    sandbox_pool = _new_pool()
    yield sandbox_pool
    sandbox_pool.close()  # the zygote exits, and its sandboxes die with it


@pytest.fixture
def target(request):
    uses_pool = "pool" in request.fixturenames
    aim = Target(pool_owner(request.getfixturevalue("pool")) if uses_pool else os.geteuid())
    yield aim
    aim.close()


# -- the attacks ---------------------------------------------------------------


def control(key, value):
    """Nothing dangerous: proves the attack code runs in the sandbox."""
    import random

    builtins_seen = globals()["__builtins__"]
    yield "open_visible", "open" in builtins_seen
    yield "pid", random._os.getpid()


def open_write(key, value):
    with open(value["dir"] + "/pwned", "w") as handle:
        handle.write("x")
    yield "wrote", 1


def open_from_builtins_dict(key, value):
    writer = globals()["__builtins__"]["open"]
    writer(value["dir"] + "/pwned", "w").write("x")
    yield "wrote", 1


def import_io(key, value):
    import io

    io.FileIO(value["dir"] + "/pwned", "w").write(b"x")
    yield "wrote", 1


def io_open_reached(key, value):
    import typing

    io = typing.sys.modules["io"]
    io.open(value["dir"] + "/pwned", "w").write("x")
    yield "wrote", 1


def io_fileio_reached(key, value):
    io = _modules()["_io"]
    io.FileIO(value["dir"] + "/pwned", "w").write(b"x")
    yield "wrote", 1


def pathlib_write(key, value):
    pathlib = _real_builtins()["__import__"]("pathlib")
    pathlib.Path(value["dir"], "pwned").write_text("x")
    yield "wrote", 1


def os_open_creat(key, value):
    import random

    os = random._os
    fd = os.open(value["dir"] + "/pwned", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"x")
    yield "wrote", 1


def os_system(key, value):
    import random

    yield "status", random._os.system("touch " + value["marker"])


def subprocess_run(key, value):
    subprocess = _real_builtins()["__import__"]("subprocess")
    subprocess.run(["touch", value["marker"]], check=True)
    yield "ran", 1


def os_fork(key, value):
    import random

    pid = random._os.fork()
    if pid == 0:
        random._os.system("touch " + value["marker"])
        random._os._exit(0)
    yield "forked", pid


def os_execv(key, value):
    import random

    random._os.execv("/usr/bin/touch", ["touch", value["marker"]])
    yield "exec", 1


def os_posix_spawn(key, value):
    import random

    os = random._os
    pid = os.posix_spawn("/usr/bin/touch", ["touch", value["marker"]], dict(os.environ))
    yield "spawned", pid


def socket_connect(key, value):
    socket = _modules()["socket"]
    connection = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    connection.connect(("127.0.0.1", value["port"]))
    connection.sendall(b"pwned")
    yield "connected", 1


def ctypes_system(key, value):
    ctypes = _modules()["ctypes"]
    libc = ctypes.CDLL(None)
    yield "status", libc.system(("touch " + value["marker"]).encode())


def ctypes_pythonapi(key, value):
    ctypes = _modules()["ctypes"]
    code = "import os; os.system(%r)" % ("touch " + value["marker"])
    yield "status", ctypes.pythonapi.PyRun_SimpleString(code.encode())


def import_os(key, value):
    import os

    yield "status", os.system("touch " + value["marker"])


def dunder_import_os(key, value):
    os = __import__("os")
    yield "status", os.system("touch " + value["marker"])


def importlib_import_os(key, value):
    importlib = _modules()["importlib"]
    os = importlib.import_module("os")
    yield "status", os.system("touch " + value["marker"])


def builtins_dict_import(key, value):
    builtins_seen = globals()["__builtins__"]
    os = builtins_seen["__import__"]("os")
    yield "status", os.system("touch " + value["marker"])


def builtins_getattr_import(key, value):
    import random

    real_builtins = random.__builtins__  # a module's real builtins dict
    os = real_builtins["__import__"]("posix")
    yield "status", os.system("touch " + value["marker"])


def subclasses_wrap_close(key, value):
    for cls in ().__class__.__base__.__subclasses__():
        if cls.__name__ == "_wrap_close":
            cls.__init__.__globals__["system"]("touch " + value["marker"])
    yield "walked", 1


def subclasses_catch_warnings_open(key, value):
    for cls in ().__class__.__base__.__subclasses__():
        if cls.__name__ == "catch_warnings":
            real_open = cls.__init__.__globals__["__builtins__"]["open"]
            real_open(value["dir"] + "/pwned", "w").write("x")
    yield "walked", 1


def subclasses_builtin_importer(key, value):
    for cls in ().__class__.__base__.__subclasses__():
        if cls.__name__ == "BuiltinImporter":
            posix = cls.load_module("posix")
            posix.system("touch " + value["marker"])
    yield "walked", 1


def allowed_module_globals_random(key, value):
    import random

    yield "status", random._os.system("touch " + value["marker"])


def allowed_module_globals_sys_modules(key, value):
    import collections

    modules = collections._sys.modules
    yield "same_json", modules["json"] is json
    yield "status", modules["os"].system("touch " + value["marker"])


def traceback_frame_builtins(key, value):
    try:
        raise ValueError
    except ValueError as caught:
        caller = caught.__traceback__.tb_frame.f_back
    real_open = caller.f_builtins["open"]
    real_open(value["dir"] + "/pwned", "w").write("x")
    yield "wrote", 1


def traceback_frame_globals(key, value):
    try:
        raise ValueError
    except ValueError as caught:
        frame = caught.__traceback__.tb_frame
    while "os" not in frame.f_globals:
        frame = frame.f_back
    yield "status", frame.f_globals["os"].system("touch " + value["marker"])


def generator_frame(key, value):
    seen = []

    def spy():
        seen.append(running.gi_frame.f_back)  # the frame that resumed us
        yield None

    running = spy()
    next(running)
    frame = seen[0]
    while "os" not in frame.f_globals:  # up to the sandbox's own modules
        frame = frame.f_back
    yield "status", frame.f_globals["os"].system("touch " + value["marker"])


def sys_getframe(key, value):
    import collections

    frame = collections._sys._getframe(1)
    while "os" not in frame.f_globals:
        frame = frame.f_back
    yield "status", frame.f_globals["os"].system("touch " + value["marker"])


def read_identity_file(key, value):
    yield "stolen", _real_builtins()["open"](value["secret_file"]).read()


def read_etc_passwd(key, value):
    yield "stolen", _modules()["io"].open("/etc/passwd").read()


def read_with_io_open(key, value):
    yield "stolen", _modules()["_io"].open(value["secret_file"]).read()


def read_with_os_read(key, value):
    import random

    os = random._os
    fd = os.open(value["secret_file"], os.O_RDONLY)
    yield "stolen", os.read(fd, 4096).decode()


def read_with_open_code(key, value):
    yield "stolen", _modules()["io"].open_code(value["secret_file"]).read().decode()


def fork_bomb(key, value):
    import random

    while True:
        random._os.fork()


def memory_bomb(key, value):
    hog = bytearray(10**10)
    yield "size", len(hog)


def list_append_bomb(key, value):
    hog = []
    while True:
        hog.append("x" * 4096 + str(len(hog)))


def endless_loop(key, value):
    while True:
        pass


def huge_output(key, value):
    filler = "y" * 200  # about 44 MB of result; a million keys only hits the timeout sooner
    for number in range(2 * 10**5):
        yield f"k{number:07d}", filler


# Attacks that first switch the audit hook off, so the kernel layers (seccomp,
# Landlock) have to stop them alone; the sandbox then notices the tampering
# after the task and reports it, with the kernel's refusal, as a violation.


def unhooked_open_write(key, value):
    _disable_audit_hook()
    _real_builtins()["open"](value["dir"] + "/pwned", "w").write("x")
    yield "wrote", 1


def unhooked_os_open_creat(key, value):
    _disable_audit_hook()
    os = _modules()["os"]
    fd = os.open(value["dir"] + "/pwned", os.O_WRONLY | os.O_CREAT, 0o644)
    yield "fd", fd


def unhooked_execv(key, value):
    _disable_audit_hook()
    _modules()["os"].execv("/usr/bin/touch", ["touch", value["marker"]])
    yield "exec", 1


def unhooked_posix_spawn(key, value):
    _disable_audit_hook()
    os = _modules()["os"]
    yield "spawned", os.posix_spawn("/usr/bin/touch", ["touch", value["marker"]], {})


def unhooked_socket(key, value):
    _disable_audit_hook()
    socket = _modules()["socket"]
    connection = socket.create_connection(("127.0.0.1", value["port"]), timeout=1)
    yield "connected", connection.fileno()


def unhooked_ctypes(key, value):
    _disable_audit_hook()
    ctypes = _modules()["ctypes"]
    yield "status", ctypes.CDLL(None).system(("touch " + value["marker"]).encode())


# (attack, error type, text the message must contain: which layer stopped it)
HOOK = "sandbox: "
CORPUS = [
    pytest.param(open_write, "SandboxViolation", "needs module io", id="open-write"),
    pytest.param(open_from_builtins_dict, "KeyError", "open", id="builtins-dict-open"),
    pytest.param(import_io, "SandboxViolation", "importing io", id="import-io"),
    pytest.param(io_open_reached, "SandboxViolation", HOOK + "writing", id="io-open-reached"),
    pytest.param(io_fileio_reached, "SandboxViolation", HOOK + "writing", id="io-fileio"),
    pytest.param(pathlib_write, "SandboxViolation", HOOK + "writing", id="pathlib-write"),
    pytest.param(os_open_creat, "SandboxViolation", HOOK + "writing", id="os-open-creat"),
    pytest.param(os_system, "SandboxViolation", HOOK + "os.system", id="os-system"),
    pytest.param(subprocess_run, "SandboxViolation", HOOK + "subprocess", id="subprocess"),
    pytest.param(os_fork, "SandboxViolation", HOOK + "os.fork", id="os-fork"),
    pytest.param(os_execv, "SandboxViolation", HOOK + "os.exec", id="os-execv"),
    pytest.param(os_posix_spawn, "SandboxViolation", HOOK + "os.posix_spawn", id="posix-spawn"),
    pytest.param(socket_connect, "SandboxViolation", HOOK + "socket.__new__", id="socket-connect"),
    pytest.param(ctypes_system, "SandboxViolation", HOOK + "ctypes", id="ctypes-cdll"),
    pytest.param(ctypes_pythonapi, "SandboxViolation", HOOK + "ctypes", id="ctypes-pythonapi"),
    pytest.param(import_os, "SandboxViolation", "importing os", id="import-os"),
    pytest.param(
        dunder_import_os, "SandboxViolation", "builtin __import__ is not", id="dunder-import-os"
    ),
    pytest.param(importlib_import_os, "SandboxViolation", HOOK + "os.system", id="importlib"),
    pytest.param(
        builtins_dict_import, "SandboxViolation", "importing os", id="builtins-dict-import"
    ),
    pytest.param(
        builtins_getattr_import, "SandboxViolation", HOOK + "os.system", id="module-builtins"
    ),
    pytest.param(
        subclasses_wrap_close, "SandboxViolation", HOOK + "os.system", id="subclasses-wrap-close"
    ),
    pytest.param(
        subclasses_catch_warnings_open,
        "SandboxViolation",
        HOOK + "writing",
        id="subclasses-catch-warnings",
    ),
    pytest.param(
        subclasses_builtin_importer,
        "SandboxViolation",
        HOOK + "os.system",
        id="subclasses-builtin-importer",
    ),
    pytest.param(
        allowed_module_globals_random, "SandboxViolation", HOOK + "os.system", id="random-os"
    ),
    pytest.param(
        allowed_module_globals_sys_modules,
        "SandboxViolation",
        HOOK + "os.system",
        id="collections-sys-modules",
    ),
    pytest.param(
        traceback_frame_builtins, "SandboxViolation", HOOK + "writing", id="tb-frame-builtins"
    ),
    pytest.param(
        traceback_frame_globals, "SandboxViolation", HOOK + "os.system", id="tb-frame-globals"
    ),
    pytest.param(generator_frame, "SandboxViolation", HOOK + "os.system", id="gi-frame-f-back"),
    pytest.param(sys_getframe, "SandboxViolation", HOOK + "os.system", id="sys-getframe"),
    pytest.param(read_identity_file, "SandboxViolation", HOOK + "reading", id="read-identity"),
    pytest.param(read_etc_passwd, "SandboxViolation", HOOK + "reading", id="read-etc-passwd"),
    pytest.param(read_with_io_open, "SandboxViolation", HOOK + "reading", id="read-io-open"),
    pytest.param(read_with_os_read, "SandboxViolation", HOOK + "reading", id="read-os-open"),
    pytest.param(read_with_open_code, "SandboxViolation", "importing _io", id="read-open-code"),
    pytest.param(fork_bomb, "SandboxViolation", HOOK + "os.fork", id="fork-bomb"),
    pytest.param(unhooked_open_write, "SandboxViolation", SECCOMP, id="unhooked-open-write"),
    pytest.param(unhooked_os_open_creat, "SandboxViolation", SECCOMP, id="unhooked-os-open"),
    pytest.param(unhooked_fork, "SandboxViolation", SECCOMP, id="unhooked-fork"),
    pytest.param(unhooked_execv, "SandboxViolation", SECCOMP, id="unhooked-execv"),
    pytest.param(unhooked_posix_spawn, "SandboxViolation", SECCOMP, id="unhooked-posix-spawn"),
    pytest.param(unhooked_socket, "SandboxViolation", SECCOMP, id="unhooked-socket"),
]


# -- the tests -----------------------------------------------------------------


def test_attack_code_travels_by_value_and_runs_in_the_sandbox(pool, target):
    payload = pack_functions(control)
    assert b"_create_function" in payload  # by value, not a reference to this module
    result = run_attack(pool, control, target, payload)
    assert result.ok, result.plaintext
    produced = decode_result(result.plaintext)
    assert produced["open_visible"] == [False]  # the restricted builtins
    (pid,) = produced["pid"]
    assert pid != os.getpid()


@pytest.mark.parametrize(("attack", "error_type", "message"), CORPUS)
def test_escape_attempt_is_contained(pool, target, attack, error_type, message):
    if message == SECCOMP:
        assert_still_serving(pool)  # starts a sandbox, so the pool knows about seccomp
        if not pool.seccomp_active:
            pytest.skip("no seccomp on this machine")
    result = run_attack(pool, attack, target)
    error = assert_contained(pool, target, result)
    assert error["type"] == error_type, error
    assert message in error["message"], error
    if message == SECCOMP:
        assert "tampering detected" in error["message"], error


def test_ctypes_unusable_even_with_the_audit_hook_off(pool, target):
    """ctypes is already loaded in every sandbox (sandbox_child imports it),
    so with the hook off, nothing but seccomp stands between user code and
    arbitrary native calls: here libc's system(), which seccomp makes fail
    (status 127 << 8) without an exception."""
    result = run_attack(pool, unhooked_ctypes, target)
    error = assert_contained(pool, target, result)
    assert error["type"] == "SandboxViolation", error
    assert "tampering detected" in error["message"], error


def test_memory_bomb(pool, target):
    error = assert_contained(pool, target, run_attack(pool, memory_bomb, target))
    assert error["type"] == "MemoryError", error


def test_list_append_memory_bomb(pool, target):
    error = assert_contained(pool, target, run_attack(pool, list_append_bomb, target))
    assert error["type"] in {"MemoryError", "SandboxCrashed"}, error


def test_endless_loop_is_killed_at_the_timeout(pool, target):
    started = time.monotonic()
    result = run_attack(pool, endless_loop, target)
    elapsed = time.monotonic() - started
    error = assert_contained(pool, target, result)
    assert error["type"] == "TimeoutError", error
    assert TASK_TIMEOUT <= elapsed < TASK_TIMEOUT + 2


def test_huge_output(pool, target):
    error = assert_contained(pool, target, run_attack(pool, huge_output, target))
    assert error["type"] == "ResultTooLarge", error
    assert "43600001 bytes" in error["message"], error  # its size
    assert f"{LIMITS.output_limit_bytes} bytes" in error["message"], error  # and the cap


# -- attacks in the payload itself, run while it is unpickled -------------------


class _Reduce:
    """Pickles as `func(*args)`: whatever it describes runs at load time."""

    def __init__(self, func, args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)

    def __call__(self, *args):  # pickle wants the callable part to be callable
        raise NotImplementedError


def _payload(function) -> bytes:
    return dill.dumps({"function": function, "combiner": None}, recurse=True)


def test_payload_reduce_calls_os_system(pool, target):
    payload = pickle.dumps({"function": _Reduce(os.system, ("touch " + target.marker,))})
    error = assert_contained(pool, target, run_attack(pool, None, target, payload))
    assert error["type"] == "SandboxViolation", error
    assert "needs module posix" in error["message"], error


def test_payload_reaches_os_system_through_dill_get_attr(pool, target):
    get_attr = dill._dill._get_attr
    reached_os = _Reduce(get_attr, (random, "_os"))
    system = _Reduce(get_attr, (reached_os, "system"))
    payload = _payload(_Reduce(system, ("touch " + target.marker,)))
    error = assert_contained(pool, target, run_attack(pool, None, target, payload))
    assert error["type"] == "SandboxViolation", error
    assert "sandbox: os.system is not allowed" in error["message"], error


def test_payload_switches_the_audit_hook_off_then_forks(pool, target):
    """At load time, `getattr`/`setattr` (allowed builtins) walk from an
    allowed module to `worker_service.lockdown` and empty its list of denied
    events; then os.fork. The hook keeps its own copy of the policy, so it
    still denies the fork."""
    reached_os = _Reduce(getattr, (random, "_os"))
    modules = _Reduce(getattr, (_Reduce(getattr, (reached_os, "sys")), "modules"))
    lockdown = _Reduce(_Reduce(getattr, (modules, "get")), ("worker_service.sandbox.lockdown",))
    switch_off = _Reduce(setattr, (lockdown, "_DENIED_EVENT_PREFIXES", ()))
    fork = _Reduce(_Reduce(getattr, (reached_os, "fork")), ())
    payload = _payload([switch_off, fork])
    result = run_attack(pool, None, target, payload)
    error = assert_contained(pool, target, result)
    assert error["type"] == "SandboxViolation", error
    assert "sandbox: os.fork is not allowed" in error["message"], error


# -- escapes past the Python-level layers: the kernel must stop them --------------


def steal_with_the_hook_off(key, value):
    _disable_audit_hook()
    yield "stolen", _real_builtins()["open"](value["secret_file"]).read()


@pytest.mark.parametrize(
    ("layers_off", "refusal"),
    [
        pytest.param(frozenset(), "No such file or directory", id="file-system-view"),
        pytest.param(frozenset({"filesystem"}), "Permission denied", id="landlock"),
        pytest.param(frozenset({"filesystem", "landlock"}), "Permission denied", id="own-uid"),
    ],
)
def test_identity_file_unreadable_with_the_audit_hook_off(target, layers_off, refusal):
    """User code can reach the hook's `deny` through a denial's traceback and
    neuter it; seccomp does not look at paths. Each kernel layer alone keeps
    the worker's 0600 identity file out of reach: the sandbox's file system
    has no such file; Landlock refuses to open it; and the sandbox's own uid
    may not read the worker's file."""
    layer_pool = SandboxPool(dataclasses.replace(LIMITS, layers_off=layers_off), size=1)
    try:
        assert_still_serving(layer_pool)
        layers = layer_pool.layers
        if "landlock" not in layers_off and not layers["landlock"]:
            pytest.skip("no Landlock in this kernel")
        if "filesystem" not in layers_off and layers["filesystem"] == "host":
            pytest.skip(f"no file system view here: {layers['problems']}")
        if layers_off >= {"filesystem", "landlock"} and not layers["dedicated_uid"]:
            pytest.skip("the worker is not root: the sandbox shares its uid")
        result = run_attack(layer_pool, steal_with_the_hook_off, target)
        error = assert_contained(layer_pool, target, result)
        assert "tampering detected" in error["message"], error
        assert refusal in error["message"], error
    finally:
        layer_pool.close()


def test_identity_file_unreadable_after_widening_the_hooks_read_dirs(pool, target):
    """The same, by rewriting the hook's closure cell that lists readable dirs."""

    def steal(key, value):
        real_open = _real_builtins()["open"]
        try:
            real_open(value["secret_file"])
        except PermissionError as denial:
            tb = denial.__traceback__
            while tb is not None:
                if tb.tb_frame.f_code.co_name == "hook":
                    for cell in tb.tb_frame.f_locals["readable"].__closure__:
                        if isinstance(cell.cell_contents, tuple):
                            cell.cell_contents = ("/",)
                tb = tb.tb_next
        yield "stolen", real_open(value["secret_file"]).read()

    result = run_attack(pool, steal, target)
    assert_contained(pool, target, result)


def signal_other_process(key, value):
    """No kill(2); pidfd_open + pidfd_send_signal must be refused too."""
    os = _frame_global("os")
    signal = _frame_global("signal")
    signal.pidfd_send_signal(os.pidfd_open(value["victim_pid"]), signal.SIGKILL)
    yield "killed", value["victim_pid"]


def test_cannot_signal_other_processes(pool, target):
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        target.extra["victim_pid"] = victim.pid
        result = run_attack(pool, signal_other_process, target)
    finally:
        # A SIGKILL the sandbox sent is already fatal, so this SIGTERM can
        # only decide the exit status if the sandbox's signal never came.
        with contextlib.suppress(ProcessLookupError):
            victim.terminate()
        victim.wait(timeout=10)
    assert victim.returncode == -signal.SIGTERM, "a sandbox killed another process"
    assert_contained(pool, target, result)


def half_a_reply(key, value):
    """Write the length header of a reply on the result pipe, then spin: the
    worker has seen data arrive and waits for the rest with no deadline."""
    for frame in _caller_frames():
        if "conn" in frame.f_locals:
            frame.f_locals["conn"]._send(b"\x00\x00\x00\x10")
    while True:
        pass


def test_half_written_reply_still_times_out(private_pool, target):
    outcome = []
    runner = threading.Thread(
        target=lambda: outcome.append(run_attack(private_pool, half_a_reply, target)),
        daemon=True,
    )
    runner.start()
    runner.join(TASK_TIMEOUT + 3)
    hung = runner.is_alive()
    if hung:
        private_pool.close()  # kills the stuck sandbox; the runner then returns
        runner.join(10)
    assert not hung, "the worker waited past the task timeout for a half-written reply"
    error = assert_contained(private_pool, target, outcome[0])
    assert error["type"] == "TimeoutError", error


def background_thread(key, value):
    """Leave a thread behind in a sandbox that reports success; on a second
    task for the same function, report whether it is still there."""
    threads = _modules()["_thread"]
    if value.get("probe"):
        yield "threads_left", threads._count()
        return

    def linger():
        import time

        while True:
            time.sleep(0.05)  # a real attacker would burn CPU here

    threads.start_new_thread(linger, ())
    yield "started", 1


def test_no_thread_outlives_its_task(private_pool, target):
    payload = pack_functions(background_thread)
    first = run_attack(private_pool, background_thread, target, payload)
    target.extra["probe"] = True
    second = private_pool.run(digest(payload), payload, MAP, target.rows())
    assert second.ok, second.plaintext
    assert decode_result(second.plaintext) == {"threads_left": [0]}, (
        "a thread started by one task was still running in the idle sandbox"
    )
    assert_contained(private_pool, target, first)


def environment_probe(key, value):
    os = _modules()["os"]
    yield "hash_seed", os.environ.get("PYTHONHASHSEED")
    yield "worker_secret_visible", "EC262_TEST_SECRET" in os.environ
    yield "set_order", list({"alpha", "beta", "gamma", "delta", "epsilon"})


def test_sandboxes_get_a_clean_environment_and_a_fixed_hash_seed(monkeypatch, target):
    """Nothing of the worker's environment reaches user code, and string
    hashing is the same in every sandbox, so replicas agree on set order."""
    monkeypatch.setenv("EC262_TEST_SECRET", "worker-only")
    orders = []
    for _ in range(2):  # two pools, two zygotes: two independent processes
        pool = _new_pool()
        try:
            result = run_attack(pool, environment_probe, target)
        finally:
            pool.close()
        assert result.ok, result.plaintext
        produced = decode_result(result.plaintext)
        assert produced["hash_seed"] == ["0"]
        assert produced["worker_secret_visible"] == [False]
        orders.append(produced["set_order"])
    assert orders[0] == orders[1]


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP])
def test_a_dead_or_frozen_zygote_is_replaced_and_the_next_task_runs(target, how, monkeypatch):
    """Whatever ends the zygote (the kernel's OOM killer, a bug, a signal),
    or freezes it, the next task still runs: the pool starts another."""
    from worker_service.sandbox import zygote as zygote_module

    monkeypatch.setattr(zygote_module, "FORK_TIMEOUT", 2.0)  # a frozen zygote, found sooner
    own = _new_pool()
    try:
        assert_still_serving(own, "first-foreman")
        old = own.zygote_pid
        os.kill(old, how)
        assert_still_serving(own, "second-foreman")  # a new sandbox: a fork
        assert own.zygote_pid != old
        assert_still_serving(own, "first-foreman")  # the idle ones went with the old zygote
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(old, signal.SIGKILL)
        own.close()
