#!/usr/bin/python
"""Timed HTTP requests from a host to vLLM instances or a gateway, for playbooks/health.yml
(`uri` reports whole seconds only). Read-only: runs under --check too."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: vllm_probe
short_description: Timed HTTP requests to vLLM instances and gateways
description: Sends each request (GET, or POST with a JSON body) and reports its status, its time in
  milliseconds, the C(version) field of a JSON answer, and the error when there is no answer.
options:
  requests:
    description: Each a mapping with C(id), C(url), optional C(body) (sent as JSON with POST) and
      C(auth) (send the API key as a bearer token).
    type: list
    elements: dict
    required: true
  api_key:
    description: The bearer token for requests with C(auth).
    type: str
    default: ""
  timeout:
    description: Seconds each request may take.
    type: int
    default: 60
"""


def ask(request: dict, api_key: str, timeout: int) -> dict:
    body = request.get("body")
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data is not None else {}
    if request.get("auth"):
        headers["Authorization"] = f"Bearer {api_key}"
    answer = {"id": request["id"], "status": -1, "ms": None, "version": "", "error": ""}
    start = time.monotonic()
    try:
        with urllib.request.urlopen(urllib.request.Request(request["url"], data=data, headers=headers), timeout=timeout) as response:
            text = response.read()
            answer["status"] = response.status
    except urllib.error.HTTPError as err:
        text = err.read()
        answer["status"] = err.code
    except (OSError, ValueError) as err:
        answer["error"] = str(getattr(err, "reason", None) or err)[:200]
        return answer
    answer["ms"] = round((time.monotonic() - start) * 1000)
    try:
        parsed = json.loads(text)
        answer["version"] = str(parsed.get("version", "")) if isinstance(parsed, dict) else ""
    except ValueError:
        pass
    return answer


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "requests": {"type": "list", "elements": "dict", "required": True},
            "api_key": {"type": "str", "default": "", "no_log": True},
            "timeout": {"type": "int", "default": 60},
        },
        supports_check_mode=True,
    )
    answers = [ask(r, module.params["api_key"], module.params["timeout"]) for r in module.params["requests"]]
    module.exit_json(changed=False, answers=answers)


if __name__ == "__main__":
    main()
