"""How changes reach instances: which change, in what order, and what stays covered meanwhile;
plus the flag and environment rules that keep a key off command lines and out of mangling."""

from __future__ import annotations

import base64
import json

import pytest
from vllm import (
    LOOPBACK_ENV,
    AnsibleFilterError,
    environment_value,
    extra_args_problem,
    firewall_ports,
    instance_changes,
    plan_instances,
    rollout_batches,
    serve_flags,
)

FLAGS = serve_flags("0.32.0")


def changes(*specs: str) -> list[dict]:
    """'chat-0:changed' -> {name, model, state}."""
    out = []
    for spec in specs:
        name, state = spec.split(":")
        out.append({"name": name, "model": name.rsplit("-", 1)[0], "state": state})
    return out


def ids(batches: list[dict]) -> list[list[str]]:
    return [[f"{i['host']}/{i['name']}" for i in b["instances"]] for b in batches]


def test_with_a_gateway_one_instance_of_each_model_at_a_time_across_hosts():
    hv = {
        "a": {"__vllm_changes": changes("chat-0:changed", "chat-1:changed", "small-0:changed")},
        "b": {"__vllm_changes": changes("chat-0:changed", "chat-1:same", "small-0:new")},
    }
    batches = rollout_batches(["a", "b"], hv, ["gw"])
    assert ids(batches) == [["a/chat-0", "a/small-0"], ["a/chat-1"], ["b/chat-0"]]
    # b/small-0 is new: it was started (and health-gated) before the batches, so small keeps it.
    assert [b["unavailable"] for b in batches] == [[], [], []]


def test_a_model_with_one_instance_is_reported_unavailable_while_it_restarts():
    hv = {"a": {"__vllm_changes": changes("chat-0:changed", "solo-0:changed")}, "b": {"__vllm_changes": changes("chat-0:same")}}
    assert rollout_batches(["a", "b"], hv, ["gw"])[0]["unavailable"] == ["solo"]


def test_a_percentage_batch_is_a_share_of_the_models_instances_at_least_one():
    hv = {h: {"__vllm_changes": changes("chat-0:changed", "chat-1:changed")} for h in "abcd"}
    assert [len(b["instances"]) for b in rollout_batches(list("abcd"), hv, ["gw"], batch="25%")] == [2, 2, 2, 2]
    assert [len(b["instances"]) for b in rollout_batches(list("abcd"), hv, ["gw"], batch="10%")] == [1] * 8
    assert [len(b["instances"]) for b in rollout_batches(list("abcd"), hv, ["gw"], batch=3)] == [3, 3, 2]


def test_without_a_gateway_whole_hosts_change_serial_at_a_time():
    hv = {
        "a": {"__vllm_changes": changes("chat-0:changed", "small-0:changed")},
        "b": {"__vllm_changes": changes("chat-0:same")},
        "c": {"__vllm_changes": changes("chat-0:changed")},
    }
    assert ids(rollout_batches(["a", "b", "c"], hv, [])) == [["a/chat-0", "a/small-0"], ["c/chat-0"]]
    assert ids(rollout_batches(["a", "b", "c"], hv, [], serial="100%")) == [["a/chat-0", "a/small-0", "c/chat-0"]]


def test_nothing_changed_means_no_batch():
    hv = {"a": {"__vllm_changes": changes("chat-0:same", "chat-1:new")}}
    assert rollout_batches(["a"], hv, ["gw"]) == [] and rollout_batches(["a"], hv, []) == []


def test_instances_are_new_when_they_do_not_serve_whatever_their_config():
    plan = [{"name": n, "model": "m"} for n in ("m-0", "m-1", "m-2", "m-3")]
    got = instance_changes(plan, ["active", "inactive", "failed", "active"], [False, True, False, False], [False, False, False, True])
    assert [c["state"] for c in got] == ["same", "new", "new", "changed"]


def test_a_changed_key_file_restarts_a_container_and_an_unchecked_kind_counts_for_nothing():
    plan = [{"name": n, "model": "m"} for n in ("m-0", "m-1")]
    got = instance_changes(plan, ["active", "active"], [False, False], [False, False], [False, True])
    assert [c["state"] for c in got] == ["same", "changed"]
    assert [c["state"] for c in instance_changes(plan, ["active", "active"], [False, False], [False, False], [])] == ["same", "same"]


def test_a_dropped_instance_keeps_its_port_covered_until_it_is_gone():
    plan = [{"name": "chat-0", "port": 8000}]
    last = base64.b64encode(json.dumps([{"name": "chat-0", "port": 8000}, {"name": "chat-1", "port": 8001}]).encode()).decode()
    assert firewall_ports(plan, last, ["chat-0", "chat-1"]) == [8000, 8001]
    assert firewall_ports(plan, last, ["chat-0"]) == [8000], "once prune removed it"
    assert firewall_ports(plan, "", []) == [8000]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--api-key", "k"], "sets --api-key"),
        (["--api-key=k"], "sets --api-key"),
        (["--api_key", "k"], "sets --api-key"),
        (["--api-ke", "k"], "sets --api-key"),
        (["--API-KEY", "k"], "is not a `vllm serve` flag"),
        (["--api-key k"], "holds a flag and something more"),
        (["  --port 9000"], "holds a flag and something more"),
        (["--host=0.0.0.0"], "sets --host"),
        (["--config=/x.yaml"], "sets --config"),
        (["-tp", "2"], "sets --tensor-parallel-size"),
        (["--tensor_parallel_size=2"], "sets --tensor-parallel-size"),
        (["-dp", "2"], "sets --data-parallel-size"),
        (["--served-model", "x"], "sets --served-model-name"),
        (["--uds", "/run/x.sock"], "sets --uds"),
        (["--compilation_config.level", "3"], None),
        (["--enforce-eager", "--max-num-batched-tokens", "8192", "-O3"], None),
        (["--chat-template", "{% for m in messages %}{{ m.content }}{% endfor %}"], None),
        (["--override-generation-config", '{"temperature": 0.5}'], None),
        (["--no-enable-prefix-caching"], None),
        (["--enable-prefix-caching"], "while the model's enable_prefix_caching field sets it too"),
        ([3], "is not a string"),
    ],
)
def test_extra_args_are_read_the_way_vllm_reads_them(args, expected):
    model = {"enable_prefix_caching": True} if expected and "enable_prefix_caching" in expected else {}
    problem = extra_args_problem(args, model, FLAGS)
    if expected is None:
        assert problem is None
    else:
        assert problem is not None and expected in problem[1], problem


def test_managed_flags_are_refused_for_a_release_without_a_flag_list():
    assert serve_flags("9.9.9") is None
    assert "sets --api-key" in extra_args_problem(["--api_k", "x"], {}, None)[1]
    assert extra_args_problem(["--some-future-flag"], {}, None) is None


def test_every_instance_keeps_its_internal_sockets_on_loopback():
    (inst,) = plan_instances([{"name": "t", "source": "/m", "env": {"A": 1}}], "h", env={"B": "x"})
    assert inst["env"] == {"B": "x", "A": "1", **LOOPBACK_ENV}


@pytest.mark.parametrize(
    ("value", "line"),
    [("plain", '"plain"'), ('a"b', '"a\\"b"'), ("back\\slash", '"back\\\\slash"'), ("$HOME 50% é", '"$HOME 50% é"'), (1, '"1"')],
)
def test_environment_values_survive_systemd_unchanged(value, line):
    assert environment_value(value) == line


def test_an_environment_value_cannot_carry_a_newline():
    with pytest.raises(AnsibleFilterError):
        environment_value("two\nlines")
