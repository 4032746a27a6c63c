"""Browser clients (gateway_cors_origins): a page from an allowed origin calls the gateway with
fetch in a real headless Chromium and reads a streamed answer; a page from any other origin is
blocked by the browser, because the gateway answers its CORS preflight with a refusal. The
gateway never sends back an origin it was not configured with."""

from __future__ import annotations

import http.server
import json
import re
import threading
import urllib.parse

import pytest
from conftest import GATEWAY_HOSTS, SERVING_HOSTS, chat, default_address, host_named, successes

testinfra_hosts = GATEWAY_HOSTS
PAGE = """<!doctype html><meta charset="utf-8"><title>vLLM from a browser</title><pre id="out"></pre>
<script>
(async () => {
  const q = new URLSearchParams(location.search);
  const out = document.getElementById('out');
  try {
    const answer = await fetch(q.get('url') + '/chat/completions', {
      method: 'POST',
      headers: {'Authorization': 'Bearer ' + q.get('key'), 'Content-Type': 'application/json'},
      body: JSON.stringify({model: q.get('model'), messages: [{role: 'user', content: 'Hello from a page'}], max_tokens: 24,
                            stream: true, ignore_eos: true}),
    });
    const reader = answer.body.getReader();
    const decoder = new TextDecoder();
    let text = '', reads = 0;
    for (;;) {
      const {done, value} = await reader.read();
      if (done) break;
      reads++;
      text += decoder.decode(value, {stream: true});
    }
    out.dataset.status = String(answer.status);
    out.dataset.reads = String(reads);
    out.textContent = text;
  } catch (e) {
    out.dataset.status = 'blocked';
    out.textContent = String(e);
  }
  out.dataset.done = '1';
})();
</script>
"""


def origins(host) -> list[str]:
    return host.ansible.get_variables().get("gateway_cors_origins") or []


pytestmark = pytest.mark.skipif(
    not any(host_named(g).ansible.get_variables().get("gateway_cors_origins") for g in GATEWAY_HOSTS),
    reason="no gateway of the scenario has gateway_cors_origins",
)


class Page(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = PAGE.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def serve_page(port: int) -> http.server.ThreadingHTTPServer:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def sites(host):
    """The allowed origin's page server (the first of gateway_cors_origins, on this machine's
    loopback), and one on the next port, whose origin is not allowed."""
    allowed = origins(host)[0]
    port = urllib.parse.urlsplit(allowed).port
    servers = [serve_page(port), serve_page(port + 1)]
    yield {"allowed": allowed, "other": f"http://127.0.0.1:{port + 1}"}
    for server in servers:
        server.shutdown()


def gateway_url(host) -> str:
    address = default_address(host)
    port = host.ansible.get_variables().get("gateway_listen_port", 80)
    return f"http://{address}{'' if port == 80 else f':{port}'}/v1"


def served(model: str) -> float:
    return sum(successes(host_named(h), i) for h in SERVING_HOSTS for i in json.loads(
        host_named(h).file("/etc/vllm/instances.json").content_string) if i["model"] == model)  # fmt: skip


def run_page(browser, origin: str, url: str, key: str, model: str) -> dict:
    page = browser.new_page()
    console: list[str] = []
    page.on("console", lambda message: console.append(message.text))
    query = urllib.parse.urlencode({"url": url, "key": key, "model": model})
    page.goto(f"{origin}/?{query}")
    page.wait_for_selector('#out[data-done="1"]', state="attached", timeout=120000)
    found = page.eval_on_selector("#out", "e => ({status: e.dataset.status, reads: e.dataset.reads, text: e.textContent})")
    page.close()
    return {**found, "console": console}


def model_of(host) -> str:
    plan = json.loads(host_named(SERVING_HOSTS[0]).file("/etc/vllm/instances.json").content_string)
    return plan[0]["model"]


def test_a_page_from_an_allowed_origin_streams_an_answer(host, browser, sites, api_key):
    model = model_of(host)
    before = served(model)
    found = run_page(browser, sites["allowed"], gateway_url(host), api_key, model)
    assert found["status"] == "200", found
    events = [json.loads(line[5:]) for line in found["text"].splitlines() if line.startswith("data: {")]
    words = "".join(c["delta"].get("content") or "" for e in events for c in e.get("choices", []))
    assert found["text"].rstrip().endswith("data: [DONE]") and len(events) >= 2 and words, found
    assert served(model) == before + 1, "the instance did not serve the page's request"


def test_a_page_from_another_origin_is_blocked_and_reaches_no_instance(host, browser, sites, api_key):
    model = model_of(host)
    before = served(model)
    found = run_page(browser, sites["other"], gateway_url(host), api_key, model)
    assert found["status"] == "blocked", found
    assert any("CORS" in line or "Access-Control-Allow-Origin" in line for line in found["console"]), found["console"]
    assert served(model) == before, "the blocked page's request reached an instance"


def headers_of(host, method: str, path: str, headers: dict[str, str], body: dict | None = None) -> tuple[int, dict[str, str]]:
    cmd = f"curl -sS -o /dev/null -D - -X {method} --max-time 60"
    for name, value in headers.items():
        cmd += f" -H {json.dumps(f'{name}: {value}')}"
    if body is not None:
        cmd += f" -H 'Content-Type: application/json' --data-binary '{json.dumps(body)}'"
    out = host.check_output(f"{cmd} http://127.0.0.1{path}")
    lines = out.replace("\r", "").splitlines()
    status = int(lines[0].split()[1])
    return status, {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)}


