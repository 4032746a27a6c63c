"""The docker runtime (molecule/docker): one container per instance, run by its systemd unit.
The checks every runtime shares (unit active, sockets, completions, stream, 401, the key in no
ps, ExecStart, world-readable file or journal) are in test_vllm_service.py."""

from __future__ import annotations

import json
import time

import pytest
from conftest import SCENARIO, SERVING_HOSTS, chat, instances_of, key_file, playbook, request, said, unit_state, wait_active

testinfra_hosts = SERVING_HOSTS
pytestmark = pytest.mark.skipif(SCENARIO != "docker", reason="the docker runtime runs in molecule/docker")


@pytest.fixture(scope="module")
def instances(host):
    return instances_of(host)


def inspect(host, name: str) -> dict:
    return json.loads(host.check_output(f"docker inspect vllm-{name}"))[0]


def test_each_instance_is_one_healthy_container_from_the_archive(host, instances):
    wanted = host.ansible.get_variables()["vllm_image"]
    image_id = host.check_output(f"docker image inspect --format '{{{{.Id}}}}' {wanted}")
    for inst in instances:
        # Docker's own health check runs through `docker exec`, which nested Docker on the test
        # machines refuses ("error executing setns process"): its configuration is checked here,
        # its verdict only on a real host. The unit's health gate already required /health 200.
        health = inspect(host, inst["name"])["Config"]["Healthcheck"]
        assert inst["health_url"] in " ".join(health["Test"])
        details = inspect(host, inst["name"])
        assert details["Image"] == image_id
        assert details["State"]["Running"]
        status, body = request(host, inst, "/v1/chat/completions", chat(inst["model"]))
        assert status == 200 and json.loads(body)["usage"]["completion_tokens"] > 0


def test_containers_are_confined(host, instances):
    for inst in instances:
        config, hostconfig = inspect(host, inst["name"])["Config"], inspect(host, inst["name"])["HostConfig"]
        assert config["User"] and not config["User"].startswith("0:"), "vLLM runs as root in its container"
        assert hostconfig["ReadonlyRootfs"] and hostconfig["CapDrop"] == ["ALL"]
        assert "no-new-privileges" in hostconfig["SecurityOpt"]
        assert hostconfig["NetworkMode"] == "host" and hostconfig["RestartPolicy"]["Name"] in ("", "no")
        assert not hostconfig["DeviceRequests"], "a CPU host's container asks for GPUs"
        binds = hostconfig["Binds"]
        assert any(b.startswith(f"{inst['model_path']}:") and b.endswith(":ro") for b in binds)
        assert hostconfig["LogConfig"]["Config"] == {"max-size": "50m", "max-file": "3"}


def test_the_key_is_in_no_inspect_output_and_no_command(host, instances, api_key):
    for inst in instances:
        text = host.check_output(f"docker inspect vllm-{inst['name']}")
        # The search reads the environment: a value the role put there is found.
        assert "VLLM_HOST_IP=127.0.0.1" in text
        assert api_key not in text
        # ps, ExecStart, files and the journal: test_vllm_service.py, for both runtimes.


def test_a_killed_container_comes_back(host, instances):
    inst = instances[0]
    unit = f"vllm@{inst['name']}.service"
    before, container = unit_state(host, unit), inspect(host, inst["name"])["Id"]
    host.check_output(f"docker kill vllm-{inst['name']}")
    time.sleep(2)
    wait_active(host, unit)
    after = unit_state(host, unit)
    assert inspect(host, inst["name"])["Id"] != container
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1
    assert request(host, inst, "/health", key=False)[0] == 200


def test_a_broken_update_rolls_back_to_the_old_container(host, instances):
    inst = instances[0]
    old = inspect(host, inst["name"])["Id"]
    bad = json.dumps({"vllm_models": [{**m, "max_model_len": 1000000} for m in host.ansible.get_variables()["vllm_models"]]})
    result = playbook("site.yml", "-e", bad)
    assert result.returncode != 0 and "Rolled back" in said(result), said(result)
    wait_active(host, f"vllm@{inst['name']}.service")
    assert inspect(host, inst["name"])["Id"] != old, "the old container was not restarted"
    assert request(host, inst, "/health", key=False)[0] == 200


def listeners(host, inst) -> int:
    """How many sockets listen on the instance's port (the test host's root may not read another
    user's /proc/<pid>/fd, so `ss -p` cannot name them)."""
    return len(host.check_output(f"ss -Hltn 'sport = :{inst['port']}'").splitlines())


def main_command(host, inst) -> str:
    pid = unit_state(host, f"vllm@{inst['name']}")["MainPID"]
    return host.check_output(f"tr '\\0' ' ' < /proc/{pid}/cmdline")


def test_switching_runtimes_leaves_nothing_behind(host, instances):
    """docker -> venv -> docker with site.yml: each switch restarts every instance through the
    same rollout path as any other change, and leaves nothing of the other runtime."""
    to_venv = playbook("site.yml", "-e", "vllm_runtime=venv")
    assert to_venv.returncode == 0, said(to_venv)
    assert host.check_output("docker ps --all --quiet --filter name=^vllm-") == "", "a container was left behind"
    for inst in instances:
        assert not host.file(key_file(inst)).exists
        assert request(host, inst, "/health", key=False)[0] == 200
        assert "-m vllm.entrypoints.openai.api_server" in main_command(host, inst)
        assert listeners(host, inst) == 1
    back = playbook("site.yml")
    assert back.returncode == 0, said(back)
    assert host.run("ls -A /opt/vllm/venvs").stdout.strip() == "", "a virtualenv was left behind"
    for inst in instances:
        assert not host.file(f"/etc/vllm/instances/{inst['name']}.env").contains("^VLLM_API_KEY=")
        assert request(host, inst, "/health", key=False)[0] == 200
        assert main_command(host, inst).startswith("/usr/bin/docker run ") and inspect(host, inst["name"])["State"]["Running"]
        assert listeners(host, inst) == 1
