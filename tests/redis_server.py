"""A real redis-server for the tests: loopback, an ephemeral port, no
persistence, stopped after."""

from __future__ import annotations

import random
import shutil
import subprocess
import threading

READY = "Ready to accept connections"


class RedisServer:
    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "redis-server is not installed: `make test` installs it (Debian package"
                " redis-server); on another system install Redis 6 or newer"
            )
        # Redis cannot bind port 0, so try ports in the ephemeral range until
        # one binds (the server itself binds it: nothing is probed and reused).
        for _ in range(20):
            port = random.randint(20000, 59999)
            process = subprocess.Popen(
                [
                    binary,
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--daemonize",
                    "no",
                    "--protected-mode",
                    "yes",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            lines = []
            for line in process.stdout:
                lines.append(line)
                if READY in line or "Address already in use" in line:
                    break
            if lines and READY in lines[-1]:
                self.process, self.port = process, port
                threading.Thread(target=process.stdout.read, daemon=True).start()
                return
            process.kill()
            process.wait(timeout=10)
        raise RuntimeError(f"redis-server did not start: {''.join(lines)}")

    def url(self, prefix: str) -> str:
        return f"redis://127.0.0.1:{self.port}/0?prefix={prefix}"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)
