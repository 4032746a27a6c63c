"""Helpers shared by every scenario's testinfra checks.

Requests are made on the serving host itself (instances listen on its loopback). An
authenticated request reads the key from the instance's environment file inside the shell,
so the key never appears in a command line that Ansible would log on the host.
"""

from __future__ import annotations

import json
import os
import shlex

import pytest
import testinfra
import testinfra.utils.ansible_runner

INVENTORY = os.environ["MOLECULE_INVENTORY_FILE"]
SERVING_HOSTS = testinfra.utils.ansible_runner.AnsibleRunner(INVENTORY).get_hosts("vllm_servers")
GATEWAY_HOSTS = testinfra.utils.ansible_runner.AnsibleRunner(INVENTORY).get_hosts("vllm_gateway")


def instances_of(host) -> list[dict]:
    """What the host runs, from the manifest the role writes; checked against the inventory."""
    planned = json.loads(host.file("/etc/vllm/instances.json").content_string)
    wanted = {m["name"] for m in host.ansible.get_variables()["vllm_models"]}
    assert {i["model"] for i in planned} == wanted, "the host does not run the models its inventory names"
    return planned


def host_named(name: str):
    """Another host of the scenario, to act on it from a test that runs on this one."""
    return testinfra.get_host(f"ansible://{name}", ansible_inventory=INVENTORY)


def sequential_codes(host, count: int, body: dict, key: str, url: str = "http://127.0.0.1/v1/chat/completions") -> list[str]:
    """HTTP status of `count` requests sent one after another from `host`."""
    return host.check_output(
        f"for i in $(seq {count}); do curl -s -o /dev/null -w '%{{http_code}}\\n' -H 'Content-Type: application/json' "
        f"-H 'Authorization: Bearer {key}' --data-binary '{json.dumps(body)}' {url}; done"
    ).split()


def env_file(instance: dict) -> str:
    return f"/etc/vllm/instances/{instance['name']}.env"


def request(host, instance: dict, path: str, body: dict | None = None, *, key: bool = True, stream: bool = False):
    """Send one HTTP request to an instance from its host; return (status, body text)."""
    url = instance["health_url"].removesuffix("/health") + path
    cmd = ["curl", "-sS", "--max-time", "120", "-o", "/dev/stderr", "-w", "%{http_code}"]
    if stream:
        cmd.append("-N")
    if body is not None:
        cmd += ["-H", "Content-Type: application/json", "--data-binary", json.dumps(body)]
    script = " ".join(shlex.quote(part) for part in cmd)
    if key:
        # Read the key where the service reads it; only the shell on the host ever sees it.
        script = f'KEY=$(sed -n \'s/^VLLM_API_KEY="\\(.*\\)"$/\\1/p\' {env_file(instance)}); {script} -H "Authorization: Bearer $KEY"'
    result = host.run(f"{script} {shlex.quote(url)}")
    assert result.rc == 0, f"curl failed: {result.stderr}"
    return int(result.stdout.strip()), result.stderr


def chat(model: str, prompt: str = "Say hello.", **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 16, **extra}


@pytest.fixture(scope="module")
def api_key(host) -> str:
    return host.ansible.get_variables()["vllm_api_key"]
