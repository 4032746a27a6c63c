"""A real Prometheus, configured from the fleet's plan, scrapes every target; its alert rules load
and fire where they should; every panel of the dashboard the controller wrote returns data after
real traffic through the gateway; the gateway counts what it answered, by model and status."""

from __future__ import annotations

import json
import math
import os
import shlex
import time
import urllib.parse
from pathlib import Path

import pytest
import testinfra.utils.ansible_runner
from conftest import GATEWAY_HOSTS, INVENTORY, REPO, SERVING_HOSTS, chat, default_address, playbook, said, sequential_codes

MONITORING_HOSTS = testinfra.utils.ansible_runner.AnsibleRunner(INVENTORY).get_hosts("monitoring")
testinfra_hosts = MONITORING_HOSTS
pytestmark = pytest.mark.skipif(not MONITORING_HOSTS, reason="the scenario has no monitoring host")
ALERTS = {"VllmInstanceDown", "VllmModelUnavailable", "VllmRequestsWaitingGrowing", "VllmKvCacheAlmostFull", "VllmGatewayErrors",
          "VllmExporterDown"}  # fmt: skip


@pytest.fixture(scope="module")
def prom(host):
    """GET the Prometheus HTTP API on the monitoring host."""
    port = host.ansible.get_variables().get("monitoring_port", 9090)

    def get(path: str, **params) -> dict:
        url = f"http://127.0.0.1:{port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        answer = json.loads(host.check_output(f"curl -sS --fail {shlex.quote(url)}"))
        assert answer["status"] == "success", answer
        return answer["data"]

    return get


def eventually(check, timeout: float = 90, every: float = 3):
    """The value of `check()` once it raises no AssertionError, within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(every)


def planned_instances(host) -> set[str]:
    hosts = {name: testinfra.get_host(f"ansible://{name}", ansible_inventory=INVENTORY) for name in SERVING_HOSTS}
    return {f"{i['name']}@{name}" for name, h in hosts.items() for i in json.loads(h.file("/etc/vllm/instances.json").content_string)}


def test_every_planned_target_is_scraped_and_up(host, prom):
    wanted = {("vllm", i) for i in planned_instances(host)}
    wanted |= {("gateway", g) for g in GATEWAY_HOSTS} | {("node", h) for h in dict.fromkeys(SERVING_HOSTS + GATEWAY_HOSTS)}

    def check():
        active = prom("targets")["activeTargets"]
        seen = {(t["labels"]["job"], t["labels"]["instance"]): t for t in active if t["labels"]["job"] != "prometheus"}
        assert set(seen) == wanted, f"scraped {sorted(seen)}, planned {sorted(wanted)}"
        down = {k: t["lastError"] for k, t in seen.items() if t["health"] != "up"}
        assert not down, f"not up: {down}"
        return seen

    seen = eventually(check)
    # Through the gateway, with the model each instance serves.
    for (job, ident), target in seen.items():
        if job == "vllm":
            assert target["labels"]["model"] and target["scrapeUrl"].endswith(f"/metrics/{ident}"), target
    up = prom("query", query='up{job="vllm"} == 1')["result"]
    assert len(up) == len(planned_instances(host))


def test_every_alert_rule_loads_and_evaluates(prom):
    def check():
        rules = [r for g in prom("rules")["groups"] for r in g["rules"]]
        assert {r["name"] for r in rules} == ALERTS
        bad = {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"}
        assert not bad, bad
        assert all(not r["lastEvaluation"].startswith("0001") for r in rules), "a rule was not evaluated yet"

    eventually(check)


def test_the_alert_rules_fire_on_the_series_they_are_written_for(host):
    """promtool's rule unit tests (tests/monitoring/vllm-alerts.test.yml) against the rules file
    the role deployed: each alert fires on its series, with its text, and not on healthy ones."""
    test = (REPO / "tests" / "monitoring" / "vllm-alerts.test.yml").read_text()
    host.run(f"cat > /tmp/vllm-alerts.test.yml <<'EOF'\n{test}\nEOF")
    result = host.run("promtool test rules /tmp/vllm-alerts.test.yml")
    assert result.rc == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


def test_every_dashboard_panel_returns_data_after_traffic(host, prom, load_report):
    """The dashboard the controller wrote in the inventory's reports/ folder: each of its queries, as Grafana
    would send it, returns at least one series with a number once clients have used the fleet."""
    board = json.loads((Path(INVENTORY).parent / "reports" / "vllm-dashboard.json").read_text())
    queries = [
        (panel["title"], target["expr"].replace("$__rate_interval", "1m").replace("$model", ".*"))
        for panel in board["panels"]
        for target in panel["targets"]
    ]
    assert len(queries) >= 9

    def check():
        empty = []
        for title, query in queries:
            result = prom("query", query=query)["result"]
            values = [float(r["value"][1]) for r in result]
            if not any(math.isfinite(v) for v in values):
                empty.append(f"{title}: {query} -> {values}")
        assert not empty, "\n".join(empty)

    eventually(check, timeout=60)
    print(f"{len(queries)} panel queries answered after {load_report['succeeded']} requests")


def test_the_gateway_counts_its_answers_by_model_and_status(host, api_key):
    """mtail's counters on the gateway move by exactly what the gateway answered."""
    gateway = testinfra.get_host(f"ansible://{GATEWAY_HOSTS[0]}", ansible_inventory=INVENTORY)
    port = gateway.ansible.get_variables().get("gateway_exporter_port", 3903)
    address = gateway.check_output("cat /etc/default/mtail | sed -n 's/^HOST=//p'")

    def counter(model: str, status: str) -> float:
        text = gateway.check_output(f"curl -sS --fail http://{address}:{port}/metrics")
        wanted = f'vllm_gateway_requests_total{{model="{model}",prog="vllm_gateway.mtail",status="{status}"}}'
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(wanted))

    before = counter("chat", "200"), counter("-", "404")
    codes = sequential_codes(gateway, 5, chat("chat", max_tokens=2), api_key)
    codes += sequential_codes(gateway, 3, chat("no-such-model", max_tokens=2), api_key)
    assert codes == ["200"] * 5 + ["404"] * 3

    def check():
        after = counter("chat", "200"), counter("-", "404")
        assert (after[0] - before[0], after[1] - before[1]) == (5, 3), (before, after)

    eventually(check, timeout=20, every=1)


