#!/usr/bin/env python3
"""Gateway overhead: the same requests through the gateway and straight to one backend.

Runs on the gateway host with its system Python (stdlib only), so both paths share the client,
the network and the backend; the difference is Nginx and the njs model routing. Rounds
alternate between the two targets so that drift (CPU heat, caches) hits both alike. Prints JSON:
median and p95 latency, requests per second at a concurrency, and streaming time to first
token, for each target, and the ratios.

  python3 gateway_bench.py --gateway http://127.0.0.1 --direct http://10.0.0.2:8000 \\
      --model chat --key KEY --requests 200 --concurrency 8
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import threading
import time
import urllib.parse


def connect(base: str) -> http.client.HTTPConnection:
    url = urllib.parse.urlsplit(base)
    return http.client.HTTPConnection(url.hostname, url.port or 80, timeout=120)


def one(conn: http.client.HTTPConnection, body: bytes, headers: dict, stream: bool) -> tuple[float, float]:
    """(latency, time to first token) of one request on a kept-alive connection; the whole
    response is read, so the next request can reuse the connection."""
    start = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=body, headers=headers)
    response = conn.getresponse()
    first = None
    while True:
        chunk = response.read1(65536) if stream else response.read()
        if not chunk:
            break
        if first is None and (not stream or b'"content"' in chunk):
            first = time.perf_counter()
        if not stream:
            break
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}")
    end = time.perf_counter()
    return end - start, (first or end) - start


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def sequential(base: str, body: bytes, headers: dict, n: int, stream: bool) -> list[tuple[float, float]]:
    conn = connect(base)
    one(conn, body, headers, stream)  # warm the connection and the route
    return [one(conn, body, headers, stream) for _ in range(n)]


def throughput(base: str, body: bytes, headers: dict, n: int, concurrency: int) -> float:
    done, lock = [0], threading.Lock()

    def worker() -> None:
        conn = connect(base)
        while True:
            with lock:
                if done[0] >= n:
                    return
                done[0] += 1
            one(conn, body, headers, False)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gateway", required=True)
    parser.add_argument("--direct", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=1)
    args = parser.parse_args()

    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {args.key}"}
    plain = json.dumps({"model": args.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": args.max_tokens}).encode()
    streamed = json.dumps({"model": args.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16, "stream": True}).encode()
    targets = {"gateway": args.gateway, "direct": args.direct}
    latency = {t: [] for t in targets}
    ttft = {t: [] for t in targets}
    rps = {t: [] for t in targets}
    per_round = max(1, args.requests // args.rounds)
    for _ in range(args.rounds):
        for name, base in targets.items():
            latency[name] += [lat for lat, _ in sequential(base, plain, headers, per_round, False)]
            ttft[name] += [first for _, first in sequential(base, streamed, headers, max(1, per_round // 4), True)]
            rps[name].append(throughput(base, plain, headers, per_round, args.concurrency))

    result = {"model": args.model, "requests_per_target": args.requests, "rounds": args.rounds, "concurrency": args.concurrency}
    for name in targets:
        result[name] = {
            "latency_median_ms": statistics.median(latency[name]) * 1000,
            "latency_p95_ms": percentile(latency[name], 0.95) * 1000,
            "requests_per_second": statistics.median(rps[name]),
            "ttft_median_ms": statistics.median(ttft[name]) * 1000,
        }
    g, d = result["gateway"], result["direct"]
    result["gateway_added_median_ms"] = g["latency_median_ms"] - d["latency_median_ms"]
    result["throughput_ratio"] = g["requests_per_second"] / d["requests_per_second"]
    result["ttft_ratio"] = g["ttft_median_ms"] / d["ttft_median_ms"]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
