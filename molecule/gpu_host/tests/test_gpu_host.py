"""Host preparation on a host without a GPU: a real Docker engine with a merged daemon.json, and
NVIDIA roles that skip, saying why, and leave nothing behind."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

INVENTORY = os.environ["MOLECULE_INVENTORY_FILE"]
PROJECT = Path(__file__).resolve().parents[3]


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


def test_the_engine_runs_a_container(host):
    # No registry here: build a one-binary image from the host's own files.
    host.check_output(
        "tar -C / -ch usr/bin/true lib/x86_64-linux-gnu/libc.so.6 lib64/ld-linux-x86-64.so.2 | docker import - molecule-true:1"
    )
    result = host.run("docker run --rm molecule-true:1 /usr/bin/true")
    assert result.rc == 0, result.stderr


def test_no_nvidia_software_on_a_host_without_a_gpu(host):
    assert not host.file("/etc/modprobe.d/blacklist-nouveau.conf").exists
    assert not host.file("/etc/apt/sources.list.d/nvidia-container-toolkit.sources").exists
    for package in ("nvidia-kernel-dkms", "nvidia-smi", "nvidia-container-toolkit"):
        assert not host.package(package).is_installed, package


def playbook(name: str, *args: str) -> tuple[int, str]:
    env = {**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_CALLBACK_RESULT_FORMAT": "json"}
    run = subprocess.run(
        ["ansible-playbook", "-i", INVENTORY, str(PROJECT / "playbooks" / name), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=PROJECT,
        timeout=600,
    )
    return run.returncode, run.stdout + run.stderr


def test_nvidia_roles_say_why_they_skip_and_a_rerun_changes_nothing():
    rc, said = playbook("hosts.yml")
    assert rc == 0, said
    for role in ("nvidia_driver", "nvidia_container_toolkit"):
        assert f"no NVIDIA GPU on the PCI bus (/sys/bus/pci/devices): {role} skipped" in said, said
    assert " changed=0 " in said and " failed=0 " in said, said


def test_preflight_names_a_misspelt_role_variable():
    rc, said = playbook("preflight.yml", "-e", "nvidia_driver_brnach=570")
    assert rc != 0
    assert (
        "host vllm-gpu-host-1: nvidia_driver_brnach: is not a variable of nvidia_driver;"
        " did you mean nvidia_driver_branch?" in said
    ), said
    assert "nothing was changed on any host" in said, said