def test_prometheus_and_the_exporters_listen_where_planned(host):
    """Prometheus on monitoring_listen_address; each node exporter on the address the monitoring
    hosts reach (loopback on a host whose only Prometheus is itself)."""
    own = host.ansible.get_variables()
    listen, port = own.get("monitoring_listen_address", "127.0.0.1"), own.get("monitoring_port", 9090)
    prometheus = [line.split()[3] for line in host.check_output("ss -ltnpH").splitlines() if '"prometheus"' in line]
    assert prometheus == [f"{'*' if listen == '0.0.0.0' else listen}:{port}"] or prometheus == [f"{listen}:{port}"], prometheus
    for name in dict.fromkeys(SERVING_HOSTS + GATEWAY_HOSTS):
        other = testinfra.get_host(f"ansible://{name}", ansible_inventory=INVENTORY)
        expected = "127.0.0.1" if MONITORING_HOSTS == [name] else default_address(other)
        # By port: ss cannot name the process of a unit that runs in its own user namespace.
        node = [line.split()[3] for line in other.check_output("ss -ltnH").splitlines() if line.split()[3].endswith(":9100")]
        assert node == [f"{expected}:9100"], (name, node)


@pytest.fixture(scope="module")
def load_report(host):
    """Traffic for the panels: the operator's load playbook (scripts/load from the controller
    through the gateway, every model in turn, streamed), whose reports land in the inventory's
    reports/ folder."""
    settings = {"load_concurrency": 2, "load_requests": 12, "load_prompt_tokens": 32, "load_max_tokens": 8}
    result = playbook("playbooks/load.yml", "-e", json.dumps(settings))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    out = Path(INVENTORY).parent / "reports" / "load"
    reports = {path.stem: json.loads(path.read_text()) for path in out.glob("*.json")}
    assert reports, f"no report in {out}"
    return {"succeeded": sum(r["succeeded"] for r in reports.values()), "reports": reports, "dir": out, "output": said(result)}


def test_the_load_command_reports_what_clients_saw(load_report, api_key):
    """Each model's report: every request counted by outcome, tokens as the server counted them,
    percentiles that hold together, a plot, and the table printed without the key."""
    gateway = GATEWAY_HOSTS[0]
    for name, report in load_report["reports"].items():
        model = name.removeprefix(f"{gateway}-")
        assert (report["requests"], report["succeeded"], report["failed"], report["outcomes"]) == (12, 12, 0, {"200": 12}), report
        assert report["output_tokens"] == 12 * 8, "ignore_eos: every answer is max_tokens long"
        assert report["prompt_tokens_mean"] > 8 and report["config"]["model"] == model
        for metric in ("latency_s", "ttft_s", "itl_s", "tpot_s"):
            row = report[metric]
            assert 0 < row["p50"] <= row["p90"] <= row["p99"], (metric, row)
        assert all(r["ttft"] <= r["latency"] for r in report["results"])
        plot = load_report["dir"] / f"{name}.png"
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10000
    assert "TTFT" in load_report["output"] and api_key not in load_report["output"]


def test_the_graph_page_shows_the_scraped_series(host, browser, load_report):
    """Prometheus's own graph page, in a real headless Chromium on the controller, draws the
    fleet's series (its screenshot is the README's). Saved to $VLLM_ANSIBLE_SCREENSHOTS when set,
    else in the inventory's reports/ folder."""
    own = host.ansible.get_variables()
    if own.get("monitoring_listen_address", "127.0.0.1").startswith("127."):
        pytest.skip("Prometheus listens on loopback only: the controller's browser cannot reach it")
    address = default_address(host)
    expr = "sum by (instance) (rate(vllm:generation_tokens_total[1m]))"
    query = urllib.parse.urlencode({"g0.expr": expr, "g0.tab": "0", "g0.range_input": "15m"})
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    base = f"http://{address}:{own.get('monitoring_port', 9090)}"
    page.goto(f"{base}/graph?{query}")
    if "classic" in (page.content().lower()) and page.locator("#graph_container, .graph").count() == 0:
        page.goto(f"{base}/classic/graph?{query}")  # Debian's package ships the classic UI only
    page.wait_for_timeout(4000)
    text = page.inner_text("body")
    out = Path(os.environ.get("VLLM_ANSIBLE_SCREENSHOTS") or Path(INVENTORY).parent / "reports")
    out.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(out / "prometheus-graph.png"), full_page=True)
    page.close()
    assert any(f"{i}" in text for i in planned_instances(host)), text[:2000]
