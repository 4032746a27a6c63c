"""scripts/load's arithmetic and parsing: percentiles as numpy computes them, outcomes counted by
status, token-level figures from the server's own counts. The tool against a real gateway and a
real vLLM is checked in molecule (test_monitoring.py: the load playbook, every model)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import sys
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[2] / "scripts" / "load"
_loader = importlib.machinery.SourceFileLoader("vllm_load", str(PATH))
_spec = importlib.util.spec_from_loader("vllm_load", _loader)
load = importlib.util.module_from_spec(_spec)
sys.modules["vllm_load"] = load  # its dataclass looks itself up there
_loader.exec_module(load)
FIXTURES = Path(__file__).parent / "fixtures"


def test_percentiles_interpolate_between_ranks_like_numpy():
    values = [float(v) for v in range(1, 11)]
    assert load.percentile(values, 50) == pytest.approx(5.5)
    assert load.percentile(values, 90) == pytest.approx(9.1)
    assert load.percentile(values, 99) == pytest.approx(9.91)
    assert load.percentile([3.0], 99) == 3.0 and load.percentile([], 50) is None


def result(start, status=200, error="", latency=1.0, ttft=0.2, out=10, gaps=(0.1,)):
    return load.Result(start, status, error, latency, ttft, prompt_tokens=30, output_tokens=out, gaps=list(gaps))


def test_every_request_is_counted_by_its_outcome_and_failures_are_not_timed():
    results = [
        result(0.0),
        result(0.1, latency=3.0, ttft=1.0),
        result(0.2, status=503, error="HTTP 503: ...", latency=0.01, ttft=None, out=0, gaps=()),
        result(0.3, status=0, error="ConnectionRefusedError: [Errno 111]", latency=0.001, ttft=None, out=0, gaps=()),
        result(0.4, status=200, error="IncompleteStream: the stream ended before data: [DONE]", out=3),
    ]
    report = load.summary(results, wall=2.0)
    assert report["outcomes"] == {"200": 2, "503": 1, "ConnectionRefusedError": 1, "IncompleteStream": 1}
    assert (report["requests"], report["succeeded"], report["failed"]) == (5, 2, 3)
    assert report["latency_s"]["p50"] == pytest.approx(2.0) and report["ttft_s"]["p99"] == pytest.approx(0.992)
    assert report["output_tokens"] == 20 and report["output_tokens_per_s"] == pytest.approx(10.0)
    # Time per output token: after the first token, per token.
    assert report["tpot_s"]["mean"] == pytest.approx(((1.0 - 0.2) / 9 + (3.0 - 1.0) / 9) / 2)


def test_the_table_gives_milliseconds_and_every_outcome():
    config = {"url": "http://gw/v1", "model": "chat", "concurrency": 2, "duration": 0, "requests": 2, "prompt_tokens": 8, "max_tokens": 4}
    report = {"config": {**config, "stream": True}, **load.summary([result(0.0), result(0.5, status=429, error="HTTP 429")], 1.0)}
    text = load.table(report)
    assert "[200] 1  [429] 1" in text and "failed 1" in text
    ttft = next(line for line in text.splitlines() if line.startswith("TTFT"))
    assert ttft.split()[1:4] == ["200.0", "200.0", "200.0"]


def test_a_real_vllm_stream_is_parsed_to_its_content_and_usage():
    """A stream vLLM 0.32 sent through the gateway (fixtures/vllm-stream.txt): content events,
    then the usage event that stream_options.include_usage asks for, then [DONE]."""
    lines = (FIXTURES / "vllm-stream.txt").read_bytes().splitlines(keepends=True)
    events = load.parse_sse(lines)
    assert sum(load.has_content(e) for e in events) >= 2
    assert events[-1]["usage"]["completion_tokens"] == 8 and events[-1]["choices"] == []


def test_the_request_asks_for_usage_in_streams_and_exact_lengths():
    args = load.parse_args(["--url", "http://gw/v1", "--model", "chat", "--max-tokens", "8", "--prompt-tokens", "20"])
    body = json.loads(load.request_body(args, 7))
    assert body["stream"] and body["stream_options"] == {"include_usage": True} and body["ignore_eos"] and body["max_tokens"] == 8
    assert body["messages"][0]["content"].startswith("Request 7: ") and len(body["messages"][0]["content"].split()) == 19
    assert json.loads(load.request_body(load.parse_args(["--url", "u", "--model", "m", "--no-stream"]), 0)).get("stream") is None


@pytest.mark.parametrize(
    "argv", [["--concurrency", "0"], ["--requests", "0"], ["--max-tokens", "0"], ["--requests", "5", "--duration", "3"]]
)
def test_bad_arguments_are_refused(argv):
    with pytest.raises(SystemExit) as exc:
        load.parse_args(["--url", "http://gw/v1", "--model", "chat", *argv])
    assert exc.value.code == 2


def test_the_key_comes_from_the_environment_only(monkeypatch, capsys):
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    assert load.main(["--url", "http://127.0.0.1:9/v1", "--model", "chat"]) == 2
    assert "VLLM_API_KEY" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        load.parse_args(["--url", "u", "--model", "m", "--key", "x"])
