"""What Prometheus scrapes and what Grafana shows, computed from the whole fleet's plan.

Targets are file-based service discovery entries (one file per job) written on each monitoring
host: every planned instance (through a gateway's `/metrics/<instance>@<host>`, or directly),
every gateway's log exporter and every host's node exporter, each labelled with the host, the
instance and the model it serves, so that an alert or a panel can say which. The dashboard is
built here from one list of panels, so that the test that asks Prometheus every panel's query
reads the very queries Grafana runs. Metric names are those of the pinned vLLM release.
"""

from __future__ import annotations

from typing import Any

try:
    from ansible.errors import AnsibleFilterError
except ImportError:  # pragma: no cover - the unit tests import this module without Ansible too

    class AnsibleFilterError(Exception):  # type: ignore[no-redef]
        pass


def _address(name: str, hostvars: Any, seen_from: str) -> str:
    """How `seen_from` reaches host `name`: loopback for itself, else the host's default IPv4
    address (the one firewalls admit hosts by), else the address Ansible connects to."""
    if name == seen_from:
        return "127.0.0.1"
    hv = hostvars[name]
    facts = hv.get("ansible_facts") or {}
    return str((facts.get("default_ipv4") or {}).get("address") or hv.get("ansible_host") or name)


def _url_host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def scrape_targets(
    reached: list[dict[str, Any]],
    hostvars: Any,
    monitoring_host: str,
    *,
    gateways: list[str],
    via: str = "gateway",
    monitoring_hosts: list[str] | None = None,
    node_exporter_port: int = 0,
    dcgm_exporter_port: int = 0,
) -> dict[str, list[dict[str, Any]]]:
    """File-SD entries per job for one monitoring host: {"vllm": [...], "gateway": [...],
    "node": [...], "dcgm": [...]}; a port of 0 leaves that exporter out. Every gateway exports its
own request counts (gateway_exporter_port, the gateway role's). `reached` is
    vllm_gateway_servers seen from where the instances are scraped: the first gateway, or the
    monitoring host itself (`direct`). Exporters are reached where exporter_address has them
    listen (`monitoring_hosts`: the monitoring group).

    `via: gateway` scrapes each instance through the first gateway (in inventory order), which
    already reaches every instance through the firewall, so that only the gateway's allowlist
    must admit Prometheus; `direct` scrapes the instance's own port (its firewall must admit the
    monitoring host). The `instance` label is `<instance>@<host>` either way, so a series keeps its
    name if the path changes."""
    targets: dict[str, list[dict[str, Any]]] = {"vllm": [], "gateway": [], "node": [], "dcgm": []}
    if via == "gateway" and not gateways:
        raise AnsibleFilterError(f"host {monitoring_host}: monitoring_scrape: gateway, but no host is in vllm_gateway; accepted: direct")
    servers = [s["host"] for s in reached]
    front = gateways[0] if gateways else None
    for server in reached:
        for inst in server["plan"]:
            ident = f"{inst['name']}@{server['host']}"
            labels = {"instance": ident, "host": server["host"], "model": inst["model"], "vllm_instance": inst["name"]}
            if via == "gateway":
                port = int(hostvars[front].get("gateway_listen_port") or 80)
                address = f"{_url_host(_address(front, hostvars, monitoring_host))}:{port}"
                labels |= {"gateway": front, "__metrics_path__": f"/metrics/{ident}"}
            else:
                address = f"{_url_host(server['address'])}:{inst['port']}"
            targets["vllm"].append({"targets": [address], "labels": labels})
    monitors = monitoring_hosts if monitoring_hosts is not None else [monitoring_host]

    def exporter(name: str, port: int) -> str:
        return f"{_url_host(exporter_address(name, monitors, hostvars))}:{port}"

    for name in gateways:
        address = exporter(name, int(hostvars[name].get("gateway_exporter_port") or 3903))
        targets["gateway"].append({"targets": [address], "labels": {"instance": name, "host": name}})
    hosts = list(dict.fromkeys([*servers, *gateways]))
    for name in hosts if node_exporter_port else []:
        address = exporter(name, node_exporter_port)
        targets["node"].append({"targets": [address], "labels": {"instance": name, "host": name}})
    for name in servers if dcgm_exporter_port else []:
        if hostvars[name].get("vllm_device", "cuda") != "cuda":
            continue
        address = exporter(name, dcgm_exporter_port)
        targets["dcgm"].append({"targets": [address], "labels": {"instance": name, "host": name}})
    return targets


