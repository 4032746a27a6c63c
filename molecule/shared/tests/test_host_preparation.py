"""Host preparation (playbooks/hosts.yml) on a host without a GPU (molecule/docker): a real
Docker engine with a merged daemon.json, and NVIDIA roles that are asked for and skip, saying
why, and leave nothing behind. The engine running vLLM's container is checked in
test_docker_runtime.py."""

from __future__ import annotations

import json

import pytest
from conftest import SCENARIO, SERVING_HOSTS, playbook, recap, said

testinfra_hosts = SERVING_HOSTS
pytestmark = pytest.mark.skipif(SCENARIO != "docker", reason="host preparation runs in molecule/docker")


def test_engine_runs_and_starts_at_boot(host):
    docker = host.service("docker")
    assert docker.is_running and docker.is_enabled


def test_daemon_json_is_merged_not_overwritten(host):
    settings = json.loads(host.file("/etc/docker/daemon.json").content_string)
    # Written by "other tools" in prepare:
    assert settings["runtimes"] == {"nvidia": {"args": [], "path": "nvidia-container-runtime"}}
    assert settings["registry-mirrors"] == ["https://mirror.example.internal"]
    # Merged in by docker_engine_daemon_json, one level deep for log-opts:
    assert settings["log-opts"] == {"max-size": "10m", "max-file": "3"}
    assert settings["live-restore"] is True


def test_the_engine_runs_on_the_merged_settings(host):
    info = json.loads(host.check_output("docker info --format '{{json .}}'"))
    assert info["LiveRestoreEnabled"] is True
    assert "nvidia" in info["Runtimes"], "the runtime another tool registered was lost"
    assert "https://mirror.example.internal/" in info["RegistryConfig"]["Mirrors"]


def test_no_nvidia_software_on_a_host_without_a_gpu(host):
    assert not host.file("/etc/modprobe.d/blacklist-nouveau.conf").exists
    assert not host.file("/etc/apt/sources.list.d/nvidia-container-toolkit.sources").exists
    for package in ("nvidia-kernel-dkms", "nvidia-smi", "nvidia-container-toolkit"):
        assert not host.package(package).is_installed, package


def test_nvidia_roles_say_why_they_skip_and_a_rerun_changes_nothing():
    result = playbook("playbooks/hosts.yml")
    assert result.returncode == 0, said(result)
    for role in ("nvidia_driver", "nvidia_container_toolkit"):
        assert f"no NVIDIA GPU on the PCI bus (/sys/bus/pci/devices): {role} skipped" in said(result), said(result)
    assert all(c["changed"] == 0 and c["failed"] == 0 for c in recap(result).values()), said(result)


def test_preflight_names_a_misspelt_role_variable():
    result = playbook("playbooks/preflight.yml", "-e", "nvidia_driver_brnach=570")
    assert result.returncode != 0
    assert (
        f"host {SERVING_HOSTS[0]}: nvidia_driver_brnach: is not a variable of nvidia_driver; did you mean nvidia_driver_branch?"
        in said(result)
    ), said(result)
    assert "nothing was changed on any host" in said(result), said(result)
