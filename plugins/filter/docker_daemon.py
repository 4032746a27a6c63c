"""Merge settings into Docker's daemon.json without overwriting what other tools wrote there.

NVIDIA's container toolkit adds `runtimes`, a site's own tooling adds registry mirrors or log
options: a role that writes the whole file loses them. `docker_daemon_json_merge` merges the
operator's keys into what the file holds (mappings recursively, anything else replaced, a None
value deletes the key) and returns the result; the role writes it only when it differs.
"""

from __future__ import annotations

import json
from typing import Any

try:
    from ansible.errors import AnsibleFilterError
except ImportError:  # pragma: no cover - the unit tests import this module without Ansible too

    class AnsibleFilterError(Exception):  # type: ignore[no-redef]
        pass


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_daemon_json(text: str, path: str = "/etc/docker/daemon.json") -> dict[str, Any]:
    """The file's settings; an absent or empty file is {}. A broken file is refused, not replaced."""
    if not text or not text.strip():
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise AnsibleFilterError(f"{path} is not valid JSON ({err}); fix or remove it, it will not be overwritten") from None
    if not isinstance(data, dict):
        raise AnsibleFilterError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def daemon_json_merge(text: str, settings: dict[str, Any], path: str = "/etc/docker/daemon.json") -> dict[str, Any]:
    if not isinstance(settings, dict):
        raise AnsibleFilterError("docker_engine_daemon_json must be a mapping of daemon.json keys")
    return _merge(parse_daemon_json(text, path), settings)


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"docker_daemon_json": parse_daemon_json, "docker_daemon_json_merge": daemon_json_merge}
