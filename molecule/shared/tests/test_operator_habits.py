"""What operators do with a converged fleet: a dry run with --check --diff, and runs limited to
one step with --tags (README, "Tags"). Nothing may change or fail that should not, and a change
made with a tag is made. Runs in the default scenario (one host, gateway included).

The tests run in file order (none uses the module-scoped `host` fixture, which would regroup
them); the last one leaves the host changed on purpose."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import SCENARIO, SERVING_HOSTS, host_named, playbook, recap, unit_state

pytestmark = pytest.mark.skipif(SCENARIO != "default", reason="run once, in the default scenario")
# The README's tag table.
TAGS = ["vllm_install", "vllm_models", "vllm_config", "vllm_prune", "gateway_install", "gateway_config",
        "nvidia_driver", "docker_engine", "nvidia_container_toolkit", "monitoring", "verify", "handoff"]  # fmt: skip


def changes(result) -> str | None:
    """None if the run succeeded and changed nothing, else why not."""
    counts = recap(result)
    if result.returncode != 0 or not counts:
        return f"rc {result.returncode}: {result.stdout[-2000:]}"
    if any(c["changed"] or c["failed"] for c in counts.values()):
        return f"{counts}: " + "; ".join(line for line in result.stdout.splitlines() if line.startswith(("changed:", "fatal:")))[:2000]
    return None


def test_a_dry_run_on_a_converged_host_predicts_no_change():
    key = host_named(SERVING_HOSTS[0]).ansible.get_variables()["vllm_api_key"]
    result = playbook("site.yml", check=True)
    assert changes(result) is None, changes(result)
    assert key not in result.stdout + result.stderr, "--diff printed the key"


def test_each_tag_on_a_converged_host_changes_nothing():
    """Every tag of the README's table, each its own run (four at a time: they change nothing)."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(zip(TAGS, pool.map(lambda tag: playbook("site.yml", "--tags", tag), TAGS), strict=True))
    problems = {tag: changes(result) for tag, result in results.items() if changes(result)}
    skipped_preflight = [tag for tag, result in results.items() if "TASK [Check every setting this host carries]" not in result.stdout]
    assert not problems, problems
    assert not skipped_preflight, f"preflight did not run under --tags {skipped_preflight}"


def test_a_change_made_with_its_tag_is_made():
    """Last: the host keeps these settings (the scenario is destroyed after its checks)."""
    server, unit = host_named(SERVING_HOSTS[0]), "vllm@tiny-chat-0"
    pid = unit_state(server, unit)["MainPID"]
    result = playbook("site.yml", "--tags", "vllm_config", "-e", json.dumps({"vllm_env": {"HABIT_MARK": "tagged"}}))
    assert result.returncode == 0, result.stdout[-3000:]
    state = unit_state(server, unit)
    assert state["MainPID"] != pid, "the instance was not restarted"
    assert "HABIT_MARK=tagged" in server.check_output(f"tr '\\0' '\\n' < /proc/{state['MainPID']}/environ")
    result = playbook("site.yml", "--tags", "gateway_config", "-e", json.dumps({"gateway_read_timeout": 900}))
    assert result.returncode == 0 and recap(result)[SERVING_HOSTS[0]]["changed"] > 0, result.stdout[-3000:]
    assert "proxy_read_timeout 900s;" in server.file("/etc/nginx/conf.d/vllm-gateway.conf").content_string
