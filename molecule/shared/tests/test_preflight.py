"""The table of bad inventories (tests/preflight_cases.yml) through the real site.yml, against a
converged serving host: every case is refused in preflight with its words, and nothing changes.
It runs in multi_instance, whose serving hosts have the most to lose (two instances each).

Each case is its own inventory host, reached through the same container; cases that need a
gateway beside a serving host get an inventory of their own (a gateway sees every serving host).
"""

from __future__ import annotations

import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml
from conftest import INVENTORY, REPO, SCENARIO, SERVING_HOSTS, instances_of

testinfra_hosts = SERVING_HOSTS[:1]
CASES = yaml.safe_load((REPO / "tests" / "preflight_cases.yml").read_text())
BASE_SERVER = {
    "vllm_device": "cpu",
    "vllm_api_key": "a-good-key-0123456789",
    "vllm_models": [{"name": "tiny", "source": "controller:<MODEL>", "max_model_len": 512}],
}

pytestmark = pytest.mark.skipif(SCENARIO != "multi_instance", reason="the table runs once, in the multi_instance scenario")


def substitute(value):
    return json.loads(json.dumps(value).replace("<MODEL>", os.environ["VLLM_ANSIBLE_MODEL"]))


def server_vars(case: dict) -> dict:
    hv = substitute({**BASE_SERVER, **case["servers"]})
    for name in case.get("unset", []):
        hv.pop(name)
    return hv


def run_site(inventory: dict, tmp_path, name: str) -> dict:
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump(inventory))
    env = {**os.environ, "ANSIBLE_STDOUT_CALLBACK": "json", "ANSIBLE_FORCE_COLOR": "0"}
    result = subprocess.run(
        ["ansible-playbook", "-i", str(path), str(REPO / "site.yml")], capture_output=True, text=True, env=env, timeout=900
    )
    assert result.returncode != 0, f"{name}: the bad inventory passed"
    return json.loads(result.stdout[result.stdout.index("{") :])


def refusals(report: dict) -> dict[str, str]:
    """The refusal message per host, from the last task that ran."""
    assert [p["play"]["name"] for p in report["plays"]] == ["Preflight"], "a play after preflight started"
    last = report["plays"][0]["tasks"][-1]
    assert last["task"]["name"] == "Refuse the inventory if any host has a problem", last["task"]["name"]
    return {h: r.get("msg", "") for h, r in last["hosts"].items() if r.get("failed")}


def snapshot(server) -> str:
    """What a run that got past preflight would have changed: files the roles write, and the
    processes they start."""
    files = server.check_output(
        "find /etc/vllm /etc/systemd/system /etc/nginx /opt/vllm /var/lib/vllm -maxdepth 4 -printf '%p %s %T@\\n' 2>/dev/null"
        " | sort | sha256sum"
    )
    pids = server.check_output(
        "cat /run/nginx.pid 2>/dev/null; "
        "systemctl show -p MainPID --value $(systemctl list-units 'vllm@*' --plain --no-legend | awk '{print $1}')"
    )
    return files + pids


KINDS = {"servers": "vllm_servers", "gateway": "vllm_gateway", "monitoring": "monitoring", "grafana": "grafana"}


def kinds_of(case: dict) -> list[str]:
    return [kind for kind in KINDS if kind in case]


def case_vars(case: dict, kind: str) -> dict:
    if kind == "servers":
        return server_vars(case)
    return substitute({k: v for k, v in case[kind].items() if k != "with"})


def own_inventory(case: dict, connection: dict) -> dict:
    """A case with hosts of several kinds: the host its refusal names is bad-<id> (`refused`, else
    the last kind), the others bad-<id>-<kind>; `with` puts the monitoring group on another
    kind's host."""
    kinds = kinds_of(case)
    refused = case.get("refused", kinds[-1])
    names = {kind: f"bad-{case['id']}" if kind == refused else f"bad-{case['id']}-{kind}" for kind in kinds}
    if case.get("monitoring", {}).get("with"):
        names["monitoring"] = names[case["monitoring"]["with"]]
    children: dict = {}
    for kind in kinds:
        children.setdefault(KINDS[kind], {"hosts": {}})["hosts"].setdefault(names[kind], {}).update(case_vars(case, kind))
    return {"all": {"vars": connection, "children": children}}


def test_every_bad_inventory_is_refused_before_any_change(host, tmp_path):
    real = yaml.safe_load(open(INVENTORY))["all"]["hosts"][host.ansible.get_variables()["inventory_hostname"]]
    connection = {"ansible_connection": real["ansible_connection"], "ansible_host": host.ansible.get_variables()["inventory_hostname"]}
    before = snapshot(host)
    together = [c for c in CASES if len(kinds_of(c)) == 1]
    children: dict = {}
    for case in together:
        kind = kinds_of(case)[0]
        children.setdefault(KINDS[kind], {"hosts": {}})["hosts"][f"bad-{case['id']}"] = case_vars(case, kind)
    inventories = {"together": {"all": {"vars": connection, "children": children}}}
    for case in CASES:
        if case not in together:
            name = case.get("inventory", case["id"])
            shared = inventories.setdefault(name, {"all": {"vars": connection, "children": {}}})["all"]["children"]
            for group, members in own_inventory(case, connection)["all"]["children"].items():
                shared.setdefault(group, {"hosts": {}})["hosts"].update(members["hosts"])
    found: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=len(inventories)) as pool:
        for refused in pool.map(lambda item: refusals(run_site(item[1], tmp_path, item[0])), inventories.items()):
            found.update(refused)
    missing = []
    for case in CASES:
        message = found.get(f"bad-{case['id']}", "")
        for words in case["expect"]:
            if words not in " ".join(message.split()) and words not in message:
                missing.append(f"{case['id']}: {words!r} not in {message!r}")
        if f"host bad-{case['id']}" not in message:
            missing.append(f"{case['id']}: the message does not name the host: {message!r}")
    print(f"{len(CASES)} bad inventories, {len(found)} hosts refused")
    assert not missing, "\n".join(missing)
    assert snapshot(host) == before, "a refused run changed the host"
    assert all(host.service(f"vllm@{inst['name']}").is_running for inst in instances_of(host))