def exporter_address(host: str, monitoring_hosts: list[str], hostvars: Any) -> str:
    """Where a host's exporters listen: loopback when the only Prometheus is this host, else the
    host's default IPv4 address (the address scrape_targets gives Prometheus)."""
    if monitoring_hosts == [host]:
        return "127.0.0.1"
    facts = hostvars[host].get("ansible_facts") or {}
    address = (facts.get("default_ipv4") or {}).get("address")
    if not address:
        raise AnsibleFilterError(f"host {host}: has no default IPv4 address for its exporters; accepted: a host with a default route")
    return str(address)


def monitoring_sources(monitoring_hosts: list[str], hostvars: Any) -> list[str]:
    """The IPv4 addresses monitoring hosts scrape from (firewall and allowlist sources)."""
    out = []
    for name in monitoring_hosts:
        address = ((hostvars[name].get("ansible_facts") or {}).get("default_ipv4") or {}).get("address")
        if address:
            out.append(str(address))
    return out


def direct_sources(monitoring_hosts: list[str], hostvars: Any, has_gateway: bool) -> list[str]:
    """Addresses of the monitoring hosts that scrape instances directly (monitoring_scrape:
    direct, the default without a gateway): the instance firewall admits them."""
    direct = [m for m in monitoring_hosts if hostvars[m].get("monitoring_scrape", "gateway" if has_gateway else "direct") == "direct"]
    return monitoring_sources(direct, hostvars)


def _ports_of(host: str, hostvars: Any) -> dict[int, str]:
    """Ports this host's services already use, with what uses each (its plan and gateway)."""
    hv = hostvars[host]
    used: dict[int, str] = {}
    for inst in hv.get("vllm_plan") or []:
        if inst.get("port"):
            used[int(inst["port"])] = f"instance {inst['name']}"
        if inst.get("node"):
            first = inst["node"]["rendezvous_port"]
            used.update({p: f"the group ports of instance {inst['name']}" for p in range(first, inst["node"]["watch_port"] + 1)})
    if hv.get("gateway_plan") is not None:
        used[int(hv.get("gateway_listen_port") or 80)] = "gateway_listen_port"
        if hv.get("gateway_tls_port"):
            used[int(hv["gateway_tls_port"])] = "gateway_tls_port"
        used[int(hv.get("gateway_exporter_port") or 3903)] = "gateway_exporter_port"
    return used


