"""One instance served by a group of hosts (molecule/multi_node): tensor parallel across two
hosts, reached through the gateway as one instance; the group's ports reachable from the group
only; a follower that stops takes the model down (503, not a hang) and brings it back when it
starts again, without an operator; a broken update restarts and rolls back the whole group;
then the group moves to the docker runtime and serves as containers."""

from __future__ import annotations

import json
import time

import pytest
from conftest import GATEWAY_HOSTS, SCENARIO, SERVING_HOSTS, chat, default_address, host_named, playbook, said, unit_state

pytestmark = pytest.mark.skipif(SCENARIO != "multi_node", reason="the multi-host layout runs in molecule/multi_node")
testinfra_hosts = GATEWAY_HOSTS[:1]


@pytest.fixture(scope="module")
def group():
    """[(host, its instance)] in node-rank order: the leader first."""
    out = []
    for name in SERVING_HOSTS:
        (inst,) = json.loads(host_named(name).file("/etc/vllm/instances.json").content_string)
        out.append((host_named(name), inst))
    return sorted(out, key=lambda pair: pair[1]["node"]["node_rank"])


def post(host, key: str, body: dict, *, auth: bool = True, stream: bool = False) -> tuple[int, str]:
    cmd = "curl -sS --max-time 120 -o /dev/stderr -w '%{http_code}' -H 'Content-Type: application/json'"
    cmd += f" --data-binary '{json.dumps(body)}'" + (f" -H 'Authorization: Bearer {key}'" if auth else "") + (" -N" if stream else "")
    result = host.run(f"{cmd} http://127.0.0.1/v1/chat/completions")
    assert result.rc == 0, result.stderr
    return int(result.stdout), result.stderr


def test_multinode_one_model_over_two_hosts_answers_through_the_gateway(host, group, api_key):
    (leader_host, leader), (follower_host, follower) = group
    assert (leader["node"]["role"], follower["node"]["role"]) == ("leader", "follower")
    model = leader["model"]
    status, body = post(host, api_key, chat(model, max_tokens=8, ignore_eos=True))  # never an empty answer
    assert status == 200 and json.loads(body)["choices"][0]["message"]["content"], body
    status, body = post(host, api_key, chat(model, max_tokens=8, stream=True, ignore_eos=True), stream=True)
    assert status == 200 and body.rstrip().endswith("data: [DONE]"), body
    assert post(host, api_key, chat(model), auth=False)[0] == 401
    # Both hosts run a rank of it: vLLM's own launcher, the follower headless and without an API.
    for server, inst, rank in ((leader_host, leader, "0"), (follower_host, follower, "1")):
        cmdline = server.check_output(f"systemctl show -p ExecStart vllm@{inst['name']}")
        assert "--nnodes 2" in cmdline and f"--node-rank {rank}" in cmdline and "--tensor-parallel-size 2" in cmdline, cmdline
        assert ("--headless" in cmdline) == (rank == "1")
        assert api_key not in server.check_output("ps -eo args"), "the key is on a command line"
    assert follower["port"] is None and follower["health_url"] is None
    follower_api = follower_host.run("ss -Hltn 'sport = :8000'").stdout
    assert follower_api.strip() == "", f"the follower listens on the API port: {follower_api}"


def listeners(server, cgroup: str) -> list[tuple[str, int]]:
    """Every TCP socket the processes of a cgroup (a unit's, or a container's by its id) listen
    on, but loopback: (address, port). `ss -e` names each socket's cgroup, so the sockets are
    found without reading the processes."""
    out = []
    for line in server.check_output("ss -Hltne").splitlines():
        if not any(field.startswith("cgroup:") and field.endswith((f"/{cgroup}", f"/docker-{cgroup}.scope")) for field in line.split()):
            continue
        address, port = line.split()[3].rsplit(":", 1)
        if not address.startswith("127.") and address != "[::1]":
            out.append((address.strip("[]"), int(port)))
    return sorted(set(out))


def reaches(client, address: str, port: int) -> bool:
    return client.run(f"timeout 5 bash -c '</dev/tcp/{address}/{port}'").rc == 0


