"""The sandbox process: lock down, then load one function payload and run
its tasks, one message at a time, until the worker closes the pipe.

Wire format on the pipe (parent -> child): `L` + dill payload, or `R` +
phase byte + canonical rows. Child -> parent: `+` + JSON once locked down;
then for each message `0` + canonical result bytes or `1` + canonical error
document. The parent never unpickles anything from here.
"""

from __future__ import annotations

import gc
import io
import json
import os
import sys
from multiprocessing.connection import Connection

import dill
import dill._dill as dill_internals

from ec262.collector import BULK_GC_THRESHOLDS
from ec262.encoding import decode_pairs, encode_result
from ec262.remote_errors import document_for, error_document
from worker_service.mapreduce import run_task
from worker_service.sandbox import isolation as isolation_layer
from worker_service.sandbox import landlock, lockdown, seccomp
from worker_service.sandbox.isolation import Isolation
from worker_service.sandbox.policy import SandboxLimits

OK = b"0"
FAILED = b"1"
READY = b"+"
LOAD = b"L"
RUN = b"R"

# What a payload may ask of dill while loading: constructors, nothing that
# opens files, evaluates text or wraps raw pointers.
_DILL_LOADERS = frozenset({
    "_create_function", "_create_code", "_create_cell", "_create_type", "_load_type",
    "_create_namedtuple", "_get_attr", "_getattr", "_import_module", "_create_weakref",
    "_create_weakproxy", "_create_typing_tuple", "_create_lock", "_create_rlock",
    "_create_ftype", "_setitems", "_getattribute",
})  # fmt: skip
_PICKLE_HELPERS = frozenset({"copyreg", "_codecs", "collections"})


class PayloadLoader:
    """Unpickles a payload with the sandbox's rules: only allowed modules,
    and every function it defines gets the restricted builtins."""

    def __init__(self, allowed: frozenset[str], safe_builtins: dict) -> None:
        self.allowed = allowed
        self.safe_builtins = safe_builtins
        self.user_files: set[str] = set()

    def _check_module(self, name: str) -> None:
        if name.partition(".")[0] not in self.allowed:
            raise lockdown.SandboxViolation(
                f"sandbox: the function payload needs module {name}, which is not allowed"
            )

    def _create_function(self, fcode, fglobals, *args):
        fglobals = fglobals if fglobals is not None else {}
        fglobals["__builtins__"] = self.safe_builtins
        return dill_internals._create_function(fcode, fglobals, *args)

    def _create_code(self, *args):
        code = dill_internals._create_code(*args)
        self.user_files.add(code.co_filename)
        return code

    def _import_module(self, name: str, safe: bool = False):
        self._check_module(name)
        return dill_internals._import_module(name, safe)

    def find_class(self, module: str, name: str):
        if module == "dill._dill" or (module == "dill" and name == "_dill"):
            if module == "dill":
                return dill_internals
            if name not in _DILL_LOADERS:
                raise lockdown.SandboxViolation(f"sandbox: dill loader {name} is not allowed")
            return getattr(self, name, None) or getattr(dill_internals, name)
        if module in ("builtins", "__builtin__"):
            if name not in self.safe_builtins or name == "__import__":
                raise lockdown.SandboxViolation(f"sandbox: builtin {name} is not allowed")
            return self.safe_builtins[name]
        if module not in _PICKLE_HELPERS:
            self._check_module(module)
        return None  # the default lookup

    def load(self, payload: bytes) -> dict:
        loader = self

        class Unpickler(dill.Unpickler):
            def find_class(self, module, name):
                found = loader.find_class(module, name)
                return found if found is not None else super().find_class(module, name)

        functions = Unpickler(io.BytesIO(payload)).load()
        if not isinstance(functions, dict) or not callable(functions.get("function")):
            raise TypeError("the payload is not an ec262 function payload")
        combiner = functions.get("combiner")
        if combiner is not None and not callable(combiner):
            raise TypeError("the payload's combiner is not callable")
        return functions