def preflight_errors(host: str, hostvars: Any, settings: dict[str, Any], groups: dict[str, list[str]]) -> list[str]:
    """What the monitoring settings would break, for one host, before any change: exporter and
    Prometheus ports already used on the host, a scrape path that cannot reach the instances,
    and a Grafana that cannot reach Prometheus. `settings` are the monitoring role's values on
    this host (defaults included)."""
    errors: list[str] = []
    monitors = groups.get("monitoring") or []
    gateways = groups.get("vllm_gateway") or []
    servers = groups.get("vllm_servers") or []
    used = _ports_of(host, hostvars)
    wanted: list[tuple[str, int]] = []
    if host in servers or host in gateways:
        if settings.get("monitoring_node_exporter"):
            wanted.append(("monitoring_node_exporter_port", settings["monitoring_node_exporter_port"]))
        if settings.get("monitoring_dcgm_exporter") and host in servers and hostvars[host].get("vllm_device", "cuda") == "cuda":
            wanted.append(("monitoring_dcgm_exporter_port", settings["monitoring_dcgm_exporter_port"]))
    if host in monitors:
        wanted.append(("monitoring_port", settings["monitoring_port"]))
    if host in gateways:
        own = {int(hostvars[host].get("gateway_listen_port") or 80): "gateway_listen_port"}
        if hostvars[host].get("gateway_tls_port"):
            own[int(hostvars[host]["gateway_tls_port"])] = "gateway_tls_port"
        port = int(hostvars[host].get("gateway_exporter_port") or 3903)
        if port in own:
            errors.append(f"host {host}: gateway_exporter_port: {port} is also {own[port]}; accepted: another port")
    dcgm_here = settings.get("monitoring_dcgm_exporter") and host in servers and hostvars[host].get("vllm_device", "cuda") == "cuda"
    if dcgm_here and not hostvars[host].get("hosts_docker_engine", hostvars[host].get("vllm_runtime") == "docker"):
        errors.append(
            f"host {host}: monitoring_dcgm_exporter: true, but the DCGM exporter runs in a container and this host gets no Docker "
            "engine; accepted: hosts_docker_engine: true (with the NVIDIA container toolkit), or monitoring_dcgm_exporter: false"
        )
    for field, port in wanted:
        if port in used:
            errors.append(f"host {host}: {field}: {port} is already used by {used[port]} on this host; accepted: a free port")
        used.setdefault(port, field)
    if host in monitors:
        via = settings.get("monitoring_scrape")
        if via == "gateway" and not gateways:
            errors.append(f"host {host}: monitoring_scrape: gateway, but the inventory has no vllm_gateway host; accepted: direct")
        elif via == "direct":
            for name in servers:
                plan = [i for i in hostvars[name].get("vllm_plan") or [] if i.get("port")]
                listen = str(plan[0]["listen_address"]) if plan else ""
                if name != host and (listen.startswith("127.") or listen == "::1"):
                    errors.append(
                        f"host {host}: monitoring_scrape: direct, but the instances of {name} listen on {listen}, which only {name} "
                        "reaches; accepted: gateway (with a gateway host), or Prometheus on that host"
                    )
    for name in groups.get("grafana") or []:
        if host == name and monitors and monitors[0] != host:
            listen = str(hostvars[monitors[0]].get("monitoring_listen_address", "127.0.0.1"))
            if listen.startswith("127.") or listen == "::1":
                errors.append(
                    f"host {host}: monitoring_listen_address: Prometheus on {monitors[0]} listens on {listen}, which Grafana on {host} "
                    f"cannot reach; accepted: an address of {monitors[0]} that {host} reaches (set it for the monitoring group)"
                )
    return errors


# --- the dashboard -------------------------------------------------------------------------------

# Grafana's variables in the queries; the tests substitute them before asking Prometheus.
RATE = "$__rate_interval"
MODEL = 'model_name=~"$model"'


def _quantiles(metric: str) -> list[tuple[str, str]]:
    rate = f"sum by (le, model_name) (rate({metric}_bucket{{{MODEL}}}[{RATE}]))"
    return [(f"{{{{model_name}}}} p{int(q * 100)}", f"histogram_quantile({q}, {rate})") for q in (0.5, 0.9, 0.99)]


