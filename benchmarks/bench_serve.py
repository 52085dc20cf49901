"""Load test of ``tunelab serve`` on loopback: N concurrent clients for a fixed time.

The server runs as its own process (``python -m tunelab.cli serve TARGET --port P``, the same
command a user runs), bound to 127.0.0.1; the clients are threads of this process, each sending
``/v1/chat/completions`` requests one after another until the time is up (and never more than
``--max-requests`` each). Every request must succeed (200) or be turned away (429, or 503 after
waiting ``--queue-timeout``); anything else, or a server that stops answering ``/health``, is a
failure. The server's resident memory is sampled every 0.2 s.

Figures: requests by status, completed requests/s, generated tokens/s, latency p50/p95 of the
successful requests, the server's RSS at start and at its peak, and whether it stayed up.

Usage::

    python benchmarks/bench_serve.py                                   # tiny-random-llama, 16 clients, 20 s
    python benchmarks/bench_serve.py --target smollm2-135m-instruct --clients 8 --seconds 30 --max-tokens 32
    python benchmarks/bench_serve.py --json benchmarks/results/serve_tiny.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil

HOST = "127.0.0.1"  # only ever loopback


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_server(args, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tunelab.cli", "serve", args.target, "--host", HOST, "--port", str(port),
           "--max-concurrency", str(args.concurrency), "--max-queue", str(args.queue),
           "--queue-timeout", str(args.queue_timeout), "--max-tokens-limit", str(max(args.max_tokens, 16))]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://{HOST}:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start within 300 s")


def run(args) -> dict:
    port = free_port()
    started = time.monotonic()
    proc = start_server(args, port)
    load_s = time.monotonic() - started
    url = f"http://{HOST}:{port}"
    model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
    server = psutil.Process(proc.pid)
    rss = [server.memory_info().rss]
    results: list[tuple[int, float, int]] = []  # (status, seconds, completion tokens)
    lock = threading.Lock()
    stop = threading.Event()

    def sample_memory():
        while not stop.is_set():
            try:
                rss.append(server.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.2)

    def client(seed: int):
        deadline, sent = time.monotonic() + args.seconds, 0
        body = {"model": model, "max_tokens": args.max_tokens, "temperature": 0.7, "seed": seed,
                "messages": [{"role": "user", "content": f"Write a short note about topic {seed}."}]}
        with httpx.Client(timeout=args.queue_timeout + 120) as http:
            while time.monotonic() < deadline and sent < args.max_requests:
                t0 = time.monotonic()
                try:
                    r = http.post(url + "/v1/chat/completions", json=body)
                    status = r.status_code
                    tokens = r.json()["usage"]["completion_tokens"] if status == 200 else 0
                except httpx.HTTPError:
                    status, tokens = -1, 0
                with lock:
                    results.append((status, time.monotonic() - t0, tokens))
                sent += 1
                if status == 429:
                    time.sleep(args.backoff)  # clients back off after a 429 (the openai SDK waits 0.5-8 s)

    sampler = threading.Thread(target=sample_memory, daemon=True)
    sampler.start()
    t0 = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=args.seconds + args.queue_timeout + 180)
    elapsed = time.monotonic() - t0
    alive = proc.poll() is None and httpx.get(url + "/health", timeout=5).status_code == 200
    metrics = httpx.get(url + "/metrics", timeout=5).text if alive else ""
    stop.set()
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()

    ok = [r for r in results if r[0] == 200]
    lat = sorted(r[1] for r in ok)
    by_status: dict[str, int] = {}
    for status, _, _ in results:
        by_status[str(status)] = by_status.get(str(status), 0) + 1
    return {
        "target": args.target, "clients": args.clients, "seconds": args.seconds, "max_tokens": args.max_tokens,
        "max_concurrency": args.concurrency, "max_queue": args.queue, "server_start_s": round(load_s, 1),
        "requests": len(results), "by_status": by_status,
        "unexpected": sum(v for k, v in by_status.items() if k not in ("200", "429", "503")),
        "ok_per_s": round(len(ok) / elapsed, 2), "generated_tokens_per_s": round(sum(r[2] for r in ok) / elapsed, 1),
        "latency_p50_s": round(statistics.median(lat), 3) if lat else None,
        "latency_p95_s": round(lat[int(0.95 * (len(lat) - 1))], 3) if lat else None,
        "rss_start_mib": round(rss[0] / 2**20), "rss_peak_mib": round(max(rss) / 2**20),
        "server_stayed_up": alive, "cpu_count": os.cpu_count(),
        "load_average_at_end": [round(x, 1) for x in os.getloadavg()],
        "rejected_metric_lines": [line for line in metrics.splitlines() if line.startswith("tunelab_requests_rejected_total")],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="tiny-random-llama", help="run directory or model to serve")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--max-requests", type=int, default=500, help="per client, whatever the time")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=1, help="the server's --max-concurrency")
    p.add_argument("--queue", type=int, default=8, help="the server's --max-queue")
    p.add_argument("--queue-timeout", type=float, default=30.0)
    p.add_argument("--backoff", type=float, default=0.5, help="seconds a client waits after a 429")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args()
    result = run(args)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if result["unexpected"] or not result["server_stayed_up"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
