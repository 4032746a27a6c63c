"""The client hand-off: base URLs, tunnels and model names from the fleet's plan."""

from __future__ import annotations

import shlex

from handoff import client_handoff, served_models

FACTS = {"default_ipv4": {"address": "10.0.0.7"}}


def probe(host, reached=True):
    """What wait_for registers for one loop item (failed_when: false keeps a timeout quiet)."""
    return {"item": {"host": host}, "state": "started"} if reached else {"item": {"host": host}, "msg": "Timeout", "failed": False}


def test_a_reachable_gateway_is_its_own_address_plain_or_tls():
    hostvars = {
        "gw1": {"ansible_facts": FACTS, "gateway_listen_port": 80},
        "gw2": {"ansible_facts": {"default_ipv4": {"address": "10.0.0.8"}}, "gateway_tls_port": 8443, "gateway_listen_port": 80},
        "gw3": {
            "ansible_host": "gw3.example.net",
            "gateway_listen_port": 8080,
            "gateway_tls_port": 443,
            "gateway_tls_certificate": "/x.crt",
        },
    }
    sheet = client_handoff(["gw1", "gw2", "gw3"], hostvars, [probe("gw1"), probe("gw2"), probe("gw3")])
    # The operator's certificate names the host, not its address: the URL uses the inventory name.
    assert [e["url"] for e in sheet] == ["http://10.0.0.7/v1", "https://10.0.0.8:8443/v1", "https://gw3/v1"]
    assert [e["self_signed"] for e in sheet] == [False, True, False]
    assert all(e["reachable"] and "tunnel" not in e for e in sheet)


def test_an_unreachable_gateway_gets_a_tunnel_through_the_address_ansible_uses():
    hostvars = {
        "gw1": {"ansible_facts": FACTS, "ansible_host": "203.0.113.9", "ansible_user": "ops", "ansible_port": 2222,
                "ansible_ssh_common_args": "-o ProxyJump=bastion.example.net", "ansible_ssh_private_key_file": "~/.ssh/ops"},
        "gw2": {"ansible_facts": {"default_ipv4": {"address": "fd00::2"}}, "gateway_tls_port": 443},
    }
    sheet = client_handoff(["gw1", "gw2"], hostvars, [probe("gw1", False), probe("gw2", False)])
    assert shlex.split(sheet[0]["tunnel"]) == [
        "ssh", "-N", "-L", "127.0.0.1:18000:127.0.0.1:80", "-o", "ProxyJump=bastion.example.net", "-i", "~/.ssh/ops", "-p", "2222",
        "ops@203.0.113.9",
    ]  # fmt: skip
    assert sheet[0]["url"] == "http://127.0.0.1:18000/v1" and (sheet[0]["address"], sheet[0]["port"]) == ("10.0.0.7", 80)
    # Each gateway its own local port; no user or port: ssh's own defaults.
    assert shlex.split(sheet[1]["tunnel"])[-2:] == ["127.0.0.1:18001:127.0.0.1:443", "gw2"]
    assert sheet[1]["url"] == "https://127.0.0.1:18001/v1" and sheet[1]["address"] == "fd00::2"


def test_without_probes_every_gateway_is_listed_with_its_own_address_to_probe():
    sheet = client_handoff(["gw1"], {"gw1": {"ansible_facts": {"default_ipv4": {"address": "fd00::2"}}, "gateway_listen_port": 8080}})
    assert (sheet[0]["address"], sheet[0]["port"]) == ("fd00::2", 8080)
    assert not sheet[0]["reachable"]


def test_ipv6_addresses_are_bracketed_in_urls():
    from handoff import base_url

    assert base_url("http", "fd00::2", 8080) == "http://[fd00::2]:8080/v1"


def test_served_models_are_every_planned_name_once():
    hostvars = {"a": {"vllm_plan": [{"model": "chat"}, {"model": "small"}]}, "b": {"vllm_plan": [{"model": "chat"}]}}
    hostvars["c"] = {"vllm_plan": None}  # its preflight refused the plan
    assert served_models(["a", "b", "c"], hostvars) == ["chat", "small"]