def lock_down(
    conn: Connection, limits: SandboxLimits, isolation: Isolation, cgroup: str
) -> tuple[dict, dict]:
    """The layers that go on inside the sandbox, in the order of
    `worker_service/sandbox/__init__.py`; (what is on, the safe builtins)."""
    fd = conn.fileno()
    isolation_layer.die_with_parent()
    os.chdir("/")
    if "capabilities" not in limits.layers_off:
        isolation_layer.drop_capabilities(isolation)
    lockdown.apply_rlimits(limits)
    off = limits.layers_off
    landlock_abi = 0 if "landlock" in off else landlock.restrict_to_reading(limits.read_dirs)
    seccomp_on = "seccomp" not in off and seccomp.apply_seccomp(fd)
    sys.stdout = sys.stderr = lockdown.BoundedOutput(OUTPUT_TAIL_CHARS)
    safe_builtins = lockdown.restricted_builtins(limits.allowed_modules)
    if "audit_hook" not in off:
        sys.addaudithook(lockdown.make_audit_hook(limits.read_dirs))
    layers = {
        "uid": isolation.uid,
        "dedicated_uid": isolation.dedicated_uid,
        "namespaces": isolation.namespaces,
        "filesystem": isolation.filesystem,
        "capabilities_dropped": isolation.capabilities_dropped,
        "cgroup": cgroup,
        "landlock": landlock_abi,
        "seccomp": seccomp_on,
        "problems": isolation.problems,
    }
    return layers, safe_builtins


def _summary(document: bytes) -> str:
    """`Type: message` of an encoded error document."""
    try:
        error = dict(decode_pairs(document))["error"]
        return f"{error['type']}: {error['message']}"
    except Exception:
        return "an error"


def _failed(type_name: str, message: str, output: str = "") -> tuple[bytes, bytes]:
    document = error_document(type_name, message)
    if output:
        document["error"]["output"] = output
    return FAILED, encode_result(document)


# How much of what a task printed its error report keeps (the end of it).
OUTPUT_TAIL_CHARS = 2000


def _printed() -> str:
    """What the task wrote to stdout and stderr, and forget it."""
    take = getattr(sys.stdout, "take", None)
    return take() if callable(take) else ""


def _handle(
    kind: bytes, body: bytes, limits: SandboxLimits, loader: PayloadLoader, functions: dict | None
) -> tuple[bytes, bytes] | dict:
    """(status, reply body) for one message; after LOAD, the functions."""
    try:
        if kind == LOAD:
            return loader.load(body)
        if kind != RUN or functions is None:
            return _failed("SandboxError", "sandbox received a task before a function payload")
        result = encode_result(run_task(body[0], functions, decode_pairs(body[1:])))
        if len(result) > limits.output_limit_bytes:
            return _failed(
                "ResultTooLarge",
                f"the task's result is {len(result)} bytes of canonical JSON, over the"
                f" limit of {limits.output_limit_bytes} bytes a result may have",
                _printed(),
            )
        _printed()
        return OK, result
    except BaseException as error:  # user code: anything, SystemExit included
        try:
            document = document_for(error, loader.user_files)
            output = _printed()
            if output:
                document["error"]["output"] = output
            return FAILED, encode_result(document)
        except MemoryError:
            del error
            return _failed("MemoryError", "the task ran out of memory")


def main(conn: Connection, limits: SandboxLimits, isolation: Isolation, cgroup: str) -> None:
    """Entry point of the sandbox process (forked by its keeper)."""
    gc.set_threshold(*BULK_GC_THRESHOLDS)  # for good: a sandbox only runs tasks
    layers, safe_builtins = lock_down(conn, limits, isolation, cgroup)
    conn.send_bytes(READY + json.dumps(layers).encode())
    loader = PayloadLoader(limits.allowed_modules, safe_builtins)
    functions: dict | None = None
    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):
            os._exit(0)
        reply = _handle(message[:1], message[1:], limits, loader, functions)
        if isinstance(reply, dict):
            functions, reply = reply, (OK, b"")
            gc.freeze()  # the user's functions and what they loaded stay
        problems = lockdown.integrity_problems(hook="audit_hook" not in limits.layers_off)
        if problems:
            outcome = "succeeded" if reply[0] == OK else f"failed with {_summary(reply[1])}"
            reply = _failed(
                "SandboxViolation",
                f"sandbox tampering detected: {'; '.join(problems)}; the task {outcome}",
            )
            conn.send_bytes(reply[0] + reply[1])
            os._exit(0)  # never reused
        conn.send_bytes(reply[0] + reply[1])
