"""Every bad inventory of tests/preflight_cases.yml is refused at plugin level, with its words.

The same table runs through the real playbooks/preflight.yml against a converged host in
molecule (molecule/shared/tests/test_preflight.py); here each case goes through the plugins the
preflight tasks call, in the order they call them, so a refusal's wording is pinned in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from monitoring import preflight_errors as monitoring_errors
from preflight import cross_errors, pem_errors, report, settings_errors
from vllm import gateway_report, host_errors, model_sources, plan_report

REPO = Path(__file__).resolve().parents[2]
ROLES = str(REPO / "roles")
CASES = yaml.safe_load((REPO / "tests" / "preflight_cases.yml").read_text())
BASE_SERVER: dict[str, Any] = {
    "vllm_device": "cpu",
    "vllm_api_key": "a-good-key-0123456789",
    "vllm_models": [{"name": "tiny", "source": "controller:<MODEL>", "max_model_len": 512}],
}


def substitute(value: Any, model: str) -> Any:
    """The case's variables with <MODEL> replaced by a model directory on this machine."""
    return json.loads(json.dumps(value).replace("<MODEL>", model))


def server_refusals(case: dict[str, Any], host: str, model: str, gateways: list[str]) -> tuple[list[str], list[dict] | None]:
    hv = substitute({**BASE_SERVER, **case["servers"]}, model)
    for name in case.get("unset", []):
        hv.pop(name)
    errors = settings_errors(hv, host, ROLES, ["vllm"])
    if errors:
        return errors, None
    listen = hv.get("vllm_listen_address", "10.0.0.9" if gateways else "127.0.0.1")
    runtime = hv.get("vllm_runtime", "venv")
    settings = {"vllm_listen_address": listen, "vllm_runtime": runtime, "vllm_models": hv["vllm_models"], "min_tp_shm_mib": 1024}
    settings |= {"vllm_device": hv.get("vllm_device", "cuda"), "vllm_image": hv.get("vllm_image", "vllm/vllm-openai:v0.32.0")}
    settings |= {"vllm_image_archive": hv.get("vllm_image_archive", ""), "vllm_container_shm": hv.get("vllm_container_shm", "host")}
    errors = cross_errors({**settings, "hosts_docker_engine": hv.get("hosts_docker_engine", runtime == "docker")}, host, gateways)
    planned = plan_report(
        hv["vllm_models"],
        host,
        listen_address=listen,
        port_base=hv.get("vllm_port_base", 8000),
        gpus=None,
        reserved_ports=hv.get("vllm_reserved_ports", []),
        nccl_env=hv.get("vllm_nccl_env", {}),
        env=hv.get("vllm_env", {}),
        version=hv.get("vllm_version", "0.32.0"),
        device=hv.get("vllm_device", "cuda"),
    )
    if planned["error"]:
        return [*errors, planned["error"]], None
    absent = [{"item": s, "stat": {"exists": False}} for s in model_sources(planned["plan"]) if s["kind"] == "host"]
    errors += host_errors(
        planned["plan"], host, host_paths=absent, configs=[], shm_mib=None, min_shm_mib=1024, wheelhouse=hv.get("vllm_wheelhouse", "")
    )
    return errors, planned["plan"]


def gateway_refusals(case: dict[str, Any], host: str, model: str, servers: dict[str, Any]) -> list[str]:
    gv = substitute(case["gateway"], model)
    errors = settings_errors(gv, host, ROLES, [])
    if errors:
        return errors
    tls, cert, key = gv.get("gateway_tls_port", 0), gv.get("gateway_tls_certificate", ""), gv.get("gateway_tls_certificate_key", "")
    errors = cross_errors(
        {
            "gateway_listen_port": gv.get("gateway_listen_port", 80),
            "gateway_tls_port": tls,
            "gateway_tls_certificate": cert,
            "gateway_tls_certificate_key": key,
        },
        host,
        [],
    )
    if tls and cert:
        read = lambda path: Path(path).read_text() if Path(path).is_file() else None  # noqa: E731
        errors += pem_errors(host, "gateway_tls_certificate", read(cert), "certificate")
        errors += pem_errors(host, "gateway_tls_certificate_key", read(key), "key")
    if servers:
        errors += gateway_report(list(servers), servers, host, gv.get("gateway_balancing", "least_conn"))["errors"]
    return errors


