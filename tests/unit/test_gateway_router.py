"""The gateway's njs router (roles/gateway/files/vllm_gateway.js) run by the njs engine that
nginx loads (Debian's `njs` CLI, the same release as libnginx-mod-http-js): it must find the
top-level "model" of every body vLLM accepts, however deep or large, and nothing else."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROUTER = Path(__file__).resolve().parents[2] / "roles" / "gateway" / "files" / "vllm_gateway.js"
NJS = shutil.which("njs")
pytestmark = pytest.mark.skipif(NJS is None and not Path("/usr/bin/njs").exists(), reason="scripts/test installs njs")

DRIVER = """
import gw from 'vllm_gateway.js';
var cases = %s;
var out = cases.map(function (c) {
    var t0 = Date.now();
    var found = gw.modelField(Buffer.from(c));
    return {found: found, ms: Date.now() - t0};
});
console.log(JSON.stringify(out));
"""


def model_fields(tmp_path: Path, bodies: list[str]) -> list[dict]:
    shutil.copy(ROUTER, tmp_path / "vllm_gateway.js")
    (tmp_path / "vllm_routes.js").write_text(
        'export default {models: {"chat": {"upstream": "vllm_chat", "fallback": null, "instances": []}}};\n'
    )
    (tmp_path / "driver.js").write_text(DRIVER % json.dumps(bodies))
    result = subprocess.run(
        [NJS or "/usr/bin/njs", "-p", str(tmp_path), str(tmp_path / "driver.js")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def nested(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"x": schema}}
    return schema


def test_the_model_is_found_however_the_body_is_written(tmp_path):
    deep = {"model": "chat", "tools": [{"type": "function", "function": {"name": "f", "parameters": nested(64)}}]}
    bodies = [
        '{"model":"chat"}',
        ' \n{ "messages" : [ {"content": "a \\"quoted\\" } ] { brace"} ] , "model" : "chat" }\n',
        json.dumps({"tools": deep["tools"], "model": "chat"}),
        '{"x":' + '{"a":[' * 2000 + "1" + "]}" * 2000 + ',"model":"chat"}',
        '{"content":"ends with a backslash \\\\","model":"chat"}',
        '{"model":"c\\u0068at"}',
        '{"note":"é ü 漢字 🙂","model":"chat"}',
        '{"model":"chat","model":"other"}',
    ]
    assert [r["found"] for r in model_fields(tmp_path, bodies)] == [{"found": True, "value": "chat"}] * 7 + [
        {"found": True, "value": "chat"}
    ], "the scan stops at the first model key"


def test_bodies_without_a_usable_model_are_told_apart(tmp_path):
    bodies = ["{}", '{"messages":[]}', '{"model":1}', '{"model":null}', "[1]", '"chat"', '{"model":"chat"', '{"a":"unterminated', "{,}", ""]
    got = [r["found"] for r in model_fields(tmp_path, bodies)]
    invalid = {"invalid": "The request body is not a valid JSON object."}
    assert got == [{"found": False}, {"found": False}, {"found": True, "value": 1}, {"found": True, "value": None}] + [invalid] * 2 + [
        {"found": True, "value": "chat"},
        invalid,
        invalid,
        invalid,
    ]


def test_inherited_names_are_not_models(tmp_path):
    assert ROUTER.read_text().count("hasOwnProperty.call(MODELS") == 1
    found = model_fields(tmp_path, ['{"model":"constructor"}', '{"model":"__proto__"}'])
    assert [r["found"]["value"] for r in found] == ["constructor", "__proto__"]


def test_a_large_body_is_scanned_in_well_under_a_second(tmp_path):
    blob = '{"messages":[{"role":"user","content":"' + "x" * 15_000_000 + '"}],"model":"chat"}'
    dense = '{"pad":[' + ",".join(['{"a":"b"}'] * 1_400_000) + '],"model":"chat"}'
    results = model_fields(tmp_path, [blob, dense])
    print(f"15 MB string: {results[0]['ms']} ms, 14 MB of small objects: {results[1]['ms']} ms")
    assert [r["found"]["value"] for r in results] == ["chat", "chat"]
    assert results[0]["ms"] < 1000