def check_group_ports(host, group, cgroups: list[str]) -> None:
    """Every socket of each side (in `cgroups`, in the group's order) beyond loopback: refused
    from the gateway host and reached from the other host of the group, but the leader's API,
    which the gateway reaches."""
    (leader_host, leader), (follower_host, follower) = group
    api = leader["port"]
    sides = ((leader_host, leader, follower_host, cgroups[0]), (follower_host, follower, leader_host, cgroups[1]))
    for server, inst, peer, cgroup in sides:
        address = inst["node"]["address"]
        opened = listeners(server, cgroup)
        assert opened, "the unit listens on nothing outside loopback"
        print(server.backend.host, opened)
        for bound, port in opened:
            target = address if bound in ("0.0.0.0", "::", "*") else bound
            if port == api and server is leader_host:
                assert reaches(host, target, port), "the gateway cannot reach the leader's API"
                continue
            assert not reaches(host, target, port), f"{target}:{port} of {server.backend.host} answers the gateway host"
            assert reaches(peer, target, port), f"{target}:{port} of {server.backend.host} does not answer its peer"
    # The range the firewall gives the group starts at the rendezvous port, on the leader.
    assert leader["node"]["rendezvous_port"] in {port for _, port in listeners(leader_host, cgroups[0])}


def test_multinode_group_ports_are_reachable_from_the_group_only(host, group):
    check_group_ports(host, group, [f"vllm@{inst['name']}.service" for _, inst in group])
    (follower_host, follower) = group[1]
    assert default_address(follower_host) == follower["node"]["address"]


def wait_for(check, timeout: float, every: float = 3) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(every)
    return False


def test_multinode_a_stopped_follower_takes_the_model_down_and_its_start_brings_it_back(host, group, api_key):
    (leader_host, leader), (follower_host, follower) = group
    unit = f"vllm@{follower['name']}.service"
    before = int(unit_state(leader_host, unit)["NRestarts"])
    model = leader["model"]
    follower_host.check_output(f"systemctl stop {unit}")
    try:
        # The leader leaves with the follower (vllm-launch's watch): no request waits for a dead rank.
        assert wait_for(lambda: leader_host.run(f"curl -s -o /dev/null -w '%{{http_code}}' {leader['health_url']}").stdout != "200", 60)
        # The gateway's answer when no instance of a model can be reached (nothing else serves it here).
        status, body = post(host, api_key, chat(model, max_tokens=2))
        assert status == 503 and "No instance of the model could be reached" in body, (status, body)
        journal = leader_host.check_output(f"journalctl -u {unit} --no-pager --output cat --since '-5min'")
        assert "left the group" in journal, journal[-2000:]
    finally:
        follower_host.check_output(f"systemctl start {unit}")
    # Nobody touches the leader: its unit starts it again until the group has formed.
    assert wait_for(lambda: post(host, api_key, chat(model, max_tokens=2))[0] == 200, 600, every=5), "the model did not come back"
    assert int(unit_state(leader_host, unit)["NRestarts"]) > before


def test_multinode_a_broken_update_rolls_the_whole_group_back(host, group, api_key, tmp_path):
    """A context length the tiny model cannot have, through site.yml: vLLM refuses it, the
    group's gate fails as soon as a side leaves (not after vllm_start_timeout), every host writes
    back its previous configuration, the group starts again and serves, and the run stops with
    vLLM's reason."""
    name = group[0][1]["name"]
    unit = f"vllm@{name}.service"
    files = [f"/etc/systemd/system/{unit}.d/instance.conf", f"/etc/vllm/instances/{name}.env"]

    def state(server) -> list:
        return [(f.sha256sum, f.user, f.group, f.mode) for path in files for f in [server.file(path)]]

    before = [state(server) for server, _ in group]
    pids = [unit_state(server, unit)["MainPID"] for server, _ in group]
    overlay = {
        host_name: {"vllm_models": [{**m, "max_model_len": 1000000} for m in host_named(host_name).ansible.get_variables()["vllm_models"]]}
        for host_name in SERVING_HOSTS
    }
    broken = tmp_path / "broken.yml"
    broken.write_text(json.dumps({"all": {"hosts": overlay}}))
    started = time.monotonic()
    result = playbook("site.yml", "-i", str(broken))
    took = time.monotonic() - started
    text = said(result)
    assert result.returncode != 0, "the broken update reported success"
    assert "a side of the group left during the start" in text or "failed before" in text, text[-3000:]
    assert "Rolled back on every host of the group: the previous config is restored and serving again" in text, text[-3000:]
    assert "max_model_len" in text, "the failure does not show vLLM's reason"
    print(f"broken update of the group, rolled back and serving again: {took:.0f} s")
    for (server, _), was, pid in zip(group, before, pids, strict=True):
        assert state(server) == was, f"{server.backend.host}: the previous config was not restored"
        now = unit_state(server, unit)
        assert now["ActiveState"] == "active" and now["MainPID"] != pid, f"{server.backend.host}: not restarted, or not running: {now}"
    assert post(host, api_key, chat(group[0][1]["model"], max_tokens=2))[0] == 200


