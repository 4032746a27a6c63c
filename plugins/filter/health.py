"""The fleet's health report (playbooks/health.yml): every instance asked directly and every model
asked through every gateway with a real one-token completion, as rows, a table and a verdict."""

from __future__ import annotations

from typing import Any

COLUMNS = ("host", "instance", "model", "state", "latency_ms", "version")


def _status(result: dict[str, Any] | None) -> int:
    return int((result or {}).get("status") or -1)


def _ms(result: dict[str, Any] | None) -> int | None:
    elapsed = (result or {}).get("elapsed")
    return None if elapsed is None else round(float(elapsed) * 1000)


def _why(name: str, result: dict[str, Any] | None) -> str:
    status = _status(result)
    if status > 0:
        return f"{name} answered {status}"
    return f"{name}: {(result or {}).get('msg') or 'no answer'}".splitlines()[0][:200]


def _row(host: str, state: str, detail: str, instance: str = "-", model: str = "-") -> dict[str, Any]:
    return {"host": host, "instance": instance, "model": model, "state": state, "latency_ms": None, "version": "", "detail": detail}


def instance_rows(
    host: str, manifest: list[dict[str, Any]] | None, health: list[dict], completions: list[dict], versions: list[dict]
) -> list[dict]:
    """One row per instance of one serving host: `health`, `completions` and `versions` are the
    registered results of the uri loops over `manifest` (same order); no manifest: site.yml never
    ran there."""
    if manifest is None:
        return [_row(host, "down", "no /etc/vllm/instances.json (site.yml never ran here)")]
    rows = []
    for inst, h, c, v in zip(manifest, health, completions, versions, strict=True):
        if _status(h) == 200 and _status(c) == 200:
            state, detail = "ok", ""
        else:
            state = "down" if _status(h) < 0 else "unhealthy"
            detail = _why("/health", h) if _status(h) != 200 else _why("a completion", c)
        version = ((v or {}).get("json") or {}).get("version", "") if _status(v) == 200 else ""
        rows.append(
            {"host": host, "instance": inst["name"], "model": inst["model"], "state": state,
             "latency_ms": _ms(c) if state == "ok" else None, "version": version, "detail": detail}
        )  # fmt: skip
    return rows


def served_models(servers: list[str], hostvars: Any) -> list[str]:
    """Every model some serving host runs (from the manifests playbooks/health.yml read)."""
    return sorted({i["model"] for host in servers for i in hostvars[host].get("__health_manifest") or []})


def gateway_rows(host: str, models: list[str], completions: list[dict]) -> list[dict]:
    """One row per model asked through one gateway (`completions`: the uri loop over `models`)."""
    rows = []
    for model, c in zip(models, completions, strict=True):
        if _status(c) == 200:
            rows.append({**_row(host, "ok", "", "(gateway)", model), "latency_ms": _ms(c)})
        else:
            rows.append(_row(host, "down" if _status(c) < 0 else "unhealthy", _why("the gateway", c), "(gateway)", model))
    return rows


def health_report(hosts: list[str], hostvars: Any) -> dict[str, Any]:
    """Every host's rows (`__health_rows`, set by playbooks/health.yml), a row for a host that
    could not be asked at all, and the verdict: {"healthy", "rows", "table": [lines], "problems"}."""
    rows: list[dict[str, Any]] = []
    for host in dict.fromkeys(hosts):
        own = hostvars[host].get("__health_rows")
        rows += list(own) if own is not None else [_row(host, "unreachable", "Ansible could not reach the host")]
    cells = [[str(r.get(c) if r.get(c) is not None else "-") for c in COLUMNS] + [r.get("detail") or ""] for r in rows]
    header = [*COLUMNS, "detail"]
    widths = [max(len(x) for x in col) for col in zip(header, *cells, strict=True)]
    table = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in [header, *cells]]
    problems = [f"{r['host']} {r['instance']} {r['model']}: {r['state']} ({r['detail']})" for r in rows if r["state"] != "ok"]
    if not rows:
        problems = ["no serving host and no gateway in the inventory"]
    return {"healthy": not problems, "rows": rows, "table": table, "problems": problems}


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {
            "vllm_health_instance_rows": instance_rows,
            "vllm_health_models": served_models,
            "vllm_health_gateway_rows": gateway_rows,
            "vllm_health_report": health_report,
        }
