"""Helpers shared by every scenario's testinfra checks.

Requests are made on the hosts themselves (instances listen on their host's loopback or behind
the firewall). An authenticated request reads the key from the instance's environment file
inside the shell, so the key never appears in a command line that Ansible would log.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import time
from pathlib import Path

import pytest
import testinfra
import testinfra.utils.ansible_runner

INVENTORY = os.environ["MOLECULE_INVENTORY_FILE"]
SCENARIO = os.environ.get("MOLECULE_SCENARIO_NAME", "")
REPO = Path(__file__).resolve().parents[3]
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


def default_address(host) -> str:
    """The host's default IPv4 address, as Ansible's facts give it (the inventory holds no facts)."""
    return host.ansible("setup", "gather_subset=!all,network", check=False)["ansible_facts"]["ansible_default_ipv4"]["address"]


def env_file(instance: dict) -> str:
    return f"/etc/vllm/instances/{instance['name']}.env"


def key_file(instance: dict) -> str:
    return f"/etc/vllm/instances/{instance['name']}.key"


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
        # A container's key is in its own file (docker runtime).
        script = (
            f"KEY=$(cat {key_file(instance)} 2>/dev/null || sed -n 's/^VLLM_API_KEY=\"\\(.*\\)\"$/\\1/p' {env_file(instance)}); "
            f'{script} -H "Authorization: Bearer $KEY"'
        )
    result = host.run(f"{script} {shlex.quote(url)}")
    assert result.rc == 0, f"curl failed: {result.stderr}"
    return int(result.stdout.strip()), result.stderr


def chat(model: str, prompt: str = "Say hello.", **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 16, **extra}


def successes(server, instance: dict) -> float:
    """vllm:request_success_total of one instance, read on its own host: what it served itself."""
    text = server.check_output(f"curl -sS --fail {instance['health_url'].removesuffix('/health')}/metrics")
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("vllm:request_success_total{"))


def access_lines(server, instance: dict, needle: str, since: str = "") -> int:
    """Lines of the instance's own access log (uvicorn, in its journal) that contain `needle`."""
    result = server.run(f"journalctl --unit vllm@{instance['name']} --no-pager --output cat {since} | grep -cF -- {shlex.quote(needle)}")
    return int(result.stdout.strip() or 0)


def unit_state(server, unit: str) -> dict[str, str]:
    out = server.check_output(f"systemctl show -p ActiveState -p MainPID -p NRestarts -p ExecMainStartTimestampMonotonic {unit}")
    return dict(line.split("=", 1) for line in out.splitlines())


def wait_active(server, unit: str, timeout: int = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.run(f"systemctl is-active {unit}").stdout.strip() == "active":
            return
        time.sleep(3)
    raise AssertionError(f"{unit} did not come back")


def playbook(name: str, *extra: str, inventory: str = INVENTORY, check: bool = False) -> subprocess.CompletedProcess:
    """Run one of the operator's playbooks against the scenario, with plain, unwrapped output."""
    cmd = ["ansible-playbook", "-i", inventory, str(REPO / name), *extra]
    if check:
        cmd += ["--check", "--diff"]
    env = {**os.environ, "ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_NOCOLOR": "1", "ANSIBLE_CALLBACK_RESULT_FORMAT": "json"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)


def said(result: subprocess.CompletedProcess) -> str:
    """Everything the run printed, with line wrapping folded away, to search for a message."""
    return " ".join((result.stdout + result.stderr).split())


def recap(result: subprocess.CompletedProcess) -> dict[str, dict[str, int]]:
    """PLAY RECAP counts per host: {host: {ok, changed, unreachable, failed, ...}}."""
    counts = {}
    for host, fields in re.findall(r"^(\S+)\s+: (ok=.*)$", result.stdout, flags=re.M):
        counts[host] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", fields)}
    return counts


@pytest.fixture(scope="module")
def api_key(host) -> str:
    return host.ansible.get_variables()["vllm_api_key"]


# Debian's chromium (scripts/lib.sh installs it), headless, driven by Playwright. The flags keep it
# off the network: this machine reaches only loopback and the test containers.
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]  # fmt: skip


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver:
        chromium = driver.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()
