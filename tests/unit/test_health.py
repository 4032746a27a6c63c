"""The health report's rows, table and verdict from what playbooks/health.yml registers."""

from __future__ import annotations

from health import gateway_rows, health_report, instance_rows, served_models

MANIFEST = [{"name": "chat-0", "model": "chat"}, {"name": "small-0", "model": "small"}]


def ok(elapsed=0.25, **json):
    return {"status": 200, "elapsed": elapsed, "json": json}


def refused():
    """uri's result when nothing listens (failed_when: false keeps it quiet)."""
    return {"status": -1, "msg": "Status code was -1 and not [200]: Request failed: <urlopen error [Errno 111] Connection refused>"}


def test_an_instance_is_ok_only_when_health_and_a_real_completion_answer():
    rows = instance_rows("srv-1", MANIFEST, [ok(), ok()], [ok(0.1234), {"status": 500, "elapsed": 1}], [ok(version="0.32.0"), ok()])
    assert [(r["instance"], r["state"], r["latency_ms"], r["version"]) for r in rows] == [
        ("chat-0", "ok", 123, "0.32.0"),
        ("small-0", "unhealthy", None, ""),
    ]
    assert rows[1]["detail"] == "a completion answered 500"


def test_an_instance_that_does_not_answer_is_down_with_the_reason():
    (row,) = instance_rows("srv-1", MANIFEST[:1], [refused()], [refused()], [refused()])
    assert row["state"] == "down" and row["detail"].startswith("/health: Status code was -1") and row["version"] == ""
    (row,) = instance_rows("srv-1", MANIFEST[:1], [{"status": 503, "elapsed": 0.01}], [ok()], [ok()])
    assert (row["state"], row["detail"]) == ("unhealthy", "/health answered 503")


def test_a_host_without_a_manifest_is_down():
    (row,) = instance_rows("srv-2", None, [], [], [])
    assert row["state"] == "down" and "site.yml never ran here" in row["detail"]


def test_gateway_rows_and_served_models():
    assert served_models(["a", "b"], {"a": {"__health_manifest": MANIFEST}, "b": {}}) == ["chat", "small"]
    rows = gateway_rows("gw-1", ["chat", "small"], [ok(0.5), {"status": 503, "elapsed": 0.01}])
    assert [(r["instance"], r["model"], r["state"], r["latency_ms"]) for r in rows] == [
        ("(gateway)", "chat", "ok", 500),
        ("(gateway)", "small", "unhealthy", None),
    ]


def test_the_report_adds_an_unreachable_host_and_fails_on_any_bad_row():
    good = instance_rows("srv-1", MANIFEST[:1], [ok()], [ok()], [ok(version="0.32.0")])
    hostvars = {"srv-1": {"__health_rows": good}, "srv-2": {}, "gw-1": {"__health_rows": gateway_rows("gw-1", ["chat"], [ok()])}}
    report = health_report(["srv-1", "srv-2", "gw-1", "srv-1"], hostvars)
    assert [r["host"] for r in report["rows"]] == ["srv-1", "srv-2", "gw-1"]
    assert not report["healthy"] and report["problems"] == ["srv-2 - -: unreachable (Ansible could not reach the host)"]
    assert report["table"][0].split() == ["host", "instance", "model", "state", "latency_ms", "version", "detail"]
    assert report["table"][1].split()[:6] == ["srv-1", "chat-0", "chat", "ok", "250", "0.32.0"]
    del hostvars["srv-2"]
    assert health_report(["srv-1", "gw-1"], hostvars)["healthy"]
    assert not health_report([], {})["healthy"]