def test_the_preflight_of_an_allowed_origin_is_answered_without_the_key(host, sites):
    status, headers = headers_of(host, "OPTIONS", "/v1/chat/completions", {
        "Origin": sites["allowed"], "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"})  # fmt: skip
    assert status == 204, headers
    assert headers["access-control-allow-origin"] == sites["allowed"]
    assert headers["access-control-allow-methods"] == "GET, HEAD, POST"
    assert headers["access-control-allow-headers"] == "authorization, content-type, x-stainless-os"
    assert headers["vary"] == "Origin"


@pytest.mark.parametrize(
    "origin",
    ["OTHER", "ALLOWED.evil.example", "http://evil.example/ALLOWED", "ALLOWED:1", "ALLOWED/", "null", "HTTP://127.0.0.1:PORT",
     "http://localhost:PORT", "ALLOWED%00", "*"],
)  # fmt: skip
def test_a_preflight_from_any_other_origin_is_refused_and_nothing_is_reflected(host, sites, origin):
    port = str(urllib.parse.urlsplit(sites["allowed"]).port)
    origin = origin.replace("OTHER", sites["other"]).replace("ALLOWED", sites["allowed"]).replace("PORT", port)
    status, headers = headers_of(host, "OPTIONS", "/v1/chat/completions", {"Origin": origin, "Access-Control-Request-Method": "POST"})
    assert status == 403, (origin, status, headers)
    assert "access-control-allow-origin" not in headers and "access-control-allow-methods" not in headers, headers


@pytest.mark.parametrize(("method", "path", "asked"), [("OPTIONS", "/v1/chat/completions", "DELETE"), ("OPTIONS", "/v1/models", "POST")])
def test_a_preflight_for_a_method_the_route_refuses_is_refused(host, sites, method, path, asked):
    status, headers = headers_of(host, method, path, {"Origin": sites["allowed"], "Access-Control-Request-Method": asked})
    assert status == 405 and "access-control-allow-methods" not in headers, headers


def test_odd_requested_headers_are_not_echoed(host, sites):
    status, headers = headers_of(host, "OPTIONS", "/v1/chat/completions", {
        "Origin": sites["allowed"], "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "x-a; evil=1"})  # fmt: skip
    assert status == 204 and "access-control-allow-headers" not in headers, headers


def test_answers_carry_the_allowed_origin_only_errors_and_streams_included(host, sites, api_key):
    model = model_of(host)
    auth = {"Authorization": f"Bearer {api_key}"}
    for origin, expected in ((sites["allowed"], sites["allowed"]), (sites["other"], None)):
        cases = [
            ("POST", "/v1/chat/completions", {**auth, "Origin": origin}, chat(model, max_tokens=2)),
            ("POST", "/v1/chat/completions", {**auth, "Origin": origin}, chat(model, max_tokens=4, stream=True)),
            ("POST", "/v1/chat/completions", {"Origin": origin}, chat(model, max_tokens=2)),  # 401 from vLLM
            ("POST", "/v1/chat/completions", {**auth, "Origin": origin}, chat("no-such-model")),  # 404 from the router
            ("GET", "/v1/models", {**auth, "Origin": origin}, None),
        ]
        for method, path, headers, body in cases:
            status, got = headers_of(host, method, path, headers, body)
            assert got.get("access-control-allow-origin") == expected, (origin, method, path, status, got)
            assert status in (200, 401, 404), (status, got)
            assert re.fullmatch(r"Origin", got.get("vary", "")), got
