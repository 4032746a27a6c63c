"""What operators do with a converged fleet: a dry run with --check --diff, and runs limited to
one step with --tags (README, "Tags"). Nothing may change or fail that should not, and a change
made with a tag is made. Runs in the default scenario (one host, gateway included)."""

from __future__ import annotations

import json

import pytest
from conftest import SCENARIO, SERVING_HOSTS, playbook, recap, unit_state

testinfra_hosts = SERVING_HOSTS[:1]
pytestmark = pytest.mark.skipif(SCENARIO != "default", reason="run once, in the default scenario")
# The README's tag table.
TAGS = ["vllm_install", "vllm_models", "vllm_config", "vllm_prune", "gateway_install", "gateway_config",
        "nvidia_driver", "docker_engine", "nvidia_container_toolkit", "verify"]  # fmt: skip


def nothing_changed(result) -> None:
    counts = recap(result)
    assert result.returncode == 0 and counts, result.stdout[-3000:]
    assert all(c["changed"] == 0 and c["failed"] == 0 for c in counts.values()), (counts, result.stdout[-3000:])


def test_a_dry_run_on_a_converged_host_predicts_no_change(api_key):
    result = playbook("site.yml", check=True)
    nothing_changed(result)
    assert api_key not in result.stdout + result.stderr, "--diff printed the key"


@pytest.mark.parametrize("tag", TAGS)
def test_each_tag_on_a_converged_host_changes_nothing(tag):
    result = playbook("site.yml", "--tags", tag)
    nothing_changed(result)
    assert "TASK [Check every setting this host carries]" in result.stdout, "preflight was skipped"


def test_a_change_made_with_its_tag_is_made(host):
    unit = "vllm@tiny-chat-0"
    pid = unit_state(host, unit)["MainPID"]
    result = playbook("site.yml", "--tags", "vllm_config", "-e", json.dumps({"vllm_env": {"HABIT_MARK": "tagged"}}))
    assert result.returncode == 0, result.stdout[-3000:]
    state = unit_state(host, unit)
    assert state["MainPID"] != pid and "HABIT_MARK=tagged" in host.check_output(f"tr '\\0' '\\n' < /proc/{state['MainPID']}/environ")
    result = playbook("site.yml", "--tags", "gateway_config", "-e", json.dumps({"gateway_read_timeout": 900}))
    assert result.returncode == 0, result.stdout[-3000:]
    assert "proxy_read_timeout 900s;" in host.file("/etc/nginx/conf.d/vllm-gateway.conf").content_string
    # Back to the inventory's settings, with the same tags.
    for tag in ("vllm_config", "gateway_config"):
        assert playbook("site.yml", "--tags", tag).returncode == 0
    assert "HABIT_MARK" not in host.check_output(f"tr '\\0' '\\n' < /proc/{unit_state(host, unit)['MainPID']}/environ")
    nothing_changed(playbook("site.yml", check=True))
