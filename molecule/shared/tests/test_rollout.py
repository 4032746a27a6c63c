"""Rollouts driven from the controller with the operator's own playbooks, under client load
through the gateway: nothing may be lost, and a broken update must not take the service down."""

from __future__ import annotations

import base64
import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import GATEWAY_HOSTS, INVENTORY, SERVING_HOSTS, chat, host_named, sequential_codes

testinfra_hosts = GATEWAY_HOSTS
REPO = Path(__file__).resolve().parents[3]

# Two clients, each a bounded, paced loop of requests through the gateway, one status a line.
LOAD = """
for client in 1 2; do
  ( end=$(( $(date +%s) + {seconds} )); n=0
    while [ ! -e /tmp/load.stop ] && [ $(date +%s) -lt $end ] && [ $n -lt 5000 ]; do
      curl -s -o /dev/null -w '%{{http_code}}\\n' --max-time 60 -H 'Content-Type: application/json' \\
        -H 'Authorization: Bearer {key}' --data-binary '{body}' http://127.0.0.1/v1/chat/completions
      n=$((n+1)); sleep 0.1
    done > /tmp/load.$client ) &
done
wait
"""


def said(result: subprocess.CompletedProcess) -> str:
    """Everything the run printed, with line wrapping folded away, to search for a message."""
    return " ".join((result.stdout + result.stderr).split())


def playbook(name: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = ["ansible-playbook", "-i", INVENTORY, str(REPO / "playbooks" / name), *extra]
    # Plain, unwrapped output to search: molecule's own settings force colour and YAML results.
    env = {**os.environ, "ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_NOCOLOR": "1", "ANSIBLE_CALLBACK_RESULT_FORMAT": "json"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)


class Load:
    """Background load on the gateway host, bounded in count and time."""

    def __init__(self, host, model: str, seconds: int = 900):
        self.host = host
        key = host.ansible.get_variables()["vllm_api_key"]
        body = json.dumps(chat(model, max_tokens=8))
        script = base64.b64encode(LOAD.format(seconds=seconds, key=key, body=body).encode()).decode()
        host.check_output(f"rm -f /tmp/load.stop /tmp/load.1 /tmp/load.2; echo {script} | base64 -d > /tmp/load.sh")
        host.check_output("setsid nohup bash /tmp/load.sh >/dev/null 2>&1 < /dev/null &")

    def stop(self) -> list[str]:
        # Let the requests in flight finish (each is bounded by curl's --max-time).
        self.host.run("touch /tmp/load.stop; for i in $(seq 70); do pgrep -x curl >/dev/null || break; sleep 1; done")
        return self.host.check_output("cat /tmp/load.1 /tmp/load.2").split()


@pytest.fixture(scope="module")
def model(host):
    return json.loads(host_named(SERVING_HOSTS[0]).file("/etc/vllm/instances.json").content_string)[0]["model"]


def main_pids() -> dict[str, str]:
    """The main PID of every instance, per host, in rollout order (hosts, then their plan)."""
    pids = {}
    for server_name in SERVING_HOSTS:
        server = host_named(server_name)
        for inst in json.loads(server.file("/etc/vllm/instances.json").content_string):
            pids[f"{server_name}/{inst['name']}"] = server.check_output(f"systemctl show -p MainPID --value vllm@{inst['name']}")
    return pids


def instance_env(name: str) -> dict[str, list[str]]:
    """ROLLOUT_MARK in the environment of every running instance, per host."""
    found = {}
    for server_name in SERVING_HOSTS:
        server = host_named(server_name)
        for inst in json.loads(server.file("/etc/vllm/instances.json").content_string):
            pid = server.check_output(f"systemctl show -p MainPID --value vllm@{inst['name']}")
            environ = server.check_output(f"tr '\\0' '\\n' < /proc/{pid}/environ")
            found[f"{server_name}/{inst['name']}"] = [line for line in environ.splitlines() if line.startswith(name + "=")]
    return found


def test_preflight_refuses_a_missing_model_path_before_any_change():
    bad = json.dumps({"vllm_models": [{"name": "ghost", "source": "/srv/models/does-not-exist"}]})
    result = playbook("../site.yml", "-e", bad)
    assert result.returncode != 0
    assert "vllm_models (ghost).source: /srv/models/does-not-exist does not exist on this host" in said(result)
    assert "TASK [vllm : Install" not in result.stdout, "a host was touched after preflight failed"


def test_rolling_update_under_load_loses_nothing(host, model):
    load = Load(host, model)
    result = playbook("rolling-update.yml", "-e", json.dumps({"vllm_env": {"ROLLOUT_MARK": "2"}}))
    codes = load.stop()
    assert result.returncode == 0, result.stdout[-4000:]
    failed = len(codes) - codes.count("200")
    print(f"rolling update under load: {len(codes)} requests, {failed} failed")
    assert codes and failed == 0, sorted(set(codes))
    marks = instance_env("ROLLOUT_MARK")
    assert all(v == ["ROLLOUT_MARK=2"] for v in marks.values()), marks


def test_broken_update_stops_at_the_first_instance_and_keeps_serving(host, model, tmp_path):
    """The first host's models get a context length the tiny model cannot have: vLLM refuses to
    start, so its first instance must be restored and the rollout must stop there."""
    first_host = SERVING_HOSTS[0]
    server = host_named(first_host)
    models = [{**m, "max_model_len": 1000000} for m in server.ansible.get_variables()["vllm_models"]]
    broken = tmp_path / "broken.yml"
    broken.write_text(json.dumps({"all": {"hosts": {first_host: {"vllm_models": models}}}}))
    first = json.loads(server.file("/etc/vllm/instances.json").content_string)[0]["name"]
    dropin = f"/etc/systemd/system/vllm@{first}.service.d/instance.conf"
    env = f"/etc/vllm/instances/{first}.env"

    def state():
        return {p: (f.sha256sum, f.user, f.group, f.mode) for p in (dropin, env) for f in [server.file(p)]}

    before = state()
    pids = main_pids()
    load = Load(host, model)
    result = playbook("rolling-update.yml", "-i", str(broken), "-e", json.dumps({"vllm_env": {"ROLLOUT_MARK": "3"}}))
    codes = load.stop()
    assert result.returncode != 0, "the broken update reported success"
    assert "Rolled back: the previous config is restored and serving again." in said(result)
    assert "max_model_len" in said(result), "the failure does not show vLLM's reason"
    after = main_pids()
    first_key, *rest = pids
    assert after[first_key] != pids[first_key], f"{first_key} was not restarted"
    assert {i: after[i] for i in rest} == {i: pids[i] for i in rest}, "the rollout went on past the first broken instance"
    assert state() == before, "the previous config (content, owner, mode) was not restored"
    assert server.run(f"ls {env}.*~ {dropin}.*~ 2>/dev/null").stdout == "", "backups were left behind"
    failed = len(codes) - codes.count("200")
    print(f"broken update under load: {len(codes)} requests, {failed} failed")
    assert codes and failed == 0, sorted(set(codes))
    assert sequential_codes(host, 1, chat(model), host.ansible.get_variables()["vllm_api_key"]) == ["200"]
