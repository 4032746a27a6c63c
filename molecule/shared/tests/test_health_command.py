"""The operator's health command (playbooks/health.yml, README "Health"): on a healthy fleet
every instance and every model through every gateway answers a real completion, the table and the
JSON say so, and the exit is 0. Runs in the default scenario; multi_instance runs it with
instances stopped (test_gateway.py's /health truth check), every row of three hosts checked."""

from __future__ import annotations

import json

import pytest
from conftest import GATEWAY_HOSTS, SCENARIO, SERVING_HOSTS, host_named, playbook, wait_active

testinfra_hosts = SERVING_HOSTS[:1]
pytestmark = pytest.mark.skipif(SCENARIO != "default", reason="run once, in the default scenario")


def test_a_healthy_fleet_is_reported_healthy_row_by_row(tmp_path):
    planned = []
    for name in SERVING_HOSTS:
        server = host_named(name)
        for inst in json.loads(server.file("/etc/vllm/instances.json").content_string):
            wait_active(server, f"vllm@{inst['name']}")  # an earlier check may have just restarted it
            planned.append((name, inst["name"], inst["model"]))
    report = tmp_path / "health.json"
    result = playbook("playbooks/health.yml", "-e", f"health_json={report}")
    assert result.returncode == 0, result.stdout[-3000:]
    rows = json.loads(report.read_text())["rows"]
    assert json.loads(report.read_text())["healthy"] is True
    instances = [r for r in rows if r["instance"] != "(gateway)"]
    assert sorted((r["host"], r["instance"], r["model"]) for r in instances) == sorted(planned)
    assert all(r["state"] == "ok" and r["latency_ms"] > 0 and r["version"].startswith("0.32") for r in instances), instances
    models = sorted({m for _, _, m in planned})
    through = sorted((r["host"], r["model"]) for r in rows if r["instance"] == "(gateway)" and r["state"] == "ok")
    assert through == sorted((g, m) for g in GATEWAY_HOSTS for m in models)
    # The table is printed, one line per row; no key anywhere in the output.
    key = host_named(SERVING_HOSTS[0]).ansible.get_variables()["vllm_api_key"]
    assert "latency_ms" in result.stdout and all(name in result.stdout for _, name, _ in planned), "no table printed"
    assert key not in result.stdout + result.stderr
