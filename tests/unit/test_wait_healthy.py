"""vllm-wait-healthy, the health gate of every start: with a real HTTP server on loopback standing
in for vLLM's /health and a `systemctl` on PATH that answers `show` from a file the test writes
(the unit's main PID and state, as systemd would). What is tested is the gate's own decision:
healthy -> 0; in a unit's ExecStartPost, its main process gone -> fail at once; for a group of
hosts (--unit), the leader's unit failed, or its main process of this start replaced (a side
left and the unit restarted it) -> fail at once, not after --timeout; nothing healthy in time ->
fail. molecule/multi_node runs it against real vLLM units (a broken update of the group)."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

GATE = Path(__file__).resolve().parents[2] / "roles" / "vllm" / "files" / "vllm-wait-healthy"

FAKE_SYSTEMCTL = """#!/bin/sh
# systemctl show -p MainPID,ActiveState UNIT: what the test wrote
cat "$UNIT_STATE"
"""


class Health:
    """GET /health answers `status` (None: the port refuses connections, as before vLLM binds)."""

    def __init__(self):
        self.status: int | None = None
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(outer.status or 503)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/health"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def health():
    h = Health()
    yield h
    h.server.shutdown()


@pytest.fixture
def unit(tmp_path):
    """Write the unit's state; the fake systemctl reads it."""
    (tmp_path / "bin").mkdir()
    systemctl = tmp_path / "bin" / "systemctl"
    systemctl.write_text(FAKE_SYSTEMCTL)
    systemctl.chmod(0o755)
    state = tmp_path / "state"

    def write(pid: int, active: str = "activating") -> None:
        state.write_text(f"MainPID={pid}\nActiveState={active}\n")

    write(0)
    write.env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "UNIT_STATE": str(state)}
    return write


def gate(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(GATE), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def ended(proc: subprocess.Popen, within: float) -> tuple[int, str]:
    _, err = proc.communicate(timeout=within)
    return proc.returncode, err


def test_a_group_start_passes_once_the_leader_answers(health, unit):
    proc = gate([health.url, "--unit", "vllm@m.service", "--timeout", "60"], unit.env)
    unit(4242)
    time.sleep(2.5)
    assert proc.poll() is None, "the gate passed before /health answered 200"
    health.status = 200
    assert ended(proc, 10)[0] == 0


def test_a_group_start_fails_at_once_when_a_side_leaves(health, unit):
    """The leader's process of this start is replaced (its unit restarted it: a side left)."""
    unit(4242)
    proc = gate([health.url, "--unit", "vllm@m.service", "--timeout", "600"], unit.env)
    time.sleep(2.5)
    unit(4343)
    started = time.monotonic()
    rc, err = ended(proc, 10)
    assert rc != 0 and "a side of the group left during the start" in err, err
    assert time.monotonic() - started < 5


def test_a_group_start_fails_at_once_when_the_leaders_unit_failed(health, unit):
    unit(4242)
    proc = gate([health.url, "--unit", "vllm@m.service", "--timeout", "600"], unit.env)
    time.sleep(1.5)
    unit(0, "failed")
    rc, err = ended(proc, 10)
    assert rc != 0 and "failed before" in err, err


def test_a_group_start_fails_after_its_timeout(health, unit):
    unit(4242)
    rc, err = ended(gate([health.url, "--unit", "vllm@m.service", "--timeout", "3"], unit.env), 15)
    assert rc != 0 and "did not answer 200 in time" in err, err


def test_the_start_of_a_unit_ends_with_its_main_process(health, unit):
    """ExecStartPost: $MAINPID gone before /health answered -> fail (systemd would wait on)."""
    doomed = subprocess.Popen(["sleep", "2"])
    proc = gate([health.url], {**unit.env, "MAINPID": str(doomed.pid)})
    doomed.wait()
    rc, err = ended(proc, 10)
    assert rc != 0 and f"main process {doomed.pid} exited" in err, err


def test_the_start_of_a_unit_passes_when_healthy(health, unit):
    alive = subprocess.Popen(["sleep", "30"])
    try:
        health.status = 200
        assert ended(gate([health.url], {**unit.env, "MAINPID": str(alive.pid)}), 10)[0] == 0
    finally:
        alive.kill()

