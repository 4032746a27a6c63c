"""Rollouts driven from the controller with the operator's own playbooks, under client load
through the gateway: nothing may be lost, and a broken update must not take the service down.

The load covers every model, runs until the playbook has ended (its last request is checked to
be later), and the drain is judged by the gateway's error log, not only by the clients: the
gateway retries a failed POST on another instance, which would hide a broken drain."""

from __future__ import annotations

import base64
import json
import time

import pytest
from conftest import GATEWAY_HOSTS, SERVING_HOSTS, chat, host_named, playbook, said, sequential_codes, successes, unit_state

testinfra_hosts = GATEWAY_HOSTS

# Two clients, each a loop of requests through the gateway over every model in turn; one
# "<start time> <model> <status>" line per request. Told to stop, each client sends one last
# request and ends, so that the last requests begin after the playbook under test has ended.
# Paced (each client waits 4 s after an answer) and short (two tokens: the CPU build spends most
# of a request's time in decode steps). The pace is set by the CPU build's worker, which spins on
# a core for about a second after every step it runs: at two requests a second the four workers
# of multi_instance kept more than one of the test machine's two cores busy, and the restarts
# that the tests are about starved beside them.
LOAD = """
for client in 1 2; do
  ( while :; do
      for model in {models}; do
        [ ! -e /tmp/load.stop ] || last=1
        start=$(date +%s.%N)
        body="{{\\"model\\": \\"$model\\", \\"messages\\": [{{\\"role\\": \\"user\\", \\"content\\": \\"hi\\"}}], \\"max_tokens\\": 2}}"
        code=$(curl -s -o /dev/null -w '%{{http_code}}' --max-time 60 -H 'Content-Type: application/json' \\
          -H 'Authorization: Bearer {key}' --data-binary "$body" http://127.0.0.1/v1/chat/completions)
        echo "$start $model $code"
        [ -z "${{last:-}}" ] || break 2
        sleep 4
      done
    done > /tmp/load.$client ) &
done
wait
"""


def plan_of(name: str) -> list[dict]:
    return json.loads(host_named(name).file("/etc/vllm/instances.json").content_string)


def models() -> list[str]:
    return sorted({i["model"] for name in SERVING_HOSTS for i in plan_of(name)})


@pytest.fixture(scope="module", autouse=True)
def every_model_has_two_instances():
    seen: dict[str, int] = {}
    for name in SERVING_HOSTS:
        for inst in plan_of(name):
            seen[inst["model"]] = seen.get(inst["model"], 0) + 1
    if min(seen.values()) < 2:
        pytest.skip(f"a model with one instance cannot restart without a gap: {seen}")


class Load:
    """Background load on the gateway host over every model, until stopped."""

    def __init__(self, host):
        self.host = host
        self.requests: list[tuple[float, str, str]] | None = None
        key = host.ansible.get_variables()["vllm_api_key"]
        script = base64.b64encode(LOAD.format(models=" ".join(models()), key=key).encode()).decode()
        host.check_output(f"rm -f /tmp/load.stop /tmp/load.1 /tmp/load.2; echo {script} | base64 -d > /tmp/load.sh")
        self.errors_from = int(host.check_output("stat -c %s /var/log/nginx/error.log"))
        host.check_output("setsid nohup bash /tmp/load.sh >/dev/null 2>&1 < /dev/null &")
        time.sleep(2)

    def stop(self) -> list[tuple[float, str, str]]:
        """(start time, model, status) of every request; in-flight ones are let finish."""
        if self.requests is None:
            self.host.run("touch /tmp/load.stop; for i in $(seq 70); do pgrep -f /tmp/load.sh >/dev/null || break; sleep 1; done")
            lines = self.host.check_output("cat /tmp/load.1 /tmp/load.2").splitlines()
            self.requests = [(float(t), m, c) for t, m, c in (line.split() for line in lines)]
        return self.requests

    def upstream_errors(self) -> list[str]:
        """Lines the gateway logged since the load began about a client request it could not
        pass to an instance (a retried one included)."""
        text = self.host.check_output(f"tail -c +{self.errors_from + 1} /var/log/nginx/error.log")
        return [line for line in text.splitlines() if "upstream" in line and 'request: "POST /v1/' in line]