MONITORING_DEFAULTS = yaml.safe_load((REPO / "roles" / "monitoring" / "defaults" / "main.yml").read_text())


def monitoring_refusals(case: dict[str, Any], hostvars: dict[str, Any], names: dict[str, str]) -> list[str]:
    """Settings of the monitoring host, then the monitoring role's preflight on every host of the
    case (the fleet's plans in `hostvars`), as playbooks/preflight.yml runs them."""
    own = {k: v for k, v in case["monitoring"].items() if k != "with"}
    mon = names["monitoring"]
    errors = settings_errors(own, mon, ROLES, [])
    if errors:
        return errors
    groups = {kind: [names[kind]] for kind in ("servers", "gateway", "monitoring", "grafana") if kind in case}
    groups = {"vllm_servers": groups.get("servers", []), "vllm_gateway": groups.get("gateway", []),
              "monitoring": groups["monitoring"], "grafana": groups.get("grafana", [])}  # fmt: skip
    hostvars.setdefault(mon, {}).update(own)
    for name in {n for members in groups.values() for n in members}:
        hostvars.setdefault(name, {})["ansible_facts"] = {"default_ipv4": {"address": "10.0.0.9"}}
    defaults = {**MONITORING_DEFAULTS, "monitoring_scrape": "gateway" if groups["vllm_gateway"] else "direct"}
    for name in sorted(hostvars):
        settings = {**defaults, **{k: v for k, v in hostvars[name].items() if k.startswith("monitoring_")}}
        errors += monitoring_errors(name, hostvars, settings, groups)
    return errors


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny")
    (path / "config.json").write_text(json.dumps({"num_attention_heads": 4, "num_key_value_heads": 2}))
    return str(path)


def test_the_table_has_at_least_forty_cases_with_unique_ids():
    ids = [c["id"] for c in CASES]
    assert len(ids) >= 40 and len(set(ids)) == len(ids)


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_each_bad_inventory_is_refused_with_its_words(case, model):
    errors: list[str] = []
    servers: dict[str, Any] = {}
    names = {"servers": "srv", "gateway": "gw", "monitoring": "mon", "grafana": "graf"}
    if case.get("monitoring", {}).get("with"):
        names["monitoring"] = names[case["monitoring"]["with"]]
    gateways = ["gw"] if case.get("remote_gateway") or "gateway" in case else []
    if "servers" in case:
        found, plan = server_refusals(case, "srv", model, gateways)
        errors += found
        if plan is not None and not found:
            servers["srv"] = {"vllm_plan": plan, "vllm_device": "cpu", **case["servers"]}
    if "gateway" in case:
        found = gateway_refusals(case, "gw", model, servers)
        errors += found
        if not found:
            servers["gw"] = {"gateway_plan": [], **case["gateway"]}
    if "monitoring" in case and not errors:
        errors += monitoring_refusals(case, servers, names)
    text = report(errors)
    assert errors, f"{case['id']}: nothing refused"
    for words in case["expect"]:
        assert words in text, f"{case['id']}: {words!r} not in:\n{text}"
    assert all(e.startswith(tuple(f"host {n}: " for n in names.values())) for e in errors), text
    if "vllm_api_key" in json.dumps(case):
        assert "s3cret" not in text or "extra_args" in text


def test_a_good_inventory_passes(model):
    errors, plan = server_refusals({"servers": {}}, "srv", model, [])
    assert errors == [] and [i["name"] for i in plan] == ["tiny-0"]


def test_every_problem_of_a_host_is_reported_at_once():
    hv = {"vllm_port_base": "8000", "vllm_firewall": "no", "vllm_modles": [], "vllm_api_key": "x"}
    errors = settings_errors(hv, "h1", ROLES, ["vllm"])
    assert len(errors) == 4, errors
    assert report(errors).startswith("4 problem(s) in the inventory; nothing was changed on any host:")


def test_secrets_are_never_shown():
    errors = settings_errors({"vllm_api_key": "short-secret", "vllm_hf_token": 42}, "h1", ROLES, ["vllm"])
    assert not any("short-secret" in e or "42" in e for e in errors), errors
    assert any("vllm_hf_token: (hidden) is a number" in e for e in errors), errors
