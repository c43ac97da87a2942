#!/usr/bin/env python3
"""Load and throughput of an OpenAI-compatible server (lmx serve, mlx_lm.server).

  load:       N concurrent streaming clients x R requests each, a fraction cancelled at a
              random point; reports server errors (5xx, broken streams), 429s, and, for lmx
              serve, the sequences still held afterwards (leaked slots) and the server's
              memory before and after.
  throughput: aggregate completion tokens per second with 1 and with N concurrent streams.

  python3 scripts/bench/serve_load.py --url http://127.0.0.1:8080 load --clients 64 --requests 10
  python3 scripts/bench/serve_load.py --url http://127.0.0.1:8080 throughput --concurrency 1 16
Drives the server with the official openai client (tests/clients/requirements.txt).
"""

import argparse
import asyncio
import json
import random
import time
import urllib.request

import openai

QUESTIONS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain photosynthesis in two sentences.",
    "List three prime numbers.",
    "What is a black hole?",
    "Give me a recipe for pancakes.",
    "Why is the sky blue?",
    "Name the planets of the solar system.",
]


def rss_kb(pid):
    if not pid:
        return None
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


async def one_stream(client, model, max_tokens, cancel_after=None, question=None):
    """Streams one chat completion; returns (completion tokens, outcome)."""
    tokens, chunks = 0, 0
    try:
        stream = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": question or random.choice(QUESTIONS)}],
            max_tokens=max_tokens,
            stream=True,
            stream_options={"include_usage": True},
        )
        finished = False
        async for chunk in stream:
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
            if chunk.choices and chunk.choices[0].finish_reason:
                finished = True
            chunks += 1
            if cancel_after is not None and chunks >= cancel_after:
                await stream.close()
                return tokens, "cancelled"
        return tokens, "ok" if finished else "stream ended without a finish_reason"
    except openai.RateLimitError:
        return 0, "busy"
    except openai.APIError as e:
        return tokens, f"{type(e).__name__}: {e}"


def health(url):
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
            return json.loads(r.read())
    except OSError:
        return {}


async def load(args):
    client = openai.AsyncOpenAI(base_url=f"{args.url}/v1", api_key=args.api_key, max_retries=0, timeout=600)
    outcomes = {}
    before = rss_kb(args.pid)

    async def worker(i):
        rng = random.Random(i)
        for _ in range(args.requests):
            cancel = rng.randint(1, args.max_tokens) if rng.random() < args.cancel else None
            _, outcome = await one_stream(client, args.model, args.max_tokens, cancel)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1

    start = time.time()
    await asyncio.gather(*(worker(i) for i in range(args.clients)))
    took = time.time() - start
    leaked = None
    for _ in range(50):
        leaked = health(args.url).get("sequences")
        if not leaked:
            break
        await asyncio.sleep(0.2)
    after = rss_kb(args.pid)
    errors = sum(n for k, n in outcomes.items() if k not in ("ok", "cancelled", "busy"))
    print(json.dumps({"clients": args.clients, "requests": args.clients * args.requests, "seconds": round(took, 1), "outcomes": outcomes,
                      "server_errors": errors, "leaked_sequences": leaked, "rss_mb_before": before and before // 1024, "rss_mb_after": after and after // 1024}))


async def throughput(args):
    """The same `--total` requests (the questions in turn) at each concurrency: aggregate
    completion tokens per second."""
    client = openai.AsyncOpenAI(base_url=f"{args.url}/v1", api_key=args.api_key, max_retries=0, timeout=600)
    await one_stream(client, args.model, 8)  # warm-up
    for n in args.concurrency:
        gate = asyncio.Semaphore(n)

        async def one(i):
            async with gate:
                return await one_stream(client, args.model, args.max_tokens, question=QUESTIONS[i % len(QUESTIONS)])

        start = time.time()
        results = await asyncio.gather(*(one(i) for i in range(args.total)))
        took = time.time() - start
        tokens = sum(t for t, _ in results)
        bad = [o for _, o in results if o != "ok"]
        print(json.dumps({"concurrency": n, "requests": args.total, "completion_tokens": tokens, "seconds": round(took, 2), "tokens_per_second": round(tokens / took, 1), "failed": bad}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", default="http://127.0.0.1:8080")
    p.add_argument("--model", default="default_model")
    p.add_argument("--api-key", default="none")
    p.add_argument("--max-tokens", type=int, default=64)
    sub = p.add_subparsers(dest="mode", required=True)
    l = sub.add_parser("load")
    l.add_argument("--clients", type=int, default=64)
    l.add_argument("--requests", type=int, default=10)
    l.add_argument("--cancel", type=float, default=0.3, help="fraction of requests cancelled mid-stream")
    l.add_argument("--pid", type=int, help="the server's pid, for its memory")
    t = sub.add_parser("throughput")
    t.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    t.add_argument("--total", type=int, default=32, help="requests at each concurrency")
    args = p.parse_args()
    asyncio.run(load(args) if args.mode == "load" else throughput(args))


if __name__ == "__main__":
    main()