def judge(load: Load, ended: float, what: str) -> None:
    requests = load.stop()
    failed = [r for r in requests if r[2] != "200"]
    per_model = {m: sum(1 for r in requests if r[1] == m) for m in models()}
    print(
        f"{what}: {len(requests)} requests {per_model}, {len(failed)} failed; "
        f"the last began {ended - max(r[0] for r in requests):+.1f} s before the playbook ended"
    )
    assert requests and not failed, sorted({r[2] for r in failed})
    assert all(n > 0 for n in per_model.values()), f"the load did not cover every model: {per_model}"
    assert max(r[0] for r in requests) >= ended - 1, "the load stopped before the playbook ended"
    errors = load.upstream_errors()
    assert errors == [], "the gateway sent requests to an instance that was going away:\n" + "\n".join(errors[:5])


def main_pids() -> dict[str, str]:
    """The main PID of every instance, per host, in rollout order (hosts, then their plan)."""
    return {
        f"{name}/{inst['name']}": unit_state(host_named(name), f"vllm@{inst['name']}")["MainPID"]
        for name in SERVING_HOSTS
        for inst in plan_of(name)
    }


def instance_env(name: str) -> dict[str, list[str]]:
    """`name`'s value in the environment of every running instance, per host."""
    found = {}
    for server_name in SERVING_HOSTS:
        server = host_named(server_name)
        for inst in plan_of(server_name):
            pid = unit_state(server, f"vllm@{inst['name']}")["MainPID"]
            environ = server.check_output(f"tr '\\0' '\\n' < /proc/{pid}/environ")
            found[f"{server_name}/{inst['name']}"] = [line for line in environ.splitlines() if line.startswith(name + "=")]
    return found


def test_preflight_refuses_a_missing_model_path_before_any_change():
    bad = json.dumps({"vllm_models": [{"name": "ghost", "source": "/srv/models/does-not-exist"}]})
    pids = main_pids()
    result = playbook("site.yml", "-e", bad)
    assert result.returncode != 0
    assert "vllm_models (ghost).source: '/srv/models/does-not-exist' does not exist on this host" in said(result)
    assert "PLAY [Prepare the serving hosts]" not in result.stdout, "a play after preflight started"
    assert main_pids() == pids


def test_a_setting_changed_through_site_yml_reaches_its_instances_without_a_lost_request(host, tmp_path):
    """One model's setting changes on every host (its instances restart, batch by batch, under
    load over every model); the other model's instances are left running as they were. The same
    run gives back the wheelhouse a host lost, beside a host that has it (the archive is made once
    for every host that lacks it, not only when the first one does)."""
    changed = models()[-1]
    first, second = host_named(SERVING_HOSTS[0]), host_named(SERVING_HOSTS[-1])
    wheelhouse_before = first.check_output("ls -la --time-style=full-iso /opt/vllm/wheelhouse/*/.complete")
    second.check_output("rm -rf /opt/vllm/wheelhouse/*")

    def mark(model: dict) -> dict:
        return {**model, "env": {**model.get("env", {}), "ROLLOUT_MARK": "2"}} if model["name"] == changed else model

    overlay = {name: {"vllm_models": [mark(m) for m in host_named(name).ansible.get_variables()["vllm_models"]]} for name in SERVING_HOSTS}
    inventory = tmp_path / "changed.yml"
    inventory.write_text(json.dumps({"all": {"hosts": overlay}}))
    pids = main_pids()
    load = Load(host)
    try:
        result = playbook("site.yml", "-i", str(inventory))
        ended = time.time()
    finally:
        load.stop()
    assert result.returncode == 0, result.stdout[-4000:]
    judge(load, ended, "site.yml with a changed setting")
    after = main_pids()
    marks = instance_env("ROLLOUT_MARK")
    for name in SERVING_HOSTS:
        for inst in plan_of(name):
            key = f"{name}/{inst['name']}"
            if inst["model"] == changed:
                assert marks[key] == ["ROLLOUT_MARK=2"] and after[key] != pids[key], key
            else:
                assert marks[key] == [] and after[key] == pids[key], f"{key} was restarted, its config did not change"
    batches = result.stdout.count("rollout_batch.yml for ")
    assert batches >= 2, "the instances did not change batch by batch"
    assert second.run("ls /opt/vllm/wheelhouse/*/.complete").rc == 0, "the host without the wheelhouse did not get it"
    assert first.check_output("ls -la --time-style=full-iso /opt/vllm/wheelhouse/*/.complete") == wheelhouse_before


