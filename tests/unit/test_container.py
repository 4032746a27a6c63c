"""The docker runtime's `docker run`: what a wrapper unit starts for one planned instance."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
from vllm import (
    CONTAINER_SECRET,
    AnsibleFilterError,
    archive_image_id,
    container_argv,
    hf_container_argv,
    plan_instances,
    systemd_command_line,
)

KEY = "sk-never-in-a-command-line-1234"
SERVICE_ENV = {"HOME": "/var/lib/vllm", "HF_HUB_OFFLINE": "1"}
GPUS = [{"index": i, "links": {}, "numa_node": 0 if i < 2 else 1, "cpus": [0, 1] if i < 2 else [2, 3]} for i in range(4)]


def argv_for(instance, **kwargs):
    settings = {
        "image": "vllm/vllm-openai:v0.32.0",
        "uid": 998,
        "gid": 997,
        "service_env": SERVICE_ENV,
        "key_file": "/etc/vllm/instances/x.key",
        "writable": ["/var/cache/vllm", "/var/lib/vllm"],
    }
    return container_argv(instance, **{**settings, **kwargs})


def option_values(argv, option):
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == option]


def systemd_split(line):
    """How systemd reads ExecStart=: `$$` is a literal `$`, double quotes group, backslash escapes."""
    words, word, quoted, i, started = [], "", False, 0, False
    while i < len(line):
        c = line[i]
        if c == "\\" and quoted:
            word, i = word + line[i + 1], i + 2
            continue
        if c == '"':
            quoted, started = not quoted, True
        elif c == " " and not quoted:
            if started:
                words.append(word)
            word, started = "", False
        elif c == "$" and line[i + 1 : i + 2] == "$":
            word, started, i = word + "$", True, i + 1
        else:
            word, started = word + c, True
        i += 1
    return [*words, word] if started else words


def test_the_container_gets_its_gpus_only_renumbered_and_its_numa_node():
    plan = plan_instances([{"name": "m", "source": "/m", "tensor_parallel_size": 2, "replicas": 2}], "h", gpus=GPUS)
    second = argv_for(plan[1])
    assert option_values(second, "--gpus") == ['"device=2,3"']
    assert option_values(second, "--cpuset-cpus") == ["2-3"] and option_values(second, "--cpuset-mems") == ["1"]
    # Inside, its two GPUs are 0 and 1: the host's indices must not reach it.
    assert "CUDA_VISIBLE_DEVICES" not in option_values(second, "--env")
    assert plan[1]["env"]["CUDA_VISIBLE_DEVICES"] == "2,3"


def test_no_gpu_flag_on_a_cpu_host_and_shared_memory_is_host_or_sized():
    (instance,) = plan_instances([{"name": "m", "source": "/m"}], "h")
    argv = argv_for(instance)
    assert "--gpus" not in argv and "--cpuset-cpus" not in argv
    assert option_values(argv, "--ipc") == ["host"] and "--shm-size" not in argv
    sized = argv_for(instance, shm="16g")
    assert option_values(sized, "--shm-size") == ["16g"] and "--ipc" not in sized


def test_environment_goes_by_name_and_the_key_by_a_mounted_file():
    (instance,) = plan_instances([{"name": "m", "source": "/m", "env": {"HF_TOKEN": "hf_secret_value"}}], "h")
    argv = argv_for(instance)
    names = option_values(argv, "--env")
    assert {"HOME", "HF_HUB_OFFLINE", "HF_TOKEN", "VLLM_HOST_IP"} <= set(names)
    assert all("=" not in name for name in names)
    assert not any("hf_secret_value" in arg or KEY in arg for arg in argv)
    assert f"/etc/vllm/instances/x.key:{CONTAINER_SECRET}:ro" in option_values(argv, "--volume")


def test_hardening_and_the_model_read_only_at_the_same_path():
    (instance,) = plan_instances([{"name": "m", "source": "/data/models/m"}], "h", listen_address="10.0.0.5")
    argv = argv_for(instance)
    for flag in ("--rm", "--read-only", "--pull=never"):
        assert flag in argv
    assert option_values(argv, "--cap-drop") == ["ALL"] and option_values(argv, "--security-opt") == ["no-new-privileges"]
    assert option_values(argv, "--user") == ["998:997"] and option_values(argv, "--network") == ["host"]
    assert "/data/models/m:/data/models/m:ro" in option_values(argv, "--volume")
    assert "/var/cache/vllm:/var/cache/vllm:rw" in option_values(argv, "--volume")
    assert option_values(argv, "--name") == ["vllm-m-0"]
    # vLLM's own command line, as the venv runtime runs it.
    server = argv.index("vllm.entrypoints.openai.api_server")
    assert argv[server + 1 :] == instance["args"] and "--host" in instance["args"]
    assert "http://10.0.0.5:" in option_values(argv, "--health-cmd")[0]


def test_the_download_container_is_confined_like_an_instance_and_writes_the_models_only():
    argv = hf_container_argv("vllm/vllm-openai:v0.32.0", "/var/lib/vllm/models")
    instance = argv_for(plan_instances([{"name": "m", "source": "/data/models/m"}], "h")[0])
    for option in ("--cap-drop", "--security-opt", "--network"):
        assert option_values(argv, option) == option_values(instance, option), option
    assert "--rm" in argv and "--pull=never" in argv
    assert option_values(argv, "--volume") == ["/var/lib/vllm/models:/var/lib/vllm/models:rw"]
    # The token goes by name: its value is in the environment docker run is given, never here.
    assert option_values(argv, "--env") == ["HF_TOKEN", "HF_ENDPOINT", "HF_HUB_DISABLE_TELEMETRY"]
    assert argv[-3:] == ["--entrypoint", "hf", "vllm/vllm-openai:v0.32.0"]


def test_the_unit_line_reaches_the_shell_entrypoint_intact():
    (instance,) = plan_instances([{"name": "m", "source": "/m", "extra_args": ["--chat-template-content-format", "openai"]}], "h")
    argv = argv_for(instance)
    assert systemd_split(systemd_command_line(argv)) == argv
    script = argv[argv.index("-c") + 1]
    assert re.fullmatch(r'VLLM_API_KEY="\$\(cat /run/secrets/vllm-api-key\)" && export VLLM_API_KEY && exec "\$@"', script)


def test_the_entrypoint_reads_the_key_and_runs_the_server_arguments_verbatim(tmp_path):
    """The same script a real /bin/sh runs inside the container: the key from the file, every
    argument after it passed through unchanged (spaces, quotes, dollars)."""
    secret = tmp_path / "key"
    secret.write_text(KEY + "\n")
    script = argv_for(plan_instances([{"name": "m", "source": "/m"}], "h")[0])
    script = script[script.index("-c") + 1].replace(CONTAINER_SECRET, str(secret))
    args = ["--served-model-name", "a b", '{"x": "$HOME"}']
    shown = subprocess.run(
        ["/bin/sh", "-c", script, "vllm", "sh", "-c", 'printf "%s\\n" "$VLLM_API_KEY" "$@"', "inner", *args],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert shown == [KEY, *args]


# manifest.json as `docker save` writes it: Docker 25+ (OCI layout) and older engines.
OCI = [{"Config": "blobs/sha256/" + "ab" * 32, "RepoTags": ["vllm-cpu:0.32.0"], "Layers": ["blobs/sha256/" + "cd" * 32]}]
LEGACY = [{"Config": "ef" * 32 + ".json", "RepoTags": ["vllm/vllm-openai:v0.32.0", "vllm:latest"], "Layers": []}]


@pytest.mark.parametrize(
    ("manifest", "image", "expected"),
    [
        (OCI, "vllm-cpu:0.32.0", "sha256:" + "ab" * 32),
        (LEGACY, "vllm:latest", "sha256:" + "ef" * 32),
    ],
)
def test_archive_image_id(manifest, image, expected):
    assert archive_image_id(json.dumps(manifest), image) == expected


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        ("{not json", "not JSON"),
        ('{"Config": "x"}', "not a docker save manifest"),
        (json.dumps(OCI + LEGACY), "no image named"),
        (json.dumps(OCI), r"no image named 'other:1' \(it holds \['vllm-cpu:0.32.0'\]\)"),  # a stale archive
    ],
)
def test_archive_image_id_refuses(manifest, message):
    with pytest.raises(AnsibleFilterError, match=message):
        archive_image_id(manifest, "other:1")
    assert archive_image_id(manifest, "other:1", strict=False) == "", "the archive's own playbook writes it again"
