"""The serving tests' servers: tools.server.Server with the test defaults.

    with lade_server(model_dir, ["--speculative-config", "lade"], log_path) as server:
        server.client()            # openai.OpenAI for server.base_url
"""
from __future__ import annotations

from tools.server import MODEL_NAME, Server  # noqa: F401

#: `vllm serve` arguments every test server gets: float32 (exactness), eager (fast start), seeded
SERVER_ARGS = ["--dtype", "float32", "--enforce-eager", "--seed", "0"]


def lade_server(model_dir: str, extra_args: list[str], log_path, **kwargs) -> Server:
    """A `vllm serve` subprocess with the test defaults and ``extra_args``."""
    return Server(model_dir, [*SERVER_ARGS, *extra_args], log_path, **kwargs)
