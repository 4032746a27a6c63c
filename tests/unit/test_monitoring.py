"""Prometheus targets and the Grafana dashboard, computed from the fleet's plan."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from monitoring import dashboard, direct_sources, exporter_address, panel_queries, scrape_targets
from vllm import gateway_servers, plan_instances

REPO = Path(__file__).resolve().parents[2]
MODELS = [{"name": "chat", "source": "/m/chat", "replicas": 2, "fallback": "small"}, {"name": "small", "source": "/m/small"}]


def fleet(listen: str = "10.0.0.") -> dict:
    """Two serving hosts, one gateway, one monitoring host, with facts as preflight leaves them."""
    hostvars = {
        name: {"ansible_facts": {"default_ipv4": {"address": f"10.0.0.{n}"}}}
        for n, name in enumerate(["srv1", "srv2", "gw", "mon"], start=1)
    }
    for n, name in enumerate(["srv1", "srv2"], start=1):
        hostvars[name]["vllm_plan"] = plan_instances(MODELS, name, listen_address=f"10.0.0.{n}", gpus=None)
    hostvars["gw"]["gateway_listen_port"] = 8080
    return hostvars


def test_instances_are_scraped_through_the_first_gateway_with_their_names():
    hostvars = fleet()
    reached = gateway_servers(["srv1", "srv2"], hostvars, "gw")
    targets = scrape_targets(reached, hostvars, "mon", gateways=["gw"], via="gateway", node_exporter_port=9100)
    vllm = targets["vllm"]
    assert len(vllm) == 6
    assert {t["targets"][0] for t in vllm} == {"10.0.0.3:8080"}
    first = vllm[0]["labels"]
    assert first == {
        "instance": "chat-0@srv1",
        "host": "srv1",
        "model": "chat",
        "vllm_instance": "chat-0",
        "gateway": "gw",
        "__metrics_path__": "/metrics/chat-0@srv1",
    }
    # Every gateway exports its own counts; every host has a node exporter, each once.
    assert targets["gateway"] == [{"targets": ["10.0.0.3:3903"], "labels": {"instance": "gw", "host": "gw"}}]
    assert [t["labels"]["instance"] for t in targets["node"]] == ["srv1", "srv2", "gw"]
    assert targets["dcgm"] == []


def test_direct_scrapes_reach_each_instance_on_its_own_address_and_port():
    hostvars = fleet()
    reached = gateway_servers(["srv1", "srv2"], hostvars, "srv1")
    targets = scrape_targets(reached, hostvars, "srv1", gateways=[], via="direct")
    addresses = [t["targets"][0] for t in targets["vllm"]]
    assert addresses == ["10.0.0.1:8000", "10.0.0.1:8001", "10.0.0.1:8002", "10.0.0.2:8000", "10.0.0.2:8001", "10.0.0.2:8002"]
    assert all("__metrics_path__" not in t["labels"] for t in targets["vllm"])
    assert targets["node"] == [] and targets["gateway"] == []


def test_a_gateway_on_the_monitoring_host_is_scraped_on_loopback():
    hostvars = fleet()
    reached = gateway_servers(["srv1"], hostvars, "gw")
    targets = scrape_targets(reached, hostvars, "gw", gateways=["gw"], via="gateway", node_exporter_port=9100)
    assert {t["targets"][0] for t in targets["vllm"]} == {"127.0.0.1:8080"}
    assert targets["node"][1]["targets"] == ["127.0.0.1:9100"]


def test_with_two_prometheus_hosts_each_reaches_its_own_exporters_where_they_listen():
    """Exporters listen on loopback only when the one Prometheus is their own host; with two,
    the gateway that is also a monitoring host is scraped on its address, by itself too."""
    hostvars = fleet()
    reached = gateway_servers(["srv1"], hostvars, "gw")
    targets = scrape_targets(reached, hostvars, "gw", gateways=["gw"], monitoring_hosts=["gw", "mon"], node_exporter_port=9100)
    assert targets["gateway"][0]["targets"] == ["10.0.0.3:3903"]
    assert [t["targets"][0] for t in targets["node"]] == ["10.0.0.1:9100", "10.0.0.3:9100"]


def test_through_a_gateway_needs_one():
    with pytest.raises(Exception, match="no host is in vllm_gateway"):
        scrape_targets([], fleet(), "mon", gateways=[], via="gateway")


def test_dcgm_targets_only_on_cuda_hosts():
    hostvars = fleet()
    hostvars["srv2"]["vllm_device"] = "cpu"
    reached = gateway_servers(["srv1", "srv2"], hostvars, "gw")
    targets = scrape_targets(reached, hostvars, "mon", gateways=["gw"], dcgm_exporter_port=9400)
    assert [t["labels"]["host"] for t in targets["dcgm"]] == ["srv1"]


def test_exporters_listen_on_loopback_only_for_a_local_prometheus():
    hostvars = fleet()
    assert exporter_address("gw", ["gw"], hostvars) == "127.0.0.1"
    assert exporter_address("gw", ["mon"], hostvars) == "10.0.0.3"
    assert exporter_address("gw", ["gw", "mon"], hostvars) == "10.0.0.3"
    with pytest.raises(Exception, match="no default IPv4 address"):
        exporter_address("x", ["mon"], {"x": {}})


def test_the_instance_firewall_admits_only_monitoring_hosts_that_scrape_directly():
    hostvars = fleet()
    assert direct_sources(["mon"], hostvars, has_gateway=True) == []
    assert direct_sources(["mon"], hostvars, has_gateway=False) == ["10.0.0.4"]
    hostvars["mon"]["monitoring_scrape"] = "direct"
    assert direct_sources(["mon"], hostvars, has_gateway=True) == ["10.0.0.4"]


# The metric names vLLM 0.32 registers (vllm/v1/metrics/loggers.py; counters get _total, histograms
# _bucket), the gateway's (roles/gateway/files/vllm_gateway.mtail) and Prometheus's own `up`.
VLLM_METRICS = {
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:time_to_first_token_seconds_bucket",
    "vllm:inter_token_latency_seconds_bucket",
    "vllm:generation_tokens_total",
}


def gateway_metrics() -> set[str]:
    program = (REPO / "roles" / "gateway" / "files" / "vllm_gateway.mtail").read_text()
    names = set(re.findall(r"^counter (\w+)", program, re.M))
    names |= {f"{n}_bucket" for n in re.findall(r"^histogram (\w+)", program, re.M)}
    return names


def test_every_panel_asks_for_metrics_that_exist():
    known = VLLM_METRICS | gateway_metrics() | {"up"}
    for title, query in panel_queries(dashboard()):
        names = set(re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{", query))
        assert names and names <= known, f"{title}: {names - known}"


def test_the_dashboard_has_the_panels_operators_look_at():
    titles = [p["title"] for p in dashboard()["panels"]]
    for wanted in ("Requests running", "Requests waiting", "KV cache use", "Time to first token", "Inter-token latency",
                   "Generation tokens per second", "Gateway errors (5xx) per second", "Healthy instances per model"):  # fmt: skip
        assert wanted in titles
    ttft = next(p for p in dashboard()["panels"] if p["title"] == "Time to first token")
    assert [t["legendFormat"] for t in ttft["targets"]] == ["{{model_name}} p50", "{{model_name}} p90", "{{model_name}} p99"]
    assert "GPU utilisation" not in titles and "GPU utilisation" in [p["title"] for p in dashboard(gpu=True)["panels"]]


def test_panel_queries_fill_in_grafanas_variables():
    queries = dict(panel_queries(dashboard(), rate="2m", model="chat"))
    assert queries["Generation tokens per second"] == 'sum by (model_name) (rate(vllm:generation_tokens_total{model_name=~"chat"}[2m]))'
    assert all("$" not in q for q in queries.values())


def test_the_dashboard_is_valid_json_with_unique_panel_ids_and_places():
    board = json.loads(json.dumps(dashboard(gpu=True)))
    ids = [p["id"] for p in board["panels"]]
    places = [(p["gridPos"]["x"], p["gridPos"]["y"]) for p in board["panels"]]
    assert len(set(ids)) == len(ids) and len(set(places)) == len(places)
