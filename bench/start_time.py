#!/usr/bin/env python3
"""Start-to-healthy of an instance started by its hardened unit, beside a bare start of the same
model with the same flags on the same host (`python -m vllm.entrypoints.openai.api_server`, as
the guides type it, as root, with vLLM's default caches).

Runs on the serving host with its system Python (stdlib only). Rounds alternate between the two
so that drift hits both alike; the first bare start (cold caches) is a warm-up, not counted.
The unit's figure is systemd's own: ActiveEnterTimestamp - ExecMainStartTimestamp, where
`active` means /health answered (the unit's ExecStartPost). The bare figure is the time from
spawning the process to the first 200 from /health, polled every 0.1 s. Prints JSON.

  python3 start_time.py --instance tiny-chat-0 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import time
import urllib.request


def systemctl_show(unit: str, *props: str) -> dict[str, str]:
    out = subprocess.run(["systemctl", "show", unit, *[f"-p{p}" for p in props]], capture_output=True, text=True, check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def unit_start(unit: str) -> float:
    subprocess.run(["systemctl", "reset-failed", unit], check=False)
    subprocess.run(["systemctl", "restart", unit], check=True)
    shown = systemctl_show(unit, "ActiveEnterTimestampMonotonic", "ExecMainStartTimestampMonotonic")
    return (int(shown["ActiveEnterTimestampMonotonic"]) - int(shown["ExecMainStartTimestampMonotonic"])) / 1e6


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def bare_start(argv: list[str], env: dict[str, str], health_url: str, timeout: float = 900) -> float:
    started = time.monotonic()
    with open("/tmp/bare-start.log", "w") as log:
        process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd="/tmp")
    try:
        while time.monotonic() - started < timeout:
            if process.poll() is not None:
                raise RuntimeError("the bare start exited; see /tmp/bare-start.log")
            if healthy(health_url):
                return time.monotonic() - started
            time.sleep(0.1)
        raise RuntimeError("the bare start never became healthy")
    finally:
        process.terminate()
        process.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instance", required=True)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    unit = f"vllm@{args.instance}.service"
    dropin = open(f"/etc/systemd/system/{unit}.d/instance.conf").read()
    command = shlex.split(re.search(r"^ExecStart=(\S.*)$", dropin, flags=re.M).group(1).replace("%%", "%").replace("$$", "$"))
    health_url = re.search(r"^ExecStartPost=\S+ (\S+)$", dropin, flags=re.M).group(1)
    # The instance's own variables (the model needs VLLM_CPU_KVCACHE_SPACE on the CPU build), nothing of the unit's.
    env = dict(os.environ)
    for line in open(f"/etc/vllm/instances/{args.instance}.env"):
        if "=" in line and not line.startswith("#"):
            name, value = line.rstrip("\n").split("=", 1)
            env[name] = json.loads(value)

    unit_times, bare_times = [], []
    subprocess.run(["systemctl", "stop", unit], check=True)
    bare_start(command, env, health_url)  # warm-up: the bare start's own caches
    for _ in range(args.rounds):
        unit_times.append(unit_start(unit))
        subprocess.run(["systemctl", "stop", unit], check=True)
        bare_times.append(bare_start(command, env, health_url))
    subprocess.run(["systemctl", "start", unit], check=True)

    result = {
        "instance": args.instance,
        "rounds": args.rounds,
        "unit_seconds": [round(t, 1) for t in unit_times],
        "bare_seconds": [round(t, 1) for t in bare_times],
        "unit_median_seconds": round(statistics.median(unit_times), 1),
        "bare_median_seconds": round(statistics.median(bare_times), 1),
    }
    result["ratio"] = round(result["unit_median_seconds"] / result["bare_median_seconds"], 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
