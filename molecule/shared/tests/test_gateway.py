"""Through the gateway only: routing, union of models, edge refusals, spread, failover."""

from __future__ import annotations

import json
import time

import pytest
from conftest import GATEWAY_HOSTS, SERVING_HOSTS, chat, host_named, sequential_codes

testinfra_hosts = GATEWAY_HOSTS

UNGUARDED = [
    "/tokenize",
    "/detokenize",
    "/invocations",
    "/pooling",
    "/pause",
    "/resume",
    "/scale_elastic_ep",
    "/metrics",
    "/version",
    "/ping",
    "/load",
    "/classify",
    "/score",
    "/rerank",
    "/is_sleeping",
]


@pytest.fixture(scope="module")
def gw(host):
    key = host.ansible.get_variables()["vllm_api_key"]

    def call(path: str, body: dict | None = None, *, auth: bool = True, method: str = "") -> tuple[int, str]:
        cmd = "curl -sS --max-time 120 -o /dev/stderr -w '%{http_code}'"
        if method:
            cmd += f" -X {method}"
        if body is not None:
            cmd += f" -H 'Content-Type: application/json' --data-binary '{json.dumps(body)}'"
        if auth:
            cmd += f" -H 'Authorization: Bearer {key}'"
        result = host.run(f"{cmd} http://127.0.0.1{path}")
        assert result.rc == 0, result.stderr
        return int(result.stdout), result.stderr

    call.key = key
    return call


@pytest.fixture(scope="module")
def plans(host):
    by_host = {}
    for name in SERVING_HOSTS:
        by_host[name] = json.loads(host_named(name).file("/etc/vllm/instances.json").content_string)
    return by_host


def instances_of_model(plans, model):
    return [(h, i["name"]) for h, insts in plans.items() for i in insts if i["model"] == model]


def successes(host, server: str, instance: str) -> float:
    """vllm:request_success_total of one instance, read through the gateway's allowlisted /metrics."""
    text = host.check_output(f"curl -sS --fail http://127.0.0.1/metrics/{instance}@{server}")
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("vllm:request_success_total{"))


def test_routes_by_model_field(gw, plans):
    for model in {i["model"] for insts in plans.values() for i in insts}:
        status, body = gw("/v1/chat/completions", chat(model))
        assert status == 200, body
        assert json.loads(body)["model"] == model


def test_models_is_the_union(gw, plans):
    status, body = gw("/v1/models")
    assert status == 200, body
    assert sorted(m["id"] for m in json.loads(body)["data"]) == sorted({i["model"] for insts in plans.values() for i in insts})


def test_unknown_model_is_404_openai_style(gw):
    status, body = gw("/v1/chat/completions", chat("no-such-model"))
    assert status == 404
    assert json.loads(body)["error"]["type"] == "NotFoundError"


def test_key_is_still_required(gw, plans):
    model = next(iter(plans.values()))[0]["model"]
    assert gw("/v1/chat/completions", chat(model), auth=False)[0] == 401
    assert gw("/v1/models", auth=False)[0] == 401


@pytest.mark.parametrize("path", UNGUARDED)
def test_unguarded_endpoints_are_refused_at_the_edge(gw, path):
    for method in ("GET", "POST"):
        status, _ = gw(path, auth=False, method=method)
        assert status == 404, f"{method} {path} reached a backend ({status})"


def test_tls_with_a_generated_certificate(host):
    port = host.ansible.get_variables().get("gateway_tls_port", 0)
    if not port:
        pytest.skip("TLS is off in this scenario")
    out = host.check_output(f"curl -sk -o /dev/null -w '%{{http_code}} %{{ssl_verify_result}}' https://127.0.0.1:{port}/health")
    assert out.split()[0] == "200"
    subject = host.check_output(f"echo | openssl s_client -connect 127.0.0.1:{port} 2>/dev/null | openssl x509 -noout -subject")
    assert host.ansible.get_variables()["inventory_hostname"] in subject


def test_rate_limit_per_key(host, gw):
    rate = host.ansible.get_variables().get("gateway_rate_limit", 0)
    if not rate:
        pytest.skip("no rate limit in this scenario")
    burst = 4 * rate
    codes = host.check_output(
        f"seq {burst} | xargs -P 32 -I{{}} curl -s -o /dev/null -w '%{{http_code}}\\n' "
        f"-H 'Authorization: Bearer {gw.key}' http://127.0.0.1/v1/models"
    ).split()
    print(f"{burst} requests at once: {codes.count('200')} served, {codes.count('429')} limited")
    assert codes.count("429") > 0 and codes.count("200") > 0 and set(codes) <= {"200", "429"}


