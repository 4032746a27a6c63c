"""An operator's checklist for every vLLM instance on every serving host."""

from __future__ import annotations

import json
import re

import pytest
from conftest import SERVING_HOSTS, chat, env_file, instances_of, key_file, request

testinfra_hosts = SERVING_HOSTS


@pytest.fixture(scope="module")
def instances(host):
    planned = instances_of(host)
    assert planned, "the inventory plans no instance on this host"
    return planned


def test_units_are_enabled_and_active(host, instances):
    for inst in instances:
        unit = host.service(f"vllm@{inst['name']}")
        assert unit.is_enabled, f"vllm@{inst['name']} is not enabled"
        assert unit.is_running, f"vllm@{inst['name']} is not active"


def test_listens_on_configured_address_and_port(host, instances):
    for inst in instances:
        assert host.socket(f"tcp://{inst['listen_address']}:{inst['port']}").is_listening


def vllm_listeners(host) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket the service user listens on, from `ss`."""
    uid = host.check_output("id -u vllm")
    found = []
    for line in host.check_output("ss -Hltne").splitlines():
        fields = line.split()
        if f"uid:{uid}" in fields:
            address, _, port = fields[3].rpartition(":")
            found.append((address.strip("[]"), int(port)))
    return found


def test_every_socket_vllm_opens_is_on_loopback_or_a_firewalled_instance_port(host, instances):
    """vLLM opens engine queues and Gloo/NCCL rendezvous sockets besides its API port; on the
    host's own address they would be reachable from the network."""
    listeners = vllm_listeners(host)
    print(f"vLLM listens on: {sorted(listeners)}")
    api = {(i["listen_address"], i["port"]) for i in instances}
    assert api <= set(listeners), "the instances' own ports are not in the listing: the check would see nothing"
    assert len(listeners) > len(api), "no internal socket found: vLLM's engine sockets were not seen"
    exposed = [(a, p) for a, p in listeners if not a.startswith("127.") and a != "::1"]
    if all(i["listen_address"].startswith("127.") for i in instances):
        assert exposed == [], f"sockets beyond loopback on a loopback layout: {exposed}"
    else:
        rejecting = next(line for line in host.check_output("nft list table inet vllm_instances").splitlines() if "reject" in line)
        covered = {int(p) for p in re.findall(r"\b\d+\b", rejecting.split("{", 1)[1].split("}", 1)[0])}
        assert set(exposed) <= api, f"beyond loopback, sockets other than the instances' own ports: {set(exposed) - api}"
        assert {p for _, p in exposed} <= covered, f"instance ports the firewall does not cover: {exposed}, covered {covered}"


def test_health_is_200(host, instances):
    for inst in instances:
        status, _ = request(host, inst, "/health", key=False)
        assert status == 200


def test_models_lists_the_served_name(host, instances):
    for inst in instances:
        status, body = request(host, inst, "/v1/models")
        assert status == 200, body
        assert inst["model"] in [m["id"] for m in json.loads(body)["data"]]


def test_chat_completion_returns_usage(host, instances):
    # ignore_eos (vLLM's extension): the tiny model's weights are random and it samples, so its
    # first token is now and then the end of the text, an empty answer; asked to go on, it writes
    # exactly max_tokens tokens.
    for inst in instances:
        status, body = request(host, inst, "/v1/chat/completions", chat(inst["model"], ignore_eos=True))
        assert status == 200, body
        answer = json.loads(body)
        assert answer["choices"][0]["message"]["content"]
        assert answer["usage"]["completion_tokens"] == chat(inst["model"])["max_tokens"]
        assert answer["usage"]["total_tokens"] == answer["usage"]["prompt_tokens"] + answer["usage"]["completion_tokens"]


