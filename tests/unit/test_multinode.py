"""One instance served by a group of hosts (a model larger than one host): ranks, the leader,
the flags of vLLM's multi-node launcher, the GPUs on each host from real topologies, and the
refusals preflight raises before any host is changed."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
from nvidia import gpu_facts
from vllm import (
    AnsibleFilterError,
    check_heads,
    gateway_servers,
    host_errors,
    launch_args,
    node_group_errors,
    node_groups,
    plan_instances,
    rollout_batches,
)

FIXTURES = Path(__file__).parent / "fixtures" / "nvidia-smi"
H100_QUERY = "".join(
    f"{i}, GPU-0000000{i}-aaaa-bbbb-cccc-dddddddddddd, NVIDIA H100 80GB HBM3, 81559, 550.127.08, 00000000:{0x18 + i:02X}:00.0, Enabled\n"
    for i in range(8)
)
H100 = gpu_facts(H100_QUERY, (FIXTURES / "topo-8xH100-nvswitch.txt").read_text())
RTX4090 = gpu_facts(
    "".join(f"{i}, GPU-{i}, NVIDIA GeForce RTX 4090, 24564, 550.54.14, 00000000:{0x10 + i:02X}:00.0, Disabled\n" for i in range(8)),
    (FIXTURES / "topo-8xRTX4090-pcie-2numa.txt").read_text(),
)


def members(*hosts: str, interface: str = "ens5") -> list[dict]:
    return [{"host": h, "address": f"10.0.0.{i + 11}", "interface": interface} for i, h in enumerate(hosts)]


def big(**fields) -> dict:
    return {"name": "llama-405b", "source": "/models/llama-405b", "nodes": "llama_405b", **fields}


def test_pipeline_parallel_across_four_h100_hosts():
    """tp 8 on each host, 2 stages of 2 hosts: vLLM gets tp 16 x pp 2 over the 4 hosts."""
    group = {"llama_405b": members("gpu-a", "gpu-b", "gpu-c", "gpu-d")}
    model = big(tensor_parallel_size=8, pipeline_parallel_size=2)
    plans = {h: plan_instances([model], h, gpus=H100, node_groups=group, listen_address="10.0.0.99") for h in ("gpu-a", "gpu-b", "gpu-d")}
    leader, second, last = (plans[h][0] for h in ("gpu-a", "gpu-b", "gpu-d"))
    assert [i["role"] for i in (leader, second, last)] == ["leader", "follower", "follower"]
    assert [i["node"]["node_rank"] for i in (leader, second, last)] == [0, 1, 3]
    assert leader["world"] == {"tensor_parallel_size": 16, "pipeline_parallel_size": 2}
    for inst in (leader, second, last):
        assert inst["gpus"] == list(range(8)) and inst["env"]["CUDA_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7"
        args = inst["args"]
        assert args.count("--tensor-parallel-size") == 1 and args[args.index("--tensor-parallel-size") + 1] == "16"
        assert args[args.index("--pipeline-parallel-size") + 1] == "2"
        assert args[args.index("--nnodes") + 1] == "4" and args[args.index("--master-addr") + 1] == "10.0.0.11"
        assert args[args.index("--master-port") + 1] == "29500"
        assert inst["env"]["VLLM_HOST_IP"] == inst["node"]["address"] and inst["env"]["NCCL_SOCKET_IFNAME"] == "ens5"
        assert inst["env"]["GLOO_SOCKET_IFNAME"] == "ens5"
    assert "--headless" not in leader["args"] and "--headless" in last["args"]
    assert leader["health_url"] == "http://10.0.0.99:8000/health" and leader["port"] == 8000
    assert last["health_url"] is None and last["port"] is None, "a follower serves no API of its own"
    assert last["node"]["peers"] == ["10.0.0.11", "10.0.0.12", "10.0.0.13"]


def test_tensor_parallel_across_hosts_places_gpus_on_one_numa_node_of_each():
    group = {"pair": members("pcie-1", "pcie-2")}
    model = {"name": "m", "source": "/models/m", "nodes": "pair", "tensor_parallel_size": 4}
    (inst,) = plan_instances([model], "pcie-2", gpus=RTX4090, node_groups=group)
    assert inst["world"] == {"tensor_parallel_size": 8, "pipeline_parallel_size": 1}
    assert len(inst["gpus"]) == 4 and inst["numa_node"] is not None, "the host's 4 GPUs of one NUMA node"
    assert inst["node"]["node_rank"] == 1 and "--headless" in inst["args"]


def test_a_follower_takes_no_port_and_the_host_keeps_its_own_instances():
    group = {"pair": members("cpu-1", "cpu-2")}
    models = [{"name": "m", "source": "/models/m", "nodes": "pair"}, {"name": "small", "source": "/models/s"}]
    follower, small = plan_instances(models, "cpu-2", node_groups=group)
    assert follower["port"] is None and small["port"] == 8000
    leader, small = plan_instances(models, "cpu-1", node_groups=group)
    assert (leader["port"], small["port"]) == (8000, 8001)
    assert small["env"]["VLLM_HOST_IP"] == "127.0.0.1", "a one-host instance keeps its sockets on loopback"
    assert leader["env"]["VLLM_PORT"] == "29501"


def ray_of(inst: dict) -> list[str]:
    """The `ray start` arguments vllm-launch gets for an instance (each as --ray=ARG)."""
    return [a.removeprefix("--ray=") for a in launch_args(inst) if a.startswith("--ray=")]


def test_ray_pipeline_parallel_across_four_h100_hosts():
    """Ray: the leader runs Ray's head and vLLM (tp 8 x pp 4 through Ray), every other host a
    Ray worker node and no vLLM; every port Ray is told to open is inside the group's range,
    clear of vLLM's own (VLLM_PORT up) and of the watch."""
    group = {"llama_405b": members("gpu-a", "gpu-b", "gpu-c", "gpu-d")}
    model = big(tensor_parallel_size=8, pipeline_parallel_size=4, distributed_backend="ray", rendezvous_port=30000)
    leader, worker = (plan_instances([model], h, gpus=H100, node_groups=group, listen_address="10.0.0.99")[0] for h in ("gpu-a", "gpu-c"))
    assert leader["world"] == {"tensor_parallel_size": 8, "pipeline_parallel_size": 4}
    args = leader["args"]
    assert args[args.index("--distributed-executor-backend") + 1] == "ray"
    assert args[args.index("--tensor-parallel-size") + 1] == "8" and args[args.index("--pipeline-parallel-size") + 1] == "4"
    for flag in ("--nnodes", "--node-rank", "--master-addr", "--master-port", "--headless"):
        assert flag not in args, f"{flag} is vLLM's own launcher's, not Ray's"
    assert worker["args"] == [] and worker["port"] is None and worker["health_url"] is None, "a Ray worker node runs no vLLM"
    assert leader["health_url"] == "http://10.0.0.99:8000/health"
    head, node = ray_of(leader), ray_of(worker)
    assert head[0] == "--head" and "--port=30000" in head and "--include-dashboard=false" in head
    assert "--address=10.0.0.11:30000" in node and "--head" not in node
    assert "--node-ip-address=10.0.0.11" in head and "--node-ip-address=10.0.0.13" in node
    for ray in (head, node):
        assert ray[-2:] == ["--disable-usage-stats", "--block"] and "--num-gpus=8" in ray
        ports = {a.split("=")[0]: int(a.split("=")[1]) for a in ray if a.endswith(tuple("0123456789")) and "port" in a.split("=")[0]}
        assert all(30016 <= p <= 30062 for name, p in ports.items() if name != "--port"), ports
        assert len(set(ports.values())) == len(ports), "two of Ray's ports are one"
    assert leader["node"]["watch_port"] == 30063 and leader["env"]["VLLM_PORT"] == "30001"
    assert launch_args(leader)[launch_args(leader).index("--ray-address") + 1] == "10.0.0.11:30000"
    for inst in (leader, worker):
        assert inst["env"]["RAY_USAGE_STATS_ENABLED"] == "0" and inst["env"]["VLLM_HOST_IP"] == inst["node"]["address"]
        assert inst["env"]["CUDA_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7"


def test_mp_groups_pass_no_ray_arguments():
    group = {"pair": members("cpu-1", "cpu-2")}
    (inst,) = plan_instances([{"name": "m", "source": "/models/m", "nodes": "pair"}], "cpu-1", node_groups=group, device="cpu")
    assert inst["node"]["backend"] == "mp" and ray_of(inst) == [] and "--ray-address" not in launch_args(inst)
    assert inst["node"]["watch_port"] == 29531 and "RAY_USAGE_STATS_ENABLED" not in inst["env"]


@pytest.mark.parametrize(
    ("model", "host", "groups", "message"),
    [
        (
            big(pipeline_parallel_size=3),
            "gpu-a",
            {"llama_405b": members("gpu-a", "gpu-b")},
            r"\.pipeline_parallel_size: 3 does not divide the 2 hosts",
        ),
        (
            {"name": "m", "source": "/m", "pipeline_parallel_size": 2},
            "gpu-a",
            {},
            r"\(m\)\.pipeline_parallel_size: 2 stages need several hosts",
        ),
        (big(), "gpu-a", {}, r"\.nodes: \"llama_405b\" is not an inventory group"),
        (big(), "gpu-z", {"llama_405b": members("gpu-a", "gpu-b")}, r"host gpu-z: .*\.nodes: this host is not in group 'llama_405b'"),
        (big(), "gpu-a", {"llama_405b": members("gpu-a")}, r"group 'llama_405b' has one host"),
        (big(replicas=2), "gpu-a", {"llama_405b": members("gpu-a", "gpu-b")}, r"\.replicas: 2: a group of hosts runs one instance"),
        (big(rendezvous_port=80), "gpu-a", {"llama_405b": members("gpu-a", "gpu-b")}, r"\.rendezvous_port: 80 is refused"),
        (big(rendezvous_port="29500"), "gpu-a", {"llama_405b": members("gpu-a", "gpu-b")}, r"\.rendezvous_port: \"29500\" is refused"),
        (
            big(),
            "gpu-a",
            {"llama_405b": [*members("gpu-a"), {"host": "gpu-b", "address": "192.168.9.2", "interface": ""}]},
            r"host gpu-b: vllm_node_interface: no interface of gpu-b holds 192\.168\.9\.2",
        ),
        (
            big(),
            "gpu-b",
            {"llama_405b": [{"host": "gpu-a", "address": "", "interface": ""}, *members("gpu-b")]},
            r"host gpu-b: .*\.nodes: no address is known for gpu-a",
        ),
        (
            big(rendezvous_port=8000),
            "gpu-a",
            {"llama_405b": members("gpu-a", "gpu-b")},
            r"host gpu-a: vllm_rendezvous_port: 8000: the ports 8000-8031",
        ),
        (
            big(rendezvous_port=7970, distributed_backend="ray"),
            "gpu-a",
            {"llama_405b": members("gpu-a", "gpu-b")},
            r"host gpu-a: vllm_rendezvous_port: 7970: the ports 7970-8033 of group 'llama_405b' hold port\(s\) 8000",
        ),
        (
            big(rendezvous_port=65480, distributed_backend="ray"),
            "gpu-a",
            {"llama_405b": members("gpu-a", "gpu-b")},
            r"\.rendezvous_port: 65480 is refused; accepted: a whole number from 1024 to 65471 \(group 'llama_405b' takes 64 ports\)",
        ),
        (big(distributed_backend="rays"), "gpu-a", {}, r"\.distributed_backend: \"rays\" is refused; accepted: mp or ray"),
        ({"name": "m", "source": "/m", "distributed_backend": "ray"}, "gpu-a", {}, r"\(m\)\.distributed_backend: ray spans a group"),
        (
            {"name": "m", "source": "/m", "tensor_parallel_size": 2, "rendezvous_port": 30000},
            "gpu-a",
            {},
            r"\(m\)\.rendezvous_port: 30000 is the port a group of hosts meets on, and the model has no `nodes`",
        ),
    ],
)
def test_refusals_name_the_host_and_the_field(model, host, groups, message):
    with pytest.raises(AnsibleFilterError, match=message):
        plan_instances([model], host, node_groups=groups, gpus=list(range(8)))


def test_ray_is_refused_on_the_cpu_build():
    with pytest.raises(AnsibleFilterError, match=r"host cpu-1: vllm_models \(m\)\.distributed_backend: ray is refused: the CPU build"):
        plan_instances(
            [{"name": "m", "source": "/m", "nodes": "pair", "distributed_backend": "ray"}],
            "cpu-1",
            node_groups={"pair": members("cpu-1", "cpu-2")},
            device="cpu",
        )


def test_a_group_serves_one_model():
    models = [big(), {**big(), "name": "other"}]
    with pytest.raises(AnsibleFilterError, match=r"host gpu-a: vllm_models: llama-405b, other are all served by group 'llama_405b'"):
        plan_instances(models, "gpu-a", node_groups={"llama_405b": members("gpu-a", "gpu-b")})


def test_a_host_in_two_groups_is_refused():
    groups = {"g1": members("a", "b"), "g2": members("a", "c")}
    models = [{"name": "m1", "source": "/m1", "nodes": "g1"}, {"name": "m2", "source": "/m2", "nodes": "g2"}]
    with pytest.raises(AnsibleFilterError, match=r"host a: vllm_models: this host is in groups 'g1', 'g2'"):
        plan_instances(models, "a", node_groups=groups)


def test_node_groups_read_addresses_from_the_operator_or_the_facts():
    hostvars = {
        "a": {"ansible_facts": {"default_ipv4": {"address": "10.1.0.1", "interface": "eth0"}}},
        "b": {"vllm_node_address": "192.168.7.2", "vllm_node_interface": "ib0", "ansible_facts": {"default_ipv4": {"address": "10.1.0.2"}}},
        "c": {},
    }
    groups = {"pair": ["a", "b", "c"], "vllm_servers": ["a", "b", "c"]}
    assert node_groups([{"name": "m", "nodes": "pair"}, {"name": "s"}], groups, hostvars) == {
        "pair": [
            {"host": "a", "address": "10.1.0.1", "interface": "eth0", "problem": ""},
            {"host": "b", "address": "192.168.7.2", "interface": "ib0", "problem": ""},
            {"host": "c", "address": "", "interface": "", "problem": ""},
        ]
    }
    assert node_groups([{"name": "m", "nodes": "nosuch"}], groups, hostvars) == {}
    # An address of another interface than the default route's: its own interface (facts).
    hostvars["a"] = {
        "vllm_node_address": "192.168.50.1",
        "ansible_facts": {
            "default_ipv4": {"address": "10.1.0.1", "interface": "eth0"},
            "interfaces": ["lo", "eth0", "enp65s0f0-ib"],
            "eth0": {"device": "eth0", "ipv4": {"address": "10.1.0.1"}},
            "enp65s0f0_ib": {"device": "enp65s0f0-ib", "ipv4": {"address": "192.168.50.1"}},
        },
    }
    assert node_groups([{"name": "m", "nodes": "pair"}], groups, hostvars)["pair"][0] == {
        "host": "a",
        "address": "192.168.50.1",
        "interface": "enp65s0f0-ib",
        "problem": "",
    }


@pytest.mark.parametrize(
    ("operator", "problem"),
    [
        ({"vllm_node_interface": "ib7"}, "'ib7' is not an interface of a (it has eth0, ib0, lo)"),
        ({"vllm_node_interface": "lo"}, "'lo' of a does not hold 10.1.0.1 (eth0 does)"),
        ({"vllm_node_address": "10.9.9.9", "vllm_node_interface": "eth0"}, "'eth0' of a does not hold 10.9.9.9"),
        # An interface's secondary address is its own.
        ({"vllm_node_address": "192.168.50.7", "vllm_node_interface": "ib0"}, ""),
        ({"vllm_node_address": "192.168.50.7"}, ""),
        ({"vllm_node_address": "192.168.50.9", "vllm_node_interface": "ib0:1"}, ""),
    ],
)
def test_an_interface_the_facts_do_not_show_holding_the_address_is_refused(operator, problem):
    facts = {
        "default_ipv4": {"address": "10.1.0.1", "interface": "eth0"},
        "interfaces": ["lo", "eth0", "ib0"],
        "lo": {"device": "lo", "ipv4": {"address": "127.0.0.1"}},
        "eth0": {"device": "eth0", "ipv4": {"address": "10.1.0.1"}},
        "ib0": {"device": "ib0", "ipv4": {"address": "192.168.50.1"}, "ipv4_secondaries": [{"address": "192.168.50.7"}]},
    }
    if "ib0:1" in operator.values():  # an alias: facts list it with '_'
        facts["interfaces"].append("ib0_1")
        facts["ib0_1"] = {"device": "ib0:1", "ipv4": {"address": "192.168.50.9"}}
    other = {"ansible_facts": {"default_ipv4": {"address": "10.1.0.2", "interface": "eth0"}}}
    hostvars = {"a": {**operator, "ansible_facts": facts}, "b": other}
    groups = node_groups([{"name": "m", "nodes": "pair"}], {"pair": ["a", "b"]}, hostvars)
    assert groups["pair"][0]["problem"] == problem
    if problem:
        with pytest.raises(AnsibleFilterError, match=re.escape(f"host a: vllm_node_interface: {problem} (group 'pair')")):
            plan_instances([{"name": "m", "source": "/m", "nodes": "pair"}], "b", node_groups=groups)
    else:
        assert groups["pair"][0]["interface"] == operator.get("vllm_node_interface", "ib0")


def fleet(gpus: dict[str, int], models: dict[str, list[dict]], group: list[str]) -> dict:
    hv = {}
    for host, n in gpus.items():
        plan = plan_instances(models[host], host, node_groups={"pair": members(*group)}) if models[host] else []
        hv[host] = {"vllm_gpus": list(range(n)), "vllm_models": models[host], "vllm_plan": plan}
    return hv


def test_preflight_across_the_hosts_of_a_group():
    model = {"name": "m", "source": "/m", "nodes": "pair", "env": {"NCCL_SOCKET_NTHREADS": "4"}}
    groups = {"pair": ["a", "b"]}
    same = fleet({"a": 8, "b": 8}, {"a": [model], "b": [{**model, "env": {}}]}, ["a", "b"])
    assert node_group_errors(["a", "b"], same, groups) == [], "env may differ per host"
    hv = fleet({"a": 8, "b": 4}, {"a": [model], "b": [{**model, "max_model_len": 4096}]}, ["a", "b"])
    errors = node_group_errors(["a", "b"], hv, groups)
    assert any(e.startswith("host b: vllm_models (m): differs from its definition on a") for e in errors), errors
    assert any(e.startswith("host b: vllm_gpus: 4 GPU(s), but a of group 'pair' has 8") for e in errors), errors
    # b is also in another group whose vllm_models won: it does not plan m, and a would wait for it.
    hv = fleet({"a": 8, "b": 8}, {"a": [model], "b": [{"name": "other", "source": "/o"}]}, ["a", "b"])
    (error,) = node_group_errors(["a", "b"], hv, {**groups, "other_group": ["b"]})
    assert error.startswith("host b: vllm_models: does not plan 'm', which group 'pair' serves") and "'other_group'" in error
    (error,) = node_group_errors(["a"], same, groups)
    assert error.startswith("host a: vllm_models (m).nodes: b of group 'pair' is not in this run")
    # Host settings the group shares, and the rendezvous each host was planned with.
    same["a"]["vllm_version"], same["b"]["vllm_version"] = "0.32.0", "0.31.0"
    same["b"]["vllm_plan"] = plan_instances([{**model, "env": {}}], "b", node_groups={"pair": members("a", "b")}, rendezvous_port=29600)
    same["b"]["vllm_models_dir"] = "/data/models"  # Ray's workers load the leader's path
    errors = node_group_errors(["a", "b"], same, groups)
    assert errors[0].startswith('host b: vllm_version: "0.31.0", but a of group \'pair\' has "0.32.0"'), errors
    assert any(e.startswith('host b: vllm_models_dir: "/data/models", but a of group \'pair\' has null') for e in errors), errors
    assert any(e.startswith("host b: the rendezvous port: 29600, but a of group 'pair' has 29500") for e in errors), errors


def test_the_gateway_sees_the_leader_only():
    hv = fleet(
        {"a": 1, "b": 1},
        {"a": [{"name": "m", "source": "/m", "nodes": "pair"}], "b": [{"name": "m", "source": "/m", "nodes": "pair"}]},
        ["a", "b"],
    )
    servers = gateway_servers(["a", "b"], hv, "a")
    assert [(s["host"], [i["name"] for i in s["plan"]]) for s in servers] == [("a", ["m-0"]), ("b", [])]


def test_a_group_restarts_together_in_one_batch():
    def changes(group: str | None, *specs: str) -> list[dict]:
        return [
            {"name": s.split(":")[0], "model": s.split(":")[0].rsplit("-", 1)[0], "state": s.split(":")[1], "group": group} for s in specs
        ]

    hv = {
        "a": {"__vllm_changes": changes("pair", "big-0:changed") + changes(None, "chat-0:changed")},
        "b": {"__vllm_changes": changes("pair", "big-0:changed") + changes(None, "chat-0:changed")},
        "c": {"__vllm_changes": changes(None, "chat-0:changed")},
    }
    batches = rollout_batches(["a", "b", "c"], hv, ["gw"])
    assert [sorted(f"{i['host']}/{i['name']}" for i in b["instances"]) for b in batches] == [
        ["a/big-0", "a/chat-0", "b/big-0"],
        ["b/chat-0"],
        ["c/chat-0"],
    ]
    assert batches[0]["unavailable"] == ["big"] and batches[0]["groups"] == ["pair"]
    # Without a gateway, whole hosts change: the group's hosts count as one.
    batches = rollout_batches(["a", "b", "c"], hv, [])
    assert [sorted({i["host"] for i in b["instances"]}) for b in batches] == [["a", "b"], ["c"]]


def config(**fields) -> dict:
    return {
        "item": {
            "model": "big",
            "tensor_parallel_size": 8,
            "node": {"group": "g"},
            "world": {"tensor_parallel_size": 16, "pipeline_parallel_size": 2},
        },
        "content": base64.b64encode(json.dumps(fields).encode()).decode(),
    }


def test_heads_and_layers_must_divide_over_the_group():
    assert check_heads([config(num_attention_heads=128, num_key_value_heads=16, num_hidden_layers=126)], "gpu-a") == ["big"]
    with pytest.raises(
        AnsibleFilterError, match=r"tensor_parallel_size: 16 \(8 per host x 2 hosts\) does not divide the model's num_key_value_heads \(8\)"
    ):
        check_heads([config(num_attention_heads=64, num_key_value_heads=8, num_hidden_layers=80)], "gpu-a")
    with pytest.raises(AnsibleFilterError, match=r"pipeline_parallel_size: 2 does not divide the model's num_hidden_layers \(61\)"):
        check_heads([config(num_attention_heads=128, num_key_value_heads=128, num_hidden_layers=61)], "gpu-a")


def test_a_group_s_containers_run_the_launcher_and_only_the_leader_is_health_checked():
    from vllm import CONTAINER_LAUNCHER, container_argv

    group = {"llama_405b": members("gpu-a", "gpu-b")}
    settings = {"image": "vllm/vllm-openai:v0.32.0", "uid": 998, "gid": 997, "service_env": {}, "key_file": "/k", "writable": []}
    for host, checked in (("gpu-a", True), ("gpu-b", False)):
        (inst,) = plan_instances([big(tensor_parallel_size=8)], host, gpus=H100, node_groups=group)
        argv = container_argv(inst, launcher="/opt/vllm/bin/vllm-launch", **settings)
        assert f"/opt/vllm/bin/vllm-launch:{CONTAINER_LAUNCHER}:ro" in argv and argv[argv.index("--network") + 1] == "host"
        tail = argv[argv.index("vllm/vllm-openai:v0.32.0") :]
        assert tail[4:6] == ["python3", CONTAINER_LAUNCHER] and tail[tail.index("--") + 1 :] == inst["args"]
        assert ("--health-cmd" in argv) is checked


def test_a_group_s_ports_must_lie_outside_the_host_s_ephemeral_range():
    def errors(port: int, ephemeral: str | None) -> list[str]:
        plan = plan_instances([big(rendezvous_port=port)], "gpu-a", node_groups={"llama_405b": members("gpu-a", "gpu-b")})
        return host_errors(plan, "gpu-a", host_paths=[], configs=[], shm_mib=None, min_shm_mib=1, wheelhouse="", ephemeral=ephemeral)

    assert errors(29500, "32768\t60999\n") == [] and errors(40000, None) == []
    assert errors(32736, "32768 60999") == [] and errors(61000, "32768 60999") == []
    (error,) = errors(32740, "32768\t60999\n")
    assert error.startswith("host gpu-a: vllm_rendezvous_port: 32740: the ports 32740-32771 of group 'llama_405b' reach into") and (
        "ephemeral port range 32768-60999" in error and "accepted: a range below 32768 or above 60999" in error
    ), error