def test_multinode_a_group_range_among_the_ephemeral_ports_is_refused_before_any_change(group):
    """vllm_rendezvous_port inside the hosts' ephemeral range (where an outgoing connection may
    hold a port of the group when it starts): site.yml stops in preflight, naming each host of
    the group, and neither side was touched."""
    low = int(group[0][0].check_output("cat /proc/sys/net/ipv4/ip_local_port_range").split()[0])
    unit = f"vllm@{group[0][1]['name']}.service"
    pids = [unit_state(server, unit)["MainPID"] for server, _ in group]
    result = playbook("site.yml", "-e", json.dumps({"vllm_rendezvous_port": low + 1000}))  # key=value would be a string
    text = said(result)
    assert result.returncode != 0, "a group's ports among the ephemeral ones were accepted"
    for server, _ in group:
        assert f"host {server.backend.host}: vllm_rendezvous_port: {low + 1000}: the ports" in text, text[-3000:]
        assert f"reach into this host's ephemeral port range {low}-" in text, text[-3000:]
    assert [unit_state(server, unit)["MainPID"] for server, _ in group] == pids, "a side was restarted"


def test_multinode_the_group_moves_to_the_docker_runtime(host, group, api_key):
    """site.yml with vllm_runtime=docker (the group stays on it): the Docker engine
    installed on the group's hosts, the image loaded from the archive, the whole group restarted
    as one container per host on the host network, running the same launcher: the leader's with
    the API and Docker's health check, the follower's headless without; the key in no `docker
    inspect` and no command line; the group's ports reachable from the group only; the model
    answers through the gateway."""
    started = time.monotonic()
    result = playbook("site.yml", "-e", "vllm_runtime=docker")
    assert result.returncode == 0, said(result)[-3000:]
    print(f"the group from venv to docker: {time.monotonic() - started:.0f} s")
    containers = []
    for (server, inst), rank in zip(group, ("0", "1"), strict=True):
        text = server.check_output(f"docker inspect vllm-{inst['name']}")
        details = json.loads(text)[0]
        assert details["State"]["Running"] and details["HostConfig"]["NetworkMode"] == "host", details["State"]
        args = " ".join(details["Args"])
        assert "vllm-launch" in args and "--nnodes 2" in args and f"--node-rank {rank}" in args, args
        assert ("--headless" in args) == (rank == "1"), args
        assert (details["Config"].get("Healthcheck") is not None) == (rank == "0"), details["Config"]
        assert api_key not in text and api_key not in server.check_output("ps -eo args"), "the key is in docker inspect or a command line"
        assert "docker run" in server.check_output(f"systemctl show -p ExecStart vllm@{inst['name']}")
        containers.append(details["Id"])
    check_group_ports(host, group, containers)
    model = group[0][1]["model"]
    status, body = post(host, api_key, chat(model, max_tokens=8, ignore_eos=True))
    assert status == 200 and json.loads(body)["choices"][0]["message"]["content"], body
    status, body = post(host, api_key, chat(model, max_tokens=8, stream=True, ignore_eos=True), stream=True)
    assert status == 200 and body.rstrip().endswith("data: [DONE]"), body
