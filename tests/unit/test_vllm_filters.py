"""The instance planner and its helpers: what an operator's vllm_models becomes on a host."""

from __future__ import annotations

import re

import pytest
from vllm import (
    AnsibleFilterError,
    gateway_models,
    gateway_servers,
    journal_summary,
    model_sources,
    parse_source,
    plan_instances,
    systemd_command_line,
)

TINY = {"name": "tiny", "source": "controller:/srv/models/tiny"}


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("/data/models/llama", {"kind": "host", "location": "/data/models/llama"}),
        ("/data/models/llama/", {"kind": "host", "location": "/data/models/llama"}),
        ("controller:/home/ops/tiny", {"kind": "controller", "location": "/home/ops/tiny"}),
        ("meta-llama/Llama-3.1-8B-Instruct", {"kind": "huggingface", "repo": "meta-llama/Llama-3.1-8B-Instruct", "revision": ""}),
        ("hf:Qwen/Qwen2.5-7B@main", {"kind": "huggingface", "repo": "Qwen/Qwen2.5-7B", "revision": "main"}),
        ("modelscope:qwen/Qwen2.5-7B", {"kind": "modelscope", "repo": "qwen/Qwen2.5-7B", "revision": ""}),
    ],
)
def test_parse_source(source, expected):
    assert parse_source(source) == expected


@pytest.mark.parametrize("source", ["", "llama", "controller:relative/path", "hf:no-slash", "s3://bucket/model"])
def test_parse_source_refuses(source):
    with pytest.raises(AnsibleFilterError):
        parse_source(source)


def test_one_instance_per_model_with_consecutive_ports():
    plan = plan_instances([TINY, {"name": "big", "source": "/models/big"}], "h1", port_base=9000)
    assert [(i["name"], i["port"]) for i in plan] == [("tiny-0", 9000), ("big-0", 9001)]
    assert plan[0]["model_path"] == "/var/lib/vllm/models/tiny"
    assert plan[1]["model_path"] == "/models/big"
    assert plan[0]["health_url"] == "http://127.0.0.1:9000/health"


def test_replicas_get_stable_names_and_skip_reserved_ports():
    plan = plan_instances([{**TINY, "replicas": 3}], "h1", port_base=8000, reserved_ports=[8001])
    assert [(i["name"], i["port"]) for i in plan] == [("tiny-0", 8000), ("tiny-1", 8002), ("tiny-2", 8003)]


def test_argv_has_settings_and_extra_args_but_never_the_key():
    model = {**TINY, "max_model_len": 512, "dtype": "bfloat16", "enable_prefix_caching": False, "extra_args": ["--enforce-eager"]}
    args = plan_instances([model], "h1", listen_address="0.0.0.0")[0]["args"]
    assert args[:8] == ["--model", "/var/lib/vllm/models/tiny", "--served-model-name", "tiny", "--host", "0.0.0.0", "--port", "8000"]
    assert ["--max-model-len", "512"] == args[args.index("--max-model-len") :][:2]
    assert "--no-enable-prefix-caching" in args and args[-1] == "--enforce-eager"
    assert not any("api-key" in a for a in args)


def test_wildcard_listen_address_is_health_checked_on_loopback():
    assert plan_instances([TINY], "h1", listen_address="0.0.0.0")[0]["health_url"].startswith("http://127.0.0.1:")
    assert plan_instances([TINY], "h1", listen_address="::1")[0]["health_url"].startswith("http://[::1]:")


def test_gpus_are_assigned_in_tensor_parallel_blocks():
    plan = plan_instances(
        [{**TINY, "tensor_parallel_size": 2, "replicas": 2}, {"name": "b", "source": "/m/b"}], "gpu1", gpus=[0, 1, 2, 3, 4]
    )
    assert [i["gpus"] for i in plan] == [[0, 1], [2, 3], [4]]
    assert plan[1]["env"]["CUDA_VISIBLE_DEVICES"] == "2,3"


def test_cpu_hosts_get_no_gpus():
    plan = plan_instances([TINY], "cpu1", gpus=None)
    assert plan[0]["gpus"] == [] and "CUDA_VISIBLE_DEVICES" not in plan[0]["env"]