def test_stream_arrives_in_chunks_and_ends_with_done(host, instances):
    for inst in instances:
        status, body = request(host, inst, "/v1/chat/completions", chat(inst["model"], stream=True, ignore_eos=True), stream=True)
        assert status == 200, body
        events = [line for line in body.splitlines() if line.startswith("data: ")]
        assert len(events) >= 3, f"expected several data: chunks, got {len(events)}"
        assert events[-1] == "data: [DONE]"
        assert all("choices" in json.loads(e[6:]) for e in events[:-1])


def test_request_without_key_is_401(host, instances):
    for inst in instances:
        status, _ = request(host, inst, "/v1/chat/completions", chat(inst["model"]), key=False)
        assert status == 401


def _split(secret: str) -> str:
    """A shell expression for the secret that does not contain it literally (no self-match)."""
    half = len(secret) // 2
    return f'"$(printf %s {secret[:half]})$(printf %s {secret[half:]})"'


def test_key_not_in_ps(host, api_key):
    # ps runs before grep starts, so grep's own argv (which holds the key) is not in the listing.
    search = "listing=$(ps auxww); printf '%s' \"$listing\" | grep -cF -- "
    canary = "ps-canary-7d1e0f"
    host.run(f"setsid bash -c 'exec -a {canary} sleep 30' >/dev/null 2>&1 &")
    assert host.run(search + _split(canary)).stdout.strip() == "1", "the search cannot find a planted process name"
    assert "vllm.entrypoints" in host.check_output("ps auxww"), "no vLLM process to check"
    assert host.run(search + _split(api_key)).stdout.strip() == "0", "the API key shows in ps"


def test_key_not_in_execstart(host, instances, api_key):
    for inst in instances:
        exec_start = host.check_output(f"systemctl show -p ExecStart vllm@{inst['name']}")
        assert "--model" in exec_start  # the property is there, so the check means something
        assert api_key not in exec_start


def test_key_not_in_any_world_readable_file(host, api_key):
    """One pass over the disk looks for the key and a planted canary together: finding the canary
    proves the search reaches such a file."""
    search = "for d in / /run /tmp; do find $d -xdev -type f -perm -0004 -print0; done | xargs -0 grep -lF -e {} -e {} || true"
    canary = "file-canary-5b2c9a"
    host.check_output(f"printf %s {canary} > /run/canary.txt && chmod 0644 /run/canary.txt")
    try:
        found = host.run(search.format(_split(canary), _split(api_key))).stdout.split()
    finally:
        host.run("rm -f /run/canary.txt")
    assert "/run/canary.txt" in found, "the search cannot find a planted file"
    assert found == ["/run/canary.txt"], f"world-readable files hold the key: {found}"


def test_key_not_in_journal(host, api_key):
    search = "journalctl --no-pager -o cat | grep -cF -- "
    canary = "journal-canary-0c4f77"
    host.check_output(f"logger -t canary {canary} && journalctl --sync")
    assert host.run(search + _split(canary)).stdout.strip() != "0", "the search cannot find a planted journal line"
    assert host.run(search + _split(api_key)).stdout.strip() == "0", "the API key was logged"


def test_the_key_is_in_one_file_readable_by_root_and_the_service_group(host, instances):
    """The environment file (venv runtime) or, for a container, the key file it mounts."""
    docker = host.ansible.get_variables().get("vllm_runtime") == "docker"
    for inst in instances:
        env, key = host.file(env_file(inst)), host.file(key_file(inst))
        for f in (env, key) if docker else (env,):
            assert (f.user, f.group, f.mode) == ("root", "vllm", 0o640), f.path
        assert env.contains("^VLLM_API_KEY=") != docker
        assert key.exists == docker


def test_systemd_security_score_at_most_4(host, instances):
    for inst in instances:
        out = host.check_output(f"systemd-analyze security --no-pager vllm@{inst['name']}.service")
        score = float(re.search(r"Overall exposure level for \S+: ([0-9.]+)", out).group(1))
        print(f"systemd-analyze security vllm@{inst['name']}: {score}")
        assert score <= 4.0, out
