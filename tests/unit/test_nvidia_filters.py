"""GPU facts from real nvidia-smi outputs (fixtures/nvidia-smi, sources named in its README),
topology-aware placement of tensor-parallel instances, and driver package names."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from nvidia import AnsibleFilterError, driver_packages, gpu_facts, parse_query_gpu, parse_topology, pci_gpus
from vllm import LOOPBACK_ENV, check_heads, cpu_ranges, place_gpus, plan_instances

FIXTURES = Path(__file__).parent / "fixtures" / "nvidia-smi"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def test_topology_of_an_nvswitch_h100_box_survives_a_mangled_paste():
    topo = parse_topology(fixture("topo-8xH100-nvswitch.txt"))
    assert sorted(topo) == list(range(8))
    assert all(set(g["links"].values()) == {"NV18"} and len(g["links"]) == 7 for g in topo.values())
    assert [topo[i]["numa_node"] for i in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    # Rows whose NIC columns lost a tab still give the right affinity (read from the right).
    assert topo[5]["cpus"] == [*range(56, 112), *range(168, 224)]
    assert topo[0]["cpus"] == [*range(0, 56), *range(112, 168)]


def test_topology_of_a_pcie_box_with_nic_rows():
    topo = parse_topology(fixture("topo-8xRTX4090-pcie-2numa.txt"))
    assert sorted(topo) == list(range(8)), "NIC rows must not become GPUs"
    assert topo[6]["links"] == {i: "SYS" for i in range(8) if i != 6}
    assert topo[3]["numa_node"] == 0 and topo[4]["numa_node"] == 1


def test_topology_with_the_legend_and_one_host_bridge():
    topo = parse_topology(fixture("topo-2xRTX5090-phb.txt"))
    assert topo == {
        0: {"links": {1: "PHB"}, "cpus": list(range(64)), "numa_node": 0},
        1: {"links": {0: "PHB"}, "cpus": list(range(64)), "numa_node": 0},
    }


def test_space_separated_topology_without_numa_columns():
    # The pre-2020 layout (no NUMA Affinity column), as in kubernetes/kubernetes#53497, 2 GPUs shown.
    text = (
        "        GPU0    GPU1    mlx4_0  CPU Affinity\n"
        "GPU0     X      PIX     PHB     0-9,20-29\n"
        "GPU1    PIX      X      PHB     0-9,20-29\n"
    )
    topo = parse_topology(text)
    assert topo[0] == {"links": {1: "PIX"}, "cpus": [*range(10), *range(20, 30)], "numa_node": None}


def test_topology_without_a_matrix_is_refused():
    with pytest.raises(AnsibleFilterError, match="no topology matrix"):
        parse_topology("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.")


def test_query_rows_with_real_values_and_na():
    fields = (
        "power.limit,power.min_limit,power.max_limit,memory.total,vbios_version,driver_version,name,gpu_uuid,power.draw,"
        "temperature.gpu,temperature.memory,clocks.current.graphics,clocks.sm,clocks.mem,utilization.gpu,utilization.memory,"
        "fan.speed,pcie.link.width.current,pstate"
    ).split(",")
    (row,) = parse_query_gpu(fixture("query-rtx2080-noheader-nounits.txt"), fields)
    assert row["name"] == "GeForce RTX 2080"
    assert row["memory_total"] == 7979
    assert row["driver_version"] == "440.64"
    assert row["gpu_uuid"] == "GPU-22b2c6ac-2d49-4863-197c-9c469071178a"
    assert row["temperature_memory"] is None


def test_query_rows_keep_names_with_spaces():
    assert parse_query_gpu(fixture("query-h100nvl-name-device-id.txt"), ["name", "pci.device_id"]) == [
        {"name": "NVIDIA H100 NVL", "pci_device_id": "0x232110DE"}
    ]


def test_query_with_header_and_units_and_a_wrong_field_count():
    text = "index, memory.total [MiB]\n0, 81559 MiB\n1, 81559 MiB\n"
    assert parse_query_gpu(text, ["index", "memory.total"]) == [{"index": 0, "memory_total": 81559}, {"index": 1, "memory_total": 81559}]
    with pytest.raises(AnsibleFilterError, match="2 values for 3 fields"):
        parse_query_gpu("0, 81559\n", ["index", "memory.total", "name"])


H100_QUERY = "".join(
    f"{i}, GPU-0000000{i}-aaaa-bbbb-cccc-dddddddddddd, NVIDIA H100 80GB HBM3, 81559, 550.127.08, 00000000:{0x18 + i:02X}:00.0, Enabled\n"
    for i in range(8)
)


def test_gpu_facts_join_the_query_and_the_topology():
    facts = gpu_facts(H100_QUERY, fixture("topo-8xH100-nvswitch.txt"))
    assert len(facts) == 8
    assert facts[4]["numa_node"] == 1 and facts[4]["links"]["0"] == "NV18"
    assert facts[0]["memory_total_mib"] == 81559 and facts[0]["driver_version"] == "550.127.08"
    assert gpu_facts(H100_QUERY)[0]["links"] == {}, "the topology is optional"


def test_pci_scan_counts_gpus_but_not_nvswitches_or_audio():
    listing = "\n".join(
        [
            "/sys/bus/pci/devices/0000:18:00.0 0x10de 0x030200",
            "/sys/bus/pci/devices/0000:2a:00.0 0x10de 0x030000",
            "/sys/bus/pci/devices/0000:2a:00.1 0x10de 0x040300",
            "/sys/bus/pci/devices/0000:05:00.0 0x10de 0x068000",
            "/sys/bus/pci/devices/0000:00:02.0 0x8086 0x030000",
        ]
    )
    assert [g["address"] for g in pci_gpus(listing)] == ["0000:18:00.0", "0000:2a:00.0"]
    assert pci_gpus("") == []


# Topologies for placement, written out where a real one does not show the case.
def facts_from(matrix: dict[tuple[int, int], str], n: int, numa: list[int]) -> list[dict]:
    links = {i: {} for i in range(n)}
    for (a, b), link in matrix.items():
        links[a][str(b)] = links[b][str(a)] = link
    return [{"index": i, "links": links[i], "numa_node": numa[i], "cpus": list(range(numa[i] * 4, numa[i] * 4 + 4))} for i in range(n)]


def test_placement_prefers_nvlink_pairs_over_lower_indices():
    # 4 PCIe GPUs where NVLink bridges join 0-2 and 1-3 (two NVLink pairs on one node).
    matrix = {(0, 1): "PHB", (0, 2): "NV4", (0, 3): "PHB", (1, 2): "PHB", (1, 3): "NV4", (2, 3): "PHB"}
    facts = facts_from(matrix, 4, [0, 0, 0, 0])
    assert place_gpus([0, 1, 2, 3], 2, {f["index"]: f for f in facts}) == [0, 2]
    assert place_gpus([1, 2, 3], 2, {f["index"]: f for f in facts}) == [1, 3]


def test_placement_keeps_an_instance_on_one_numa_node():
    topo = parse_topology(fixture("topo-8xRTX4090-pcie-2numa.txt"))
    facts = {i: {"links": {str(k): v for k, v in t["links"].items()}, "numa_node": t["numa_node"]} for i, t in topo.items()}
    # All SYS: nothing to prefer but the lowest indices.
    assert place_gpus([2, 3, 4, 5], 2, facts) == [2, 3]
    matrix = {(a, b): ("PIX" if a // 2 == b // 2 else "SYS") for a in range(4) for b in range(a + 1, 4)}
    facts = {f["index"]: f for f in facts_from(matrix, 4, [0, 0, 1, 1])}
    assert place_gpus([1, 2, 3], 2, facts) == [2, 3]


def test_planner_places_tensor_parallel_on_nvlink_and_binds_numa_cpus():
    matrix = {(0, 1): "PHB", (0, 2): "NV4", (0, 3): "PHB", (1, 2): "PHB", (1, 3): "NV4", (2, 3): "PHB"}
    models = [
        {"name": "small", "source": "/m/s"},
        {"name": "big", "source": "/m/b", "tensor_parallel_size": 2, "env": {"NCCL_DEBUG": "WARN"}},
    ]
    nccl = {"NCCL_DEBUG": "INFO", "NCCL_P2P_LEVEL": "NVL"}
    plan = plan_instances(models, "gpu-01", gpus=facts_from(matrix, 4, [0, 0, 0, 0]), nccl_env=nccl)
    small, big = plan
    assert small["gpus"] == [0] and small["env"] == {**LOOPBACK_ENV, "CUDA_VISIBLE_DEVICES": "0"}, (
        "nccl_env is for tensor-parallel instances only"
    )
    assert big["gpus"] == [1, 3]
    assert big["env"] == {"NCCL_DEBUG": "WARN", "NCCL_P2P_LEVEL": "NVL", **LOOPBACK_ENV, "CUDA_VISIBLE_DEVICES": "1,3"}
    assert (big["numa_node"], big["cpus"]) == (0, "0-3")


def test_planner_does_not_bind_an_instance_that_spans_numa_nodes():
    facts = facts_from({(0, 1): "SYS"}, 2, [0, 1])
    (inst,) = plan_instances([{"name": "big", "source": "/m/b", "tensor_parallel_size": 2}], "gpu-01", gpus=facts)
    assert (inst["gpus"], inst["numa_node"], inst["cpus"]) == ([0, 1], None, "")


def test_planner_with_bare_indices_keeps_its_old_behaviour():
    plan = plan_instances([{"name": "a", "source": "/m/a", "tensor_parallel_size": 2, "replicas": 2}], "gpu-01", gpus=[0, 1, 2, 3])
    assert [i["gpus"] for i in plan] == [[0, 1], [2, 3]]


@pytest.mark.parametrize(("cpus", "text"), [([0, 1, 2, 5], "0-2 5"), ([], ""), ([7], "7"), ([3, 1, 2], "1-3")])
def test_cpu_ranges(cpus, text):
    assert cpu_ranges(cpus) == text


def slurped(model: str, tp: int, config: dict | None) -> dict:
    result = {"item": {"model": model, "tensor_parallel_size": tp}}
    if config is not None:
        result["content"] = base64.b64encode(json.dumps(config).encode()).decode()
    return result


def test_heads_must_divide_by_the_tensor_parallel_size():
    llama = {"num_attention_heads": 32, "num_key_value_heads": 8}
    assert check_heads([slurped("l", 8, llama)], "gpu-01") == ["l"]
    refusal = r"host gpu-01: vllm_models \(l\)\.tensor_parallel_size: 16 does not divide the model's num_key_value_heads \(8\)"
    with pytest.raises(AnsibleFilterError, match=refusal):
        check_heads([slurped("l", 16, llama)], "gpu-01")
    with pytest.raises(AnsibleFilterError, match="num_attention_heads"):
        check_heads([slurped("q", 3, {"text_config": {"num_attention_heads": 40}})], "gpu-01")
    assert check_heads([slurped("hub", 3, None)], "gpu-01") == [], "a model not downloaded yet is left to vLLM"


def test_the_tiny_test_model_allows_two_ranks_but_not_four():
    tiny = {"num_attention_heads": 4, "num_key_value_heads": 2}
    assert check_heads([slurped("tiny", 2, tiny)], "h") == ["tiny"]
    with pytest.raises(AnsibleFilterError, match="num_key_value_heads"):
        check_heads([slurped("tiny", 4, tiny)], "h")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("Ubuntu", "22", "570", "open", False), ["nvidia-headless-570-server-open", "nvidia-utils-570-server", "linux-headers-generic"]),
        (
            ("Ubuntu", "24", "570", "proprietary", True),
            ["nvidia-headless-no-dkms-570-server", "nvidia-utils-570-server", "linux-modules-nvidia-570-server-generic"],
        ),
        (
            ("Debian", "12", "535", "proprietary", False),
            ["nvidia-kernel-dkms", "nvidia-smi", "nvidia-persistenced", "libcuda1", "linux-headers-amd64"],
        ),
    ],
)
def test_driver_packages(args, expected):
    assert driver_packages(*args) == expected


def test_driver_packages_refuse_what_does_not_exist():
    with pytest.raises(AnsibleFilterError, match="nvidia_driver_modules: proprietary"):
        driver_packages("Debian", "12", "535", "open")
    with pytest.raises(AnsibleFilterError, match="no prebuilt"):
        driver_packages("Debian", "12", "535", "proprietary", True)
    with pytest.raises(AnsibleFilterError, match="Rocky"):
        driver_packages("Rocky", "9", "570")
    with pytest.raises(AnsibleFilterError, match="'open' or 'proprietary'"):
        driver_packages("Ubuntu", "24", "570", "closed")
