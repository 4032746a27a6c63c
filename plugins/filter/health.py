"""The fleet's health report (playbooks/health.yml): every instance asked directly and every model
asked through every gateway with a real one-token completion, as rows, a table and a verdict.
The requests themselves are sent and timed on each host by playbooks/library/vllm_probe.py."""

from __future__ import annotations

from typing import Any

COLUMNS = ("host", "instance", "model", "state", "latency_ms", "version")
PING = {"messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}


def row(host: str, state: str, detail: str = "", instance: str = "-", model: str = "-", **extra: Any) -> dict[str, Any]:
    fields = {"host": host, "instance": instance, "model": model, "state": state, "latency_ms": None, "version": ""}
    return {**fields, "detail": detail, **extra}


def instance_requests(manifest: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """/health, /version and a one-token completion of its model, for every deployed instance."""
    requests = []
    # A headless follower of a group answers nothing itself: its leader's rows are the group's.
    for inst in (i for i in manifest if i.get("health_url")):
        base, name = inst["health_url"].removesuffix("/health"), inst["name"]
        requests += [
            {"id": f"{name}/health", "url": inst["health_url"]},
            {"id": f"{name}/version", "url": f"{base}/version"},
            {"id": f"{name}/completion", "url": f"{base}/v1/chat/completions", "auth": True, "body": {**PING, "model": inst["model"]}},
        ]
    return requests


def gateway_requests(models: list[str], port: int) -> list[dict[str, Any]]:
    """A one-token completion of every model through the gateway on this host."""
    url = f"http://127.0.0.1:{int(port)}/v1/chat/completions"
    return [{"id": m, "url": url, "body": {**PING, "model": m}, "auth": True} for m in models]


def _why(what: str, answer: dict[str, Any]) -> str:
    return f"{what} answered {answer['status']}" if answer["status"] > 0 else f"{what}: {answer.get('error') or 'no answer'}"


def _state(answer: dict[str, Any]) -> str:
    return "ok" if answer["status"] == 200 else ("down" if answer["status"] < 0 else "unhealthy")


def instance_rows(host: str, manifest: list[dict[str, Any]] | None, answers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per instance of one serving host from vllm_probe's answers; no manifest: site.yml
    never ran there."""
    if manifest is None:
        return [row(host, "down", "no /etc/vllm/instances.json (site.yml never ran here)")]
    by_id = {a["id"]: a for a in answers}
    rows = []
    for inst in manifest:
        if not inst.get("health_url"):
            node = inst.get("node") or {}
            rows.append(row(host, "ok", f"headless node {node.get('node_rank')} of group {node.get('group')}: asked through its leader "
                            f"{node.get('leader')}", inst["name"], inst["model"]))  # fmt: skip
            continue
        health, version, completion = (by_id[f"{inst['name']}/{what}"] for what in ("health", "version", "completion"))
        state = _state(health) if health["status"] != 200 else _state(completion)
        detail = "" if state == "ok" else (_why("/health", health) if health["status"] != 200 else _why("a completion", completion))
        rows.append(
            row(host, state, detail, inst["name"], inst["model"],
                latency_ms=completion["ms"] if state == "ok" else None, version=version["version"] if version["status"] == 200 else "")
        )  # fmt: skip
    return rows


def gateway_rows(host: str, models: list[str], answers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per model asked through one gateway (none deployed anywhere: one row saying so)."""
    if not models:
        return [row(host, "down", "no model to ask: no serving host reports a deployed instance", "(gateway)")]
    by_id = {a["id"]: a for a in answers}
    rows = []
    for model in models:
        answer = by_id[model]
        state = _state(answer)
        detail = "" if state == "ok" else _why("the gateway", answer)
        rows.append(row(host, state, detail, "(gateway)", model, latency_ms=answer["ms"] if state == "ok" else None))
    return rows


def served_models(servers: list[str], hostvars: Any) -> list[str]:
    """Every model some serving host runs (from the manifests playbooks/health.yml read)."""
    return sorted({i["model"] for host in servers for i in hostvars[host].get("__health_manifest") or []})


def health_report(hosts: list[str], hostvars: Any) -> dict[str, Any]:
    """Every host's rows (a host may serve and be a gateway: both kinds), a row for a host that
    was not asked at all, and the verdict: {"healthy", "rows", "table": [lines], "problems"}."""
    rows: list[dict[str, Any]] = []
    for host in dict.fromkeys(hosts):
        own = [r for kind in ("__health_instance_rows", "__health_gateway_rows") for r in hostvars[host].get(kind) or []]
        rows += own or [row(host, "unreachable", "Ansible could not reach the host")]
    cells = [[str(r.get(c) if r.get(c) is not None else "-") for c in COLUMNS] + [r.get("detail") or ""] for r in rows]
    header = [*COLUMNS, "detail"]
    widths = [max(len(x) for x in col) for col in zip(header, *cells, strict=True)]
    table = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in [header, *cells]]
    problems = [f"{r['host']} {r['instance']} {r['model']}: {r['state']} ({r['detail']})" for r in rows if r["state"] != "ok"]
    if not rows:
        problems = ["no serving host and no gateway to ask"]
    return {"healthy": not problems, "rows": rows, "table": table, "problems": problems}


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {
            "vllm_health_instance_requests": instance_requests,
            "vllm_health_gateway_requests": gateway_requests,
            "vllm_health_instance_rows": instance_rows,
            "vllm_health_models": served_models,
            "vllm_health_gateway_rows": gateway_rows,
            "vllm_health_report": health_report,
        }
