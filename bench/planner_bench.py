#!/usr/bin/env python3
"""Time the planner on a large fleet: every host's instances, then the gateway's upstreams.

  python3 bench/planner_bench.py --hosts 1000 --gpus 8 --runs 5
Prints JSON with the median of the runs, in seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "filter"))
from vllm import gateway_models, plan_instances

# A realistic 8-GPU host: a TP-4 70B, two TP-1 8B replicas with a fallback, two pinned small models sharing GPU 7.
MODELS = [
    {"name": "llama-70b", "source": "/srv/models/llama-70b", "tensor_parallel_size": 4, "max_model_len": 16384},
    {"name": "llama-8b", "source": "hf:meta-llama/Llama-3.1-8B-Instruct", "replicas": 2, "fallback": "qwen-1.5b"},
    {"name": "qwen-1.5b", "source": "hf:Qwen/Qwen2.5-1.5B-Instruct", "gpus": [7], "gpu_memory_utilization": 0.45},
    {"name": "embed", "source": "hf:BAAI/bge-m3", "gpus": [7], "gpu_memory_utilization": 0.45, "extra_args": ["--runner", "pooling"]},
]


def run(hosts: int, gpus: int) -> tuple[float, int]:
    start = time.perf_counter()
    servers = []
    for n in range(hosts):
        name = f"gpu-{n:04d}"
        plan = plan_instances(MODELS, name, listen_address=f"10.{n // 250}.{n % 250}.10", gpus=list(range(gpus)))
        servers.append({"host": name, "address": f"10.{n // 250}.{n % 250}.10", "plan": plan})
    upstreams = gateway_models(servers)
    return time.perf_counter() - start, sum(len(u["servers"]) for u in upstreams)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hosts", type=int, default=1000)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    times, instances = [], 0
    for _ in range(args.runs):
        elapsed, instances = run(args.hosts, args.gpus)
        times.append(elapsed)
    print(
        json.dumps(
            {
                "hosts": args.hosts,
                "gpus_per_host": args.gpus,
                "instances": instances,
                "runs": args.runs,
                "median_s": round(statistics.median(times), 4),
                "max_s": round(max(times), 4),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