def test_metrics_only_for_the_allowlist(host, plans):
    server, instance = next((h, i["name"]) for h, insts in plans.items() for i in insts)
    assert successes(host, server, instance) >= 0  # allowlisted loopback: served
    other = host_named(server)
    gateway_ip = host.interface.default().addresses[0]
    status = other.check_output(f"curl -s -o /dev/null -w '%{{http_code}}' http://{gateway_ip}/metrics/{instance}@{server}")
    assert status == "403"


def test_instance_ports_admit_the_gateway_only(host, plans):
    if len(plans) < 2:
        pytest.skip("needs two serving hosts")
    first, second = list(plans)[:2]
    inst = plans[first][0]
    url = f"http://{inst['listen_address']}:{inst['port']}/health"
    assert host.check_output(f"curl -s -o /dev/null -w '%{{http_code}}' --max-time 5 {url}") == "200"
    refused = host_named(second).run(f"curl -s -o /dev/null -w '%{{http_code}}' --max-time 5 {url}")
    assert refused.stdout.strip() == "000" and refused.rc != 0, f"{second} reached {first}'s instance directly"


def test_each_instance_serves_a_fair_share(host, gw, plans):
    model = max({i["model"] for insts in plans.values() for i in insts}, key=lambda m: len(instances_of_model(plans, m)))
    targets = instances_of_model(plans, model)
    assert len(targets) >= 2, "the scenario needs a model with several instances"
    before = {t: successes(host, *t) for t in targets}
    codes = sequential_codes(host, 60, chat(model, max_tokens=4), gw.key)
    assert codes.count("200") == 60, codes
    shares = {f"{h}/{i}": successes(host, h, i) - before[(h, i)] for h, i in targets}
    print(f"requests per instance of {model}: {shares}")
    assert all(n >= 0.2 * 60 for n in shares.values()), shares


STREAM_READER = """
import http.client, json, sys, time
conn = http.client.HTTPConnection("127.0.0.1", 80, timeout=120)
headers = {"Content-Type": "application/json", "Authorization": "Bearer " + sys.argv[2]}
conn.request("POST", "/v1/chat/completions", body=sys.argv[1], headers=headers)
response = conn.getresponse()
reads, data = [], b""
while True:
    chunk = response.read1(65536)
    if not chunk:
        break
    reads.append(time.monotonic())
    data += chunk
done = data.strip().endswith(b"data: [DONE]")
print(json.dumps({"status": response.status, "reads": len(reads), "spread": reads[-1] - reads[0], "done": done}))
"""


def test_stream_is_not_buffered(host, gw, plans):
    model = next(iter(plans.values()))[0]["model"]
    # Long enough to arrive in many pieces even when the tiny model generates it in milliseconds.
    body = json.dumps(chat(model, stream=True, max_tokens=200, ignore_eos=True))
    out = json.loads(host.check_output(f"python3 -c '{STREAM_READER}' '{body}' '{gw.key}'"))
    print(f"stream through the gateway: {out}")
    assert out["status"] == 200 and out["done"]
    assert out["reads"] >= 3, f"the stream arrived in {out['reads']} piece(s): buffered"


def _wait_active(server, unit, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.run(f"systemctl is-active {unit}").stdout.strip() == "active":
            return
        time.sleep(3)
    raise AssertionError(f"{unit} did not come back")


def test_fallback_serves_when_every_primary_is_down(host, gw, plans):
    primaries = [(h, i["name"], i["model"]) for h, insts in plans.items() for i in insts if i.get("fallback")]
    if not primaries:
        pytest.skip("no model with a fallback in this scenario")
    model = primaries[0][2]
    try:
        for h, name, _ in primaries:
            host_named(h).check_output(f"systemctl stop vllm@{name}")
        results = [gw("/v1/chat/completions", chat(model))[0] for _ in range(5)]
        assert results == [200] * 5, results
    finally:
        for h, name, _ in primaries:
            host_named(h).run(f"systemctl start vllm@{name}")


def test_no_request_lost_when_an_instance_is_killed(host, gw, plans):
    model = max({i["model"] for insts in plans.values() for i in insts}, key=lambda m: len(instances_of_model(plans, m)))
    h, name = instances_of_model(plans, model)[0]
    server = host_named(h)
    _wait_active(server, f"vllm@{name}")
    server.check_output(f"kill -9 $(systemctl show -p MainPID --value vllm@{name})")
    codes = sequential_codes(host, 50, chat(model, max_tokens=4), gw.key)
    lost = 50 - codes.count("200")
    print(f"kill -9 of {h}/{name}: {lost} of 50 requests lost")
    assert lost == 0, codes
    _wait_active(server, f"vllm@{name}")  # systemd brings it back (Restart=on-failure)
