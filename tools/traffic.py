"""Mixed streaming traffic for a served model, shared by the serving soak test and the memory
benchmark: completions of mixed lengths, some aborted mid-stream (the client closes the stream),
some with lade disabled or a smaller tree per request, some sampled (seeded).

    jobs = make_jobs(40, seed=0, num_prompts=10)
    results = run_jobs(server, prompt_texts, jobs, clients=8)
"""
from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tools.server import MODEL_NAME, Server

MAX_TOKENS = (8, 24, 48, 64)
ABORT_FRACTION = 0.2
#: vllm_xargs["lade"] per job, drawn uniformly: mostly the server's default, some off, one smaller
SAMPLED_TEMPERATURE = 0.8
PER_REQUEST_OPTIONS = (None, None, None, None, None, None, None, "false",
                       '{"window_size": 2, "ngram_size": 3, "guess_set_size": 1}', "true")


@dataclass
class Job:
    idx: int
    prompt_idx: int
    max_tokens: int
    abort_after: int | None  # close the stream after this many chunks
    lade: str | None         # vllm_xargs["lade"]
    seed: int | None = None  # sampled at SAMPLED_TEMPERATURE with this seed; None: greedy


@dataclass
class Result:
    job: Job
    status: str              # "done" | "aborted" | "error"
    text: str = ""
    token_ids: tuple = ()
    finish_reason: str | None = None
    error: str = ""


def make_jobs(n: int, seed: int, num_prompts: int, max_tokens=MAX_TOKENS,
              sampled_fraction: float = 0.0) -> list[Job]:
    """``n`` jobs with fixed randomness: ABORT_FRACTION of them aborted after 1-4 chunks (with
    the longest ``max_tokens``, so the abort lands mid-stream), ``sampled_fraction`` seeded."""
    rng = random.Random(seed)
    aborted = set(rng.sample(range(n), round(ABORT_FRACTION * n)))
    sampled = set(rng.sample(range(n), round(sampled_fraction * n)))
    jobs = []
    for i in range(n):
        abort = rng.randint(1, 4) if i in aborted else None
        length = max(max_tokens) if i in aborted else rng.choice(max_tokens)
        jobs.append(Job(i, rng.randrange(num_prompts), length, abort,
                        rng.choice(PER_REQUEST_OPTIONS), i if i in sampled else None))
    return jobs


def stream_one(client, prompt: str, job: Job) -> Result:
    extra = {"return_token_ids": True}
    if job.lade is not None:
        extra["vllm_xargs"] = {"lade": job.lade}
    sampling = {"temperature": 0.0} if job.seed is None else {"temperature": SAMPLED_TEMPERATURE,
                                                                "seed": job.seed}
    text, ids, chunks, finish = [], [], 0, None
    try:
        stream = client.completions.create(model=MODEL_NAME, prompt=prompt,
                                           max_tokens=job.max_tokens, stream=True,
                                           extra_body=extra, **sampling)
        for chunk in stream:
            if not chunk.choices:
                continue
            choice = chunk.choices[0]
            text.append(choice.text or "")
            ids.extend(getattr(choice, "token_ids", None) or [])
            finish = choice.finish_reason or finish
            chunks += 1
            if job.abort_after is not None and chunks >= job.abort_after and finish is None:
                stream.close()  # the client goes away mid-stream: the server must abort
                return Result(job, "aborted", "".join(text), tuple(ids))
    except Exception as exc:  # noqa: BLE001 - every failure is reported to the caller
        return Result(job, "error", "".join(text), tuple(ids), finish, repr(exc))
    return Result(job, "done", "".join(text), tuple(ids), finish)


def run_jobs(server: Server, prompt_texts: list[str], jobs: list[Job],
             clients: int) -> list[Result]:
    """All ``jobs`` from ``clients`` concurrent streaming clients (one openai client each)."""
    local = threading.local()

    def work(job: Job) -> Result:
        if not hasattr(local, "client"):
            local.client = server.client()
        return stream_one(local.client, prompt_texts[job.prompt_idx], job)

    with ThreadPoolExecutor(max_workers=clients) as pool:
        return list(pool.map(work, jobs))
