"""A tensor-parallel instance really runs its ranks: one worker process per rank, in the
instance's own unit, and the instance answers completions."""

from __future__ import annotations

import re

import pytest
from conftest import chat, instances_of, request


@pytest.fixture(scope="module")
def tp_instances(host) -> list[dict]:
    found = [i for i in instances_of(host) if i.get("tensor_parallel_size", 1) > 1]
    if not found:
        pytest.skip("no tensor-parallel instance in this scenario")
    return found


def test_one_worker_per_rank_inside_the_instance_unit(host, tp_instances):
    workers = host.check_output("ps -eo pid=,args= | grep -E 'VLLM::Worker_TP[0-9]+' | grep -v grep || true")
    for inst in tp_instances:
        unit = f"vllm@{inst['name']}.service"
        ranks = []
        for line in workers.splitlines():
            pid, title = line.split(None, 1)
            if unit in host.file(f"/proc/{pid}/cgroup").content_string:
                ranks.append(int(re.search(r"Worker_TP(\d+)", title).group(1)))
        print(f"{unit}: worker ranks {sorted(ranks)}")
        assert sorted(ranks) == list(range(inst["tensor_parallel_size"])), workers


def test_ranks_run_on_their_own_cores(host, tp_instances):
    """VLLM_CPU_OMP_THREADS_BIND (from vllm_nccl_env) gives each rank its own core."""
    binds = host.ansible.get_variables().get("vllm_nccl_env", {}).get("VLLM_CPU_OMP_THREADS_BIND")
    if not binds:
        pytest.skip("no per-rank CPU binding in this scenario")
    pids = host.check_output("pgrep -f 'VLLM::Worker_TP' || true").split()
    allowed = sorted(host.check_output(f"grep Cpus_allowed_list /proc/{pid}/status | cut -f2").strip() for pid in pids)
    assert allowed == sorted(binds.split("|")), allowed


def test_completions_through_both_ranks(host, tp_instances):
    for inst in tp_instances:
        for prompt in ("Say hello.", "Count to three.", "Name a colour."):
            status, body = request(host, inst, "/v1/chat/completions", chat(inst["model"], prompt))
            assert status == 200, body
            assert '"completion_tokens"' in body