@pytest.mark.parametrize(
    ("models", "kwargs", "message"),
    [
        ([], {}, "host h1: vllm_models: [] is refused; accepted: a non-empty list"),
        ([{**TINY, "tensor_parallel_size": 4}], {"gpus": [0, 1]}, "tensor_parallel_size: instance tiny-0 needs 4 GPU(s) but only 2 of 2"),
        ([{**TINY, "replicas": 3}], {"gpus": [0, 1]}, "instance tiny-2 needs 1 GPU(s) but only 0 of 2"),
        ([TINY, {**TINY, "source": "/m/x"}], {}, "vllm_models[1].name: 'tiny' is already the name of vllm_models[0]"),
        ([{**TINY, "replicas": 0}], {}, "vllm_models[0] (tiny).replicas: 0 is refused; accepted: a whole number >= 1"),
        ([{**TINY, "gpu_memory_utilization": 1.5}], {}, "gpu_memory_utilization: 1.5 is refused; accepted: a number in (0, 1]"),
        ([{**TINY, "extra_args": ["--api-key", "x"]}], {}, 'extra_args[0]: "--api-key" sets --api-key, which is not allowed here'),
        ([{**TINY, "extra_args": ["--port=9"]}], {}, 'extra_args[0]: "--port=9" sets --port, which is not allowed here'),
        ([{**TINY, "source": "nowhere"}], {}, "vllm_models[0] (tiny).source: source 'nowhere' is neither"),
        ([{"name": "bad name", "source": "/m"}], {}, 'vllm_models[0].name: "bad name" is not a name'),
        ([TINY, {"name": "tiny2", "source": "controller:/other/tiny"}], {}, "would both be stored in /var/lib/vllm/models/tiny"),
    ],
)
def test_refusals_name_host_and_field(models, kwargs, message):
    with pytest.raises(AnsibleFilterError) as err:
        plan_instances(models, "h1", **kwargs)
    assert message in str(err.value)
    assert str(err.value).startswith("host h1: ")


def test_replicas_share_one_model_copy():
    plan = plan_instances([{**TINY, "replicas": 2}, {"name": "alias", "source": "controller:/srv/models/tiny"}], "h1")
    sources = model_sources(plan)
    assert [(s["dest"], s["kind"], s["location"]) for s in sources] == [("/var/lib/vllm/models/tiny", "controller", "/srv/models/tiny")]


def test_systemd_command_line_quotes_and_escapes():
    line = systemd_command_line(["--a", "plain/path-1.0", '{"k": "v w"}', "50%", "$HOME"])
    assert line == '--a plain/path-1.0 "{\\"k\\": \\"v w\\"}" "50%%" "$$HOME"'


def test_journal_summary_puts_the_reason_before_the_traceback():
    journal = "\n".join(
        [
            "(APIServer pid=1) INFO starting",
            "(APIServer pid=1) ERROR [core.py:1] ValueError: User-specified max_model_len (1000000) is greater than 2048",
            "Traceback (most recent call last):",
            '  File "/opt/vllm/x.py", line 3, in run',
            '(EngineCore pid=2) ERROR 11-21 11:43:23 [async_llm.py:906]   File "/x.py", line 1',
            "(EngineCore pid=2) ERROR 11-21 11:43:23 [async_llm.py:906]     raise",
            "RuntimeError: Engine core initialization failed.",
            "RuntimeError: Engine core initialization failed.",
            "systemd[1]: vllm@a-0.service: Main process exited, code=exited, status=1/FAILURE",
        ]
    )
    summary = journal_summary(journal, tail=2)
    errors = summary.split("Last lines:")[0]
    assert "ValueError: User-specified max_model_len (1000000)" in errors
    assert "raise" not in errors
    assert errors.count("Engine core initialization failed") == 1
    assert "File " not in errors and "Traceback" not in errors
    assert summary.endswith("status=1/FAILURE")


def _server(host, address, *models):
    return {"host": host, "address": address, "plan": plan_instances(list(models), host)}


def test_gateway_groups_instances_by_model_across_hosts_with_fallback_backups():
    chat = {"name": "chat", "source": "/m/chat", "replicas": 2, "fallback": "small"}
    small = {"name": "small", "source": "/m/small"}
    models = gateway_models([_server("s1", "10.0.0.1", chat, small), _server("s2", "10.0.0.2", chat, small)])
    by_name = {m["name"]: m for m in models}
    assert [s["address"] for s in by_name["chat"]["servers"]] == ["10.0.0.1:8000", "10.0.0.1:8001", "10.0.0.2:8000", "10.0.0.2:8001"]
    assert [s["address"] for s in by_name["chat"]["backups"]] == ["10.0.0.1:8002", "10.0.0.2:8002"]
    assert by_name["small"]["backups"] == [] and by_name["small"]["upstream"] == "vllm_small"


