"""The health report: the requests playbooks/health.yml sends, its rows, table and verdict, and
the probe module's timing against a real local HTTP server."""

from __future__ import annotations

import http.server
import json
import sys
import threading
from pathlib import Path

import pytest
from health import gateway_requests, gateway_rows, health_report, instance_requests, instance_rows, served_models

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "playbooks" / "library"))
from vllm_probe import ask

MANIFEST = [{"name": "chat-0", "model": "chat", "health_url": "http://127.0.0.1:8000/health"},
            {"name": "small-0", "model": "small", "health_url": "http://127.0.0.1:8001/health"}]  # fmt: skip


def answer(id_, status=200, ms=12, version="", error=""):
    return {"id": id_, "status": status, "ms": ms if status > 0 else None, "version": version, "error": error}


def answers(name, health=200, completion=200, version="0.32.0", ms=12):
    return [answer(f"{name}/health", health), answer(f"{name}/version", 200, version=version), answer(f"{name}/completion", completion, ms)]


def test_each_instance_gets_health_version_and_a_real_completion_of_its_model():
    requests = instance_requests(MANIFEST[:1])
    assert [(r["id"], r["url"], r.get("auth", False)) for r in requests] == [
        ("chat-0/health", "http://127.0.0.1:8000/health", False),
        ("chat-0/version", "http://127.0.0.1:8000/version", False),
        ("chat-0/completion", "http://127.0.0.1:8000/v1/chat/completions", True),
    ]
    assert requests[2]["body"]["model"] == "chat" and requests[2]["body"]["max_tokens"] == 1
    (request,) = gateway_requests(["chat"], 8080)
    assert request["url"] == "http://127.0.0.1:8080/v1/chat/completions" and request["auth"] and request["body"]["model"] == "chat"


def test_an_instance_is_ok_only_when_health_and_the_completion_answer():
    rows = instance_rows("srv-1", MANIFEST, answers("chat-0", ms=123) + answers("small-0", completion=500))
    assert [(r["instance"], r["state"], r["latency_ms"], r["version"]) for r in rows] == [
        ("chat-0", "ok", 123, "0.32.0"),
        ("small-0", "unhealthy", None, "0.32.0"),
    ]
    assert rows[1]["detail"] == "a completion answered 500"


def test_an_instance_that_does_not_answer_is_down_with_the_reason():
    refused = [answer(f"chat-0/{w}", -1, error="[Errno 111] Connection refused") for w in ("health", "version", "completion")]
    (row,) = instance_rows("srv-1", MANIFEST[:1], refused)
    assert (row["state"], row["detail"], row["version"]) == ("down", "/health: [Errno 111] Connection refused", "")
    (row,) = instance_rows("srv-1", MANIFEST[:1], answers("chat-0", health=503))
    assert (row["state"], row["detail"]) == ("unhealthy", "/health answered 503")
    (row,) = instance_rows("srv-2", None, [])
    assert row["state"] == "down" and "site.yml never ran here" in row["detail"]


def test_a_host_that_serves_and_routes_keeps_both_kinds_of_rows_and_an_absent_host_is_reported():
    assert served_models(["a", "b"], {"a": {"__health_manifest": MANIFEST}, "b": {}}) == ["chat", "small"]
    both = {
        "__health_instance_rows": instance_rows("one", MANIFEST[:1], answers("chat-0", completion=500)),
        "__health_gateway_rows": gateway_rows("one", ["chat"], [answer("chat", 200, ms=40)]),
    }
    report = health_report(["one", "two", "one"], {"one": both, "two": {}})
    assert [(r["host"], r["instance"], r["state"]) for r in report["rows"]] == [
        ("one", "chat-0", "unhealthy"), ("one", "(gateway)", "ok"), ("two", "-", "unreachable")
    ]  # fmt: skip
    assert not report["healthy"] and len(report["problems"]) == 2
    assert report["table"][0].split() == ["host", "instance", "model", "state", "latency_ms", "version", "detail"]
    assert report["table"][2].split()[:5] == ["one", "(gateway)", "chat", "ok", "40"]
    healthy = {"__health_instance_rows": instance_rows("one", MANIFEST[:1], answers("chat-0"))}
    assert health_report(["one"], {"one": healthy})["healthy"]
    assert not health_report([], {})["healthy"]
    (nothing,) = gateway_rows("gw", [], [])
    assert nothing["state"] == "down" and "no model to ask" in nothing["detail"]


@pytest.fixture
def server():
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/version" else 404)
            self.end_headers()
            self.wfile.write(json.dumps({"version": "0.32.0"}).encode())

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            ok = self.headers.get("Authorization") == "Bearer k-1" and body["max_tokens"] == 1
            self.send_response(200 if ok else 401)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_the_probe_times_each_request_in_milliseconds_and_sends_the_key_only_when_asked(server):
    version = ask({"id": "v", "url": f"{server}/version"}, "k-1", 5)
    assert (version["status"], version["version"]) == (200, "0.32.0") and isinstance(version["ms"], int)
    body = {"model": "m", "max_tokens": 1}
    assert ask({"id": "c", "url": f"{server}/v1/chat/completions", "body": body, "auth": True}, "k-1", 5)["status"] == 200
    assert ask({"id": "c", "url": f"{server}/v1/chat/completions", "body": body}, "k-1", 5)["status"] == 401
    assert ask({"id": "h", "url": f"{server}/health"}, "", 5)["status"] == 404
    gone = ask({"id": "x", "url": "http://127.0.0.1:9/health"}, "", 5)
    assert gone["status"] == -1 and gone["ms"] is None and "refused" in gone["error"].lower()
