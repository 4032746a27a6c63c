"""The client hand-off that site.yml prints and writes on the controller (README, "Client
hand-off"): every gateway's base URL and every model, no key; its curl snippet, run as written
from the controller with the key in the environment, gets the model's answer."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

from conftest import GATEWAY_HOSTS, INVENTORY, SERVING_HOSTS, host_named

testinfra_hosts = GATEWAY_HOSTS[:1]
SHEET = Path(INVENTORY).parent / "clients.md"


def planned_models() -> list[str]:
    plans = [json.loads(host_named(name).file("/etc/vllm/instances.json").content_string) for name in SERVING_HOSTS]
    return sorted({i["model"] for plan in plans for i in plan})


def sections(text: str) -> dict[str, str]:
    """The sheet's part for each gateway, by host name."""
    return dict(re.findall(r"^## Gateway (\S+)\n(.*?)(?=^## Gateway |\Z)", text, flags=re.M | re.S))


def test_the_sheet_names_every_gateway_and_model_and_no_key(host):
    text = SHEET.read_text()
    key = host.ansible.get_variables()["vllm_api_key"]
    assert key not in text, "the hand-off sheet holds the key"
    assert "`vllm_api_key`" in text, "the sheet does not say where the key is"
    assert f"Models: {', '.join(planned_models())}\n" in text
    assert sorted(sections(text)) == sorted(GATEWAY_HOSTS)


def test_each_gateways_curl_snippet_answers_from_the_controller(host):
    """The controller reaches the test hosts, so no tunnel is offered and the snippet runs as is."""
    key = host.ansible.get_variables()["vllm_api_key"]
    parts = sections(SHEET.read_text())
    assert parts, "the sheet has no gateway"
    for name, part in parts.items():
        assert "ssh -N -L" not in part, f"{name}: a tunnel offered for a gateway the controller reaches"
        snippet = re.search(r"^    (curl .*?)\n\n", part, flags=re.M | re.S).group(1)
        result = subprocess.run(["bash", "-c", snippet], capture_output=True, text=True, timeout=120,
                                env={**os.environ, "VLLM_API_KEY": key})  # fmt: skip
        assert result.returncode == 0, f"{name}: {result.stderr}"
        answer = json.loads(result.stdout)
        assert answer["choices"][0]["message"]["content"] is not None and answer["usage"]["completion_tokens"] > 0, answer