# (title, unit, [(legend, query)], description). vLLM 0.32's metric names; each query returns a
# series per model (or instance) whenever the fleet is scraped, also while nothing fails.
PANELS: list[tuple[str, str, list[tuple[str, str]], str]] = [
    (
        "Healthy instances per model",
        "short",
        [("{{model}}", 'sum by (model) (up{job="vllm", model=~"$model"})')],
        "Instances whose /metrics answers (through the gateway or directly).",
    ),
    (
        "Requests running",
        "short",
        [("{{model_name}}", f"sum by (model_name) (vllm:num_requests_running{{{MODEL}}})")],
        "Requests in the engines' running batches.",
    ),
    (
        "Requests waiting",
        "short",
        [("{{model_name}}", f"sum by (model_name) (vllm:num_requests_waiting{{{MODEL}}})")],
        "Requests queued in the engines; growing means more load than the instances take.",
    ),
    (
        "KV cache use",
        "percentunit",
        [("{{model_name}} {{instance}}", f"max by (model_name, instance) (vllm:kv_cache_usage_perc{{{MODEL}}})")],
        "Share of each instance's KV cache in use; near 1 requests get preempted.",
    ),
    ("Time to first token", "s", _quantiles("vllm:time_to_first_token_seconds"), "Per model, from the engines' histograms."),
    ("Inter-token latency", "s", _quantiles("vllm:inter_token_latency_seconds"), "Time between output tokens, per model."),
    (
        "Generation tokens per second",
        "short",
        [("{{model_name}}", f"sum by (model_name) (rate(vllm:generation_tokens_total{{{MODEL}}}[{RATE}]))")],
        "Output tokens generated, all instances of the model together.",
    ),
    (
        "Gateway requests per second by status",
        "reqps",
        [("{{status}}", f'sum by (status) (rate(vllm_gateway_requests_total{{model=~"$model"}}[{RATE}]))')],
        "What the gateways answered (the gateways' access logs).",
    ),
    (
        "Gateway errors (5xx) per second",
        "reqps",
        [
            (
                "{{model}}",
                f'sum by (model) (rate(vllm_gateway_requests_total{{status=~"5..", model=~"$model"}}[{RATE}]))'
                f' or sum by (model) (rate(vllm_gateway_requests_total{{model=~"$model"}}[{RATE}])) * 0',
            )
        ],
        "Answers the gateways gave with 503/504 (no instance reachable, a timeout) or instances gave with 5xx; 0 when none.",
    ),
]
GPU_PANELS: list[tuple[str, str, list[tuple[str, str]], str]] = [
    ("GPU utilisation", "percent", [("{{host}} GPU {{gpu}}", "avg by (host, gpu) (DCGM_FI_DEV_GPU_UTIL)")], "From DCGM."),
    ("GPU memory used", "decmbytes", [("{{host}} GPU {{gpu}}", "max by (host, gpu) (DCGM_FI_DEV_FB_USED)")], "From DCGM."),
]
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def dashboard(gpu: bool = False, uid: str = "vllm-fleet") -> dict[str, Any]:
    """The Grafana dashboard of the fleet (schema 39): a `datasource` and a `model` variable,
    two panels a row."""
    panels = []
    for n, (title, unit, queries, description) in enumerate(PANELS + (GPU_PANELS if gpu else [])):
        panels.append(
            {
                "id": n + 1,
                "type": "timeseries",
                "title": title,
                "description": description,
                "datasource": DATASOURCE,
                "gridPos": {"h": 8, "w": 12, "x": 12 * (n % 2), "y": 8 * (n // 2)},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
                "targets": [
                    {"refId": chr(65 + i), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend}
                    for i, (legend, expr) in enumerate(queries)
                ],
            }
        )
    return {
        "uid": uid,
        "title": "vLLM fleet",
        "tags": ["vllm"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-3h", "to": "now"},
        "templating": {
            "list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"},
                {
                    "name": "model",
                    "type": "query",
                    "label": "Model",
                    "datasource": DATASOURCE,
                    "query": {"query": 'label_values(up{job="vllm"}, model)', "refId": "model"},
                    "definition": 'label_values(up{job="vllm"}, model)',
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".*",
                    "refresh": 2,
                    "current": {"text": "All", "value": "$__all"},
                },
            ]
        },
        "panels": panels,
    }


def panel_queries(board: dict[str, Any], rate: str = "1m", model: str = ".*") -> list[tuple[str, str]]:
    """Every (panel title, query) of a dashboard with Grafana's variables filled in, as Prometheus
    would be asked them."""
    out = []
    for panel in board["panels"]:
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", rate).replace("$model", model)
            out.append((panel["title"], expr))
    return out


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {
            "monitoring_scrape_targets": scrape_targets,
            "monitoring_exporter_address": exporter_address,
            "monitoring_sources": monitoring_sources,
            "monitoring_direct_sources": direct_sources,
            "monitoring_preflight_errors": preflight_errors,
            "monitoring_dashboard": dashboard,
        }
