"""A tensor-parallel instance really runs its ranks: one worker process per rank, in the
instance's own unit (venv runtime) or its own container (docker runtime), and the instance
answers completions."""

from __future__ import annotations

import re

import pytest
from conftest import SERVING_HOSTS, chat, instances_of, request

testinfra_hosts = SERVING_HOSTS


@pytest.fixture(scope="module")
def tp_instances(host) -> list[dict]:
    found = [i for i in instances_of(host) if i.get("tensor_parallel_size", 1) > 1]
    if not found:
        pytest.skip("no tensor-parallel instance in this scenario")
    return found


def workers(host) -> dict[int, str]:
    """pid -> title of every tensor-parallel worker (vLLM titles them VLLM::Worker_TP<rank>)."""
    found = {}
    for line in host.check_output("ps -eo pid=,args=").splitlines():
        pid, _, args = line.strip().partition(" ")
        if args.startswith("VLLM::Worker_TP"):
            found[int(pid)] = args
    return found


def test_one_worker_per_rank_inside_the_instance_unit(host, tp_instances):
    procs = workers(host)
    docker = host.ansible.get_variables().get("vllm_runtime") == "docker"
    for inst in tp_instances:
        # The control group that holds the instance: its unit's, or its container's (by id).
        unit = f"vllm@{inst['name']}.service"
        group = host.check_output(f"docker inspect --format '{{{{.Id}}}}' vllm-{inst['name']}") if docker else unit
        ranks = sorted(
            int(re.match(r"VLLM::Worker_TP(\d+)", title).group(1))
            for pid, title in procs.items()
            if group in host.file(f"/proc/{pid}/cgroup").content_string
        )
        print(f"{unit}: worker ranks {ranks} in {group}")
        assert ranks == list(range(inst["tensor_parallel_size"])), procs


def test_ranks_run_on_their_own_cores(host, tp_instances):
    """VLLM_CPU_OMP_THREADS_BIND (from vllm_nccl_env) gives each rank its own core."""
    binds = host.ansible.get_variables().get("vllm_nccl_env", {}).get("VLLM_CPU_OMP_THREADS_BIND")
    if not binds:
        pytest.skip("no per-rank CPU binding in this scenario")
    allowed = {title: host.check_output(f"grep Cpus_allowed_list /proc/{pid}/status").split()[-1] for pid, title in workers(host).items()}
    print(f"worker CPUs: {allowed}")
    assert sorted(allowed.values()) == sorted(binds.split("|")), allowed


def test_completions_through_both_ranks(host, tp_instances):
    for inst in tp_instances:
        for prompt in ("Say hello.", "Count to three.", "Name a colour."):
            status, body = request(host, inst, "/v1/chat/completions", chat(inst["model"], prompt))
            assert status == 200, body
            assert '"completion_tokens"' in body