def test_a_broken_update_stops_at_the_first_batch_and_the_old_version_serves_again(host, tmp_path):
    """The first host's models get a context length the tiny model cannot have: vLLM refuses to
    start, so its first instance must be restored, serve again, and the rollout must stop."""
    first_host = SERVING_HOSTS[0]
    server = host_named(first_host)
    models_ = [{**m, "max_model_len": 1000000} for m in server.ansible.get_variables()["vllm_models"]]
    broken = tmp_path / "broken.yml"
    broken.write_text(json.dumps({"all": {"hosts": {first_host: {"vllm_models": models_}}}}))
    first = plan_of(first_host)[0]
    unit = f"vllm@{first['name']}"
    dropin = f"/etc/systemd/system/{unit}.service.d/instance.conf"
    env = f"/etc/vllm/instances/{first['name']}.env"

    def state():
        return {p: (f.sha256sum, f.user, f.group, f.mode) for p in (dropin, env) for f in [server.file(p)]}

    before = state()
    pids = main_pids()
    load = Load(host)
    try:
        result = playbook("playbooks/rolling-update.yml", "-i", str(broken), "-e", json.dumps({"vllm_env": {"ROLLOUT_MARK": "3"}}))
        ended = time.time()
    finally:
        load.stop()
    assert result.returncode != 0, "the broken update reported success"
    assert "Rolled back: the previous config is restored and serving again (/health answers 200)." in said(result)
    assert "max_model_len" in said(result), "the failure does not show vLLM's reason"
    judge(load, ended, "a broken update")
    after = main_pids()
    first_key = f"{first_host}/{first['name']}"
    assert after[first_key] != pids[first_key], f"{first_key} was not restarted"
    batch = {f"{first_host}/{i['name']}" for i in plan_of(first_host)}
    assert {i: after[i] for i in after if i not in batch} == {i: pids[i] for i in pids if i not in batch}, (
        "the rollout went on past the first batch"
    )
    assert state() == before, "the previous config (content, owner, mode) was not restored"
    assert server.run(f"ls {env}.*~ {dropin}.*~ 2>/dev/null").stdout == "", "backups were left behind"
    # The restored instance serves again, and the gateway sends it requests again.
    assert unit_state(server, unit)["ActiveState"] == "active"
    assert server.check_output(f"curl -s -o /dev/null -w '%{{http_code}}' {first['health_url']}") == "200"
    conf = host.file("/etc/nginx/conf.d/vllm-gateway.conf").content_string
    assert f"; # instance {first_key}" in conf and f" down; # instance {first_key}" not in conf, "not back in rotation"
    served = successes(server, first)
    key = host.ansible.get_variables()["vllm_api_key"]
    assert sequential_codes(host, 20, chat(first["model"], max_tokens=2), key) == ["200"] * 20
    assert successes(server, first) > served, f"{first_key} got none of 20 requests: not back in rotation"