def test_fallback_instances_answer_to_the_primary_name():
    plan = plan_instances([{"name": "chat", "source": "/m/c", "fallback": "small"}, {"name": "small", "source": "/m/s"}], "h1")
    args = plan[1]["args"]
    assert args[args.index("--served-model-name") : args.index("--host")] == ["--served-model-name", "small", "chat"]


@pytest.mark.parametrize(
    ("models", "message"),
    [
        ([{**TINY, "fallback": "tiny"}], "fallback: a model cannot be its own fallback"),
        (
            [{**TINY, "fallback": "b"}, {"name": "b", "source": "/b", "fallback": "c"}, {"name": "c", "source": "/c"}],
            "'b' has a fallback itself",
        ),
    ],
)
def test_fallback_refusals(models, message):
    with pytest.raises(AnsibleFilterError, match=re.escape(message)):
        plan_instances(models, "h1")


def test_gateway_reaches_hosts_by_their_listen_address():
    hostvars = {
        "gw": {"vllm_plan": plan_instances([TINY], "gw", listen_address="127.0.0.1")},
        "s1": {"vllm_plan": plan_instances([TINY], "s1", listen_address="10.0.0.5")},
        "s2": {"vllm_plan": plan_instances([TINY], "s2", listen_address="0.0.0.0"), "ansible_host": "s2.lan"},
    }
    servers = gateway_servers(["gw", "s1", "s2"], hostvars, "gw")
    assert [(s["host"], s["address"]) for s in servers] == [("gw", "127.0.0.1"), ("s1", "10.0.0.5"), ("s2", "s2.lan")]


def test_gateway_refuses_a_remote_host_on_loopback():
    hostvars = {"s1": {"vllm_plan": plan_instances([TINY], "s1", listen_address="127.0.0.1")}}
    with pytest.raises(AnsibleFilterError, match=re.escape("host s1: vllm_listen_address: 127.0.0.1 is only reachable from s1")):
        gateway_servers(["s1"], hostvars, "gw")


def test_gateway_refuses_a_fallback_no_host_serves():
    with pytest.raises(AnsibleFilterError, match="no serving host runs a model named 'nope'"):
        gateway_models([_server("s1", "10.0.0.1", {**TINY, "fallback": "nope"})])


def test_pinned_gpus_are_shared_and_leave_the_automatic_pool():
    models = [
        {"name": "a", "source": "/a", "gpus": [0], "gpu_memory_utilization": 0.5},
        {"name": "b", "source": "/b", "gpus": [0], "gpu_memory_utilization": 0.4},
        {"name": "c", "source": "/c", "replicas": 2},
    ]
    plan = plan_instances(models, "h1", gpus=[0, 1, 2])
    assert [(i["name"], i["gpus"]) for i in plan] == [("a-0", [0]), ("b-0", [0]), ("c-0", [1]), ("c-1", [2])]


@pytest.mark.parametrize(
    ("models", "message"),
    [
        (
            [{"name": "a", "source": "/a", "gpus": [0], "gpu_memory_utilization": 0.6}, {"name": "b", "source": "/b", "gpus": [0]}],
            "vllm_models.gpu_memory_utilization: GPU 0 is shared by a-0 0.6, b-0 0.9: 1.5 > 1.0",
        ),
        ([{"name": "a", "source": "/a", "gpus": [0], "gpu_memory_utilization": 0.6, "replicas": 2}], "GPU 0 is shared by a-0 0.6, a-1 0.6"),
        ([{"name": "a", "source": "/a", "gpus": [7]}], "vllm_models[0] (a).gpus: GPU 7 is not one of this host's GPUs [0, 1]"),
        ([{"name": "a", "source": "/a", "gpus": [0], "tensor_parallel_size": 2}], "lists 1 GPU(s) for tensor_parallel_size 2"),
    ],
)
def test_gpu_sharing_refusals(models, message):
    with pytest.raises(AnsibleFilterError, match=re.escape(message)):
        plan_instances(models, "h1", gpus=[0, 1])
