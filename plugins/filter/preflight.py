"""Preflight: the operator's settings checked the way the programs that consume them read them.

Ansible's own argument_specs check accepts a quoted "8000" for an int and "false" for a bool
without converting them, so a role then renders the string: systemd, nginx or vLLM refuse it
after hosts have changed, or a string "false" is true. Here every setting a host carries is
checked strictly against its role's meta/argument_specs.yml (the one list of names, types and
choices), then against the ranges and formats of the program that reads it (RULES). A quoted
number or boolean is refused, never silently converted. Every message names the host, the
field, the value as written and what is accepted, and all of a host's problems are reported at
once. Values marked no_log in a spec are never shown.
"""

from __future__ import annotations

import difflib
import functools
import ipaddress
import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import yaml

try:
    from ansible.errors import AnsibleFilterError
except ImportError:  # pragma: no cover - unit tests run without Ansible too

    class AnsibleFilterError(Exception):  # type: ignore[no-redef]
        pass


# Roles whose variables preflight checks, by prefix.
ROLES = ("vllm", "gateway", "monitoring", "nvidia_driver", "docker_engine", "nvidia_container_toolkit")
# Facts the roles set themselves; not operator input.
ROLE_FACTS = {
    "vllm_plan",
    "vllm_preflight_errors",
    "gateway_plan",
    "gateway_preflight_errors",
    "monitoring_preflight_errors",
    "nvidia_driver_pci_gpus",
    "nvidia_driver_gpus",
}
# playbooks/hosts.yml's switches, in argument_specs form (it is a play, not a role).
HOSTS_SPEC: dict[str, Any] = {
    "hosts_nvidia_driver": {"type": "bool"},
    "hosts_docker_engine": {"type": "bool"},
    "hosts_nvidia_container_toolkit": {"type": "bool"},
    "hosts_serial": {"type": "raw"},
}
# playbooks/handoff.yml's setting (a play on the controller).
HANDOFF_SPEC: dict[str, Any] = {"handoff_file": {"type": "path"}}
TYPE_WORDS = {
    "int": "a whole number",
    "float": "a number",
    "bool": "true or false",
    "str": "a string",
    "path": "a path",
    "list": "a list",
    "dict": "a mapping",
}
ELEMENT_WORDS = {"int": "whole numbers", "float": "numbers", "str": "strings", "dict": "mappings"}
QUOTED_BOOLS = {"true", "false", "yes", "no", "on", "off", "y", "n", "1", "0"}


def shown(value: Any, secret: bool = False) -> str:
    """A value as the operator wrote it, for a message: JSON, shortened; secrets never."""
    if secret:
        return f"(hidden, {len(value)} characters)" if isinstance(value, str) else "(hidden)"
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


# --- formats and ranges of the consuming programs ---------------------------------------------

Rule = Callable[[Any], "str | None"]


def whole(low: int | None = None, high: int | None = None, why: str = "") -> tuple[Rule, str]:
    if high is None:
        accepted = f"a whole number >= {low}"
    else:
        accepted = f"a whole number from {low} to {high}"

    def rule(value: Any) -> str | None:
        if (low is not None and value < low) or (high is not None and value > high):
            return "is out of range"
        return None

    return rule, accepted + (f" ({why})" if why else "")


def fraction() -> tuple[Rule, str]:
    return (lambda v: None if 0 < v <= 1 else "is out of range"), "a number greater than 0 and at most 1"


_DOMAIN = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
# A size as Docker reads it (--shm-size): a number, an optional unit, an optional i and b.
_DOCKER_SIZE = r"([0-9]+(?:\.[0-9]+)?) ?([kKmMgGtTpP])?[iI]?[bB]?"
MIN_CONTAINER_SHM_MIB = 64


def docker_size_mib(value: str) -> float:
    """MiB in a size Docker accepts (units are powers of 1024, as Docker reads --shm-size)."""
    number, unit = re.fullmatch(_DOCKER_SIZE, value).groups()
    return float(number) * 1024 ** "bkmgtp".index((unit or "b").lower()) / 1024**2


def regex(pattern: str, accepted: str) -> tuple[Rule, str]:
    compiled = re.compile(pattern)
    return (lambda v: None if compiled.fullmatch(v) else "has the wrong form"), accepted


def node_address() -> tuple[Rule, str]:
    def rule(value: str) -> str | None:
        if value == "":
            return None
        try:
            address = ipaddress.ip_address(value)
        except ValueError:
            return "is not an IPv4 address"
        if address.version != 4:
            return "is not an IPv4 address"
        if address.is_loopback or address.is_unspecified or address.is_multicast or address.is_reserved:
            return "is an address the other hosts of a group cannot reach this host on (loopback, unspecified, multicast or reserved)"
        return None

    return rule, 'the IPv4 address the other hosts of its group reach (the firewall admits them by it), or "" for the default one'


def ip_address() -> tuple[Rule, str]:
    def rule(value: str) -> str | None:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            return "is not an IP address"
        return None

    return rule, "an IPv4 or IPv6 address (a host name would not match the firewall and health checks)"


def ipv4_source() -> tuple[Rule, str]:
    def rule(value: str) -> str | None:
        try:
            ipaddress.IPv4Network(value, strict=False)
        except ValueError:
            return "is not an IPv4 address or network"
        return None

    return rule, "an IPv4 address or network such as 10.20.0.5 or 10.20.0.0/24 (the firewall table is IPv4)"


def nginx_source() -> tuple[Rule, str]:
    def rule(value: str) -> str | None:
        if value == "all" or value.startswith("unix:"):
            return None
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            return "is not an address, a network, 'all' or 'unix:'"
        return None

    return rule, "an IPv4/IPv6 address or network, 'all' or 'unix:' (nginx allow)"


def cors_origin() -> tuple[Rule, str]:
    """An origin exactly as a browser serialises it, so that an exact match can find it: lower-case
    scheme and host, no default port, nothing after the port."""
    form = re.compile(r"(https?)://(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*|\[[0-9a-f:.]+\])(?::([0-9]{1,5}))?")

    def rule(value: str) -> str | None:
        match = form.fullmatch(value)
        if not match:
            return "has the wrong form"
        if match.group(2) and int(match.group(2)) == {"http": 80, "https": 443}[match.group(1)]:
            return "names its scheme's default port, which a browser never sends"
        return None

    return rule, (
        "an origin as a browser sends it: http:// or https://, a lower-case host name or address, a port other than the "
        "scheme's default, nothing after it (no path, no '/', no '*')"
    )


def url() -> tuple[Rule, str]:
    return regex(r"(https?://[^\s/?#]+[^\s]*)?", "empty, or an http:// or https:// URL")


def absolute_path() -> tuple[Rule, str]:
    def rule(value: str) -> str | None:
        if not value.startswith("/") or os.path.normpath(value) == "/" or "\n" in value:
            return "is not an absolute path below /"
        return None

    return rule, "an absolute path other than /"


def count_or_percent() -> tuple[Rule, str]:
    def rule(value: Any) -> str | None:
        if isinstance(value, bool):
            return "is a boolean"
        if isinstance(value, int):
            return None if value >= 1 else "is out of range"
        if isinstance(value, str) and re.fullmatch(r"([1-9][0-9]?|100)%", value):
            return None
        return "is neither a count nor a percentage"

    return rule, "a whole number >= 1, or a percentage such as '25%' (1% to 100%)"


def api_key() -> tuple[Rule, str]:
    def rule(value: str) -> str | None:
        if not value.strip():
            return "is empty: vLLM would then serve /v1 without authentication"
        if not re.fullmatch(r"[A-Za-z0-9._~+/-]+=*", value):
            return "holds characters a bearer token cannot carry (spaces, quotes, control characters)"
        if len(value) < 16:
            return "is too short"
        return None

    return rule, "at least 16 characters of A-Z a-z 0-9 . _ ~ + / - (e.g. openssl rand -hex 32), kept in Vault"


RULES: dict[str, tuple[Rule, str]] = {
    "vllm_version": regex(r"\d+(\.\d+)*((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?", 'a release number such as "0.32.0", quoted'),
    "vllm_api_key": api_key(),
    "vllm_listen_address": ip_address(),
    "vllm_port_base": whole(1024, 65535, "the service user cannot bind ports below 1024"),
    "vllm_reserved_ports[]": whole(1, 65535),
    "vllm_rendezvous_port": whole(1024, 65535 - 32, "a group's 32 ports (64 with Ray) start here"),
    "vllm_node_address": node_address(),
    "vllm_node_interface": regex(r"[A-Za-z0-9_.:@-]{0,15}", 'a network interface name such as "ens5", or "" for the default route\'s'),
    "vllm_gpus[]": whole(0, 1023),
    "vllm_start_timeout": whole(1, 604800),
    "vllm_index_url": url(),
    "vllm_extra_index_url": url(),
    "vllm_hf_endpoint": url(),
    "vllm_firewall_allow[]": ipv4_source(),
    "vllm_user": regex(r"(?!root$)[a-z_][a-z0-9_-]{0,31}", "a system user name other than root"),
    "vllm_group": regex(r"(?!root$)[a-z_][a-z0-9_-]{0,31}", "a system group name other than root"),
    "vllm_install_dir": absolute_path(),
    "vllm_config_dir": absolute_path(),
    "vllm_models_dir": absolute_path(),
    "vllm_cache_dir": absolute_path(),
    "vllm_wheelhouse_python_version": regex(r"3\.\d+", 'a Python version such as "3.11", quoted'),
    # Docker's reference grammar, with a tag or a digest: a bare name means :latest, which moves.
    "vllm_image": regex(
        rf"(?:{_DOMAIN}(?:\.{_DOMAIN})*(?::[0-9]+)?/)?{_COMPONENT}(?:/{_COMPONENT})*"
        r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}(?:@sha256:[0-9a-f]{64})?|@sha256:[0-9a-f]{64})",
        "an image reference with a tag or a digest, such as vllm/vllm-openai:v0.32.0 or vllm/vllm-openai@sha256:<64 hex digits>",
    ),
    "vllm_container_shm": regex(rf"host|{_DOCKER_SIZE}", 'host, or a size such as "16g" (at least 64m)'),
    "vllm_image_archive": regex(r"|/.*[^/]", 'an absolute path of a file on the controller, or "" to pull'),
    "vllm_rollout_batch": count_or_percent(),
    "vllm_rollout_serial": count_or_percent(),
    "vllm_models[].replicas": whole(1, 1024),
    "vllm_models[].tensor_parallel_size": whole(1, 1024),
    "vllm_models[].pipeline_parallel_size": whole(1, 1024),
    "vllm_models[].rendezvous_port": whole(1024, 65535 - 32, "a group's 32 ports (64 with Ray) start here"),
    "vllm_models[].nodes": regex(r"[A-Za-z_][A-Za-z0-9_]*", "the name of an inventory group"),
    "vllm_models[].max_model_len": whole(1),
    "vllm_models[].max_num_seqs": whole(1),
    "vllm_models[].gpu_memory_utilization": fraction(),
    "vllm_models[].gpus[]": whole(0, 1023),
    "gateway_listen_port": whole(1, 65535),
    "gateway_tls_port": whole(0, 65535, "0 turns TLS off"),
    "gateway_hash_header": regex(r"[A-Za-z0-9-]+", "an HTTP header name: letters, digits and '-'"),
    "gateway_max_fails": whole(0, 1000),
    "gateway_fail_timeout": whole(1, 86400),
    "gateway_next_upstream_tries": whole(1, 100),
    "gateway_keepalive": whole(1, 10000),
    "gateway_keepalive_timeout": whole(1, 4, "below vLLM's own 5 s keep-alive"),
    "gateway_read_timeout": whole(1, 86400),
    "gateway_client_max_body_size": regex(r"[1-9][0-9]*[kKmMgG]?", 'an nginx size such as "16m", "512k" or "1g" (not 0: no limit)'),
    "gateway_rate_limit": whole(0, 1000000, "0 turns the limit off"),
    "gateway_rate_limit_burst": whole(0, 1000000),
    "gateway_metrics_allow[]": nginx_source(),
    "gateway_cors_origins[]": cors_origin(),
    "gateway_exporter_port": whole(1, 65535),
    "monitoring_listen_address": ip_address(),
    "monitoring_port": whole(1, 65535),
    "monitoring_scrape_interval": whole(1, 3600),
    "monitoring_retention": regex(r"([0-9]+(ms|s|m|h|d|w|y))+", 'a Prometheus duration such as "15d", "6w" or "1y"'),
    "monitoring_node_exporter_port": whole(1, 65535),
    "monitoring_dcgm_exporter_port": whole(1, 65535),
    "monitoring_alert_kv_cache_usage": fraction(),
    "monitoring_alert_gateway_error_ratio": fraction(),
    "monitoring_alert_requests_waiting": whole(0),
    "monitoring_alertmanagers[]": regex(
        rf"(?:{_DOMAIN}(?:\.{_DOMAIN})*|[0-9.]+|\[[0-9a-fA-F:.]+\]):[0-9]{{1,5}}", "host:port of an Alertmanager, e.g. am-01:9093"
    ),
    "monitoring_grafana_repo_url": url(),
    "nvidia_driver_branch": regex(r"[0-9]{3}", 'a driver branch such as "570", quoted'),
    "nvidia_driver_min_version": regex(r"[0-9]+(\.[0-9]+)*", 'a driver version such as "525.60.13", quoted'),
    "nvidia_driver_expected_gpus": whole(0, 1024, "0: as many as the PCI bus shows"),
    "nvidia_driver_reboot_timeout": whole(60, 86400),
    "nvidia_driver_debian_mirror": url(),
    "docker_engine_repo_url": url(),
    "nvidia_container_toolkit_repo_url": url(),
    "hosts_serial": count_or_percent(),
}
RULES["monitoring_dcgm_exporter_image"] = RULES["vllm_image"]


# --- strict types -------------------------------------------------------------------------------


def _type_problem(value: Any, kind: str) -> str | None:
    """Why `value` is not of argument_specs type `kind`, as written, or None."""
    if kind == "raw":
        return None
    if kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return None
        if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
            return "is a quoted string"
        return "is a float" if isinstance(value, float) else "is not a whole number"
    if kind == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return None
        if isinstance(value, str):
            try:
                float(value)
                return "is a quoted string"
            except ValueError:
                pass
        return "is not a number"
    if kind == "bool":
        if isinstance(value, bool):
            return None
        if isinstance(value, str) and value.strip().lower() in QUOTED_BOOLS:
            return "is a quoted string (a non-empty string is always true)"
        return "is not true or false"
    if kind in ("str", "path"):
        if isinstance(value, str):
            return None
        if isinstance(value, bool):
            return "is a YAML boolean"
        if isinstance(value, (int, float)):
            return "is a number (YAML reads 0.30 as 0.3 and 010 as 8)"
        return "is not a string"
    if kind == "list":
        return (
            None
            if isinstance(value, list)
            else "is not a list" + (" (a single string is not a list of one)" if isinstance(value, str) else "")
        )
    if kind == "dict":
        return None if isinstance(value, Mapping) else "is not a mapping"
    return None


def _did_you_mean(close: list[str]) -> str:
    return f"; did you mean {close[0]}?" if close else ""


def _accepted(spec: dict[str, Any], path: str) -> str:
    kind = spec.get("type", "str")
    if path in RULES:
        text = RULES[path][1]
    elif spec.get("choices"):
        text = "one of " + ", ".join(str(c) for c in spec["choices"])
    else:
        text = TYPE_WORDS.get(kind, kind)
    if kind in ("int", "float", "bool") or (kind == "raw" and path in RULES):
        text += ", without quotes"
    elif kind == "list" and spec.get("elements"):
        text = f"a list of {ELEMENT_WORDS.get(spec['elements'], spec['elements'])}"
    return text


def _check_value(value: Any, spec: dict[str, Any], field: str, path: str, problems: list[tuple[str, str]], top: bool) -> None:
    """Append (field, message) for every problem of one value against its spec and rules."""
    secret = bool(spec.get("no_log"))
    kind = spec.get("type", "str")
    problem = _type_problem(value, kind)
    if problem:
        hint = ""
        if top and problem.startswith("is a quoted string"):
            example = json.dumps({field: yaml.safe_load(value.strip().lower() if kind == "bool" else value)})
            hint = f" (on the command line, -e takes JSON for numbers and booleans: -e '{example}')"
        problems.append((field, f"{shown(value, secret)} {problem}; accepted: {_accepted(spec, path)}{hint}"))
        return
    if spec.get("choices") and value not in spec["choices"]:
        close = difflib.get_close_matches(str(value), [str(c) for c in spec["choices"]], n=1)
        problems.append(
            (
                field,
                f"{shown(value, secret)} is not a choice{_did_you_mean(close)}; accepted: {_accepted(spec, path)}",
            )
        )
        return
    if path in RULES and kind not in ("list", "dict"):
        why = RULES[path][0](value)
        if why:
            problems.append((field, f"{shown(value, secret)} {why}; accepted: {RULES[path][1]}"))
            return
    if kind == "list":
        element = {"type": spec.get("elements", "raw"), "options": spec.get("options")}
        for i, item in enumerate(value):
            if element["type"] == "dict" and element["options"]:
                _check_mapping(item, element["options"], f"{field}[{i}]", f"{path}[]", problems)
            else:
                _check_value(item, element, f"{field}[{i}]", f"{path}[]", problems, False)
    elif kind == "dict" and spec.get("options"):
        _check_mapping(value, spec["options"], field, path, problems)


def _check_mapping(value: Any, options: dict[str, Any], field: str, path: str, problems: list[tuple[str, str]]) -> None:
    if not isinstance(value, Mapping):
        problems.append((field, f"{shown(value)} is not a mapping; accepted: a mapping of {', '.join(sorted(options))}"))
        return
    label = f"{field} ({value['name']})" if isinstance(value.get("name"), str) else field
    for key in value:
        if key not in options:
            close = difflib.get_close_matches(str(key), list(options), n=1)
            problems.append(
                (
                    f"{label}.{key}",
                    f"is not a field{_did_you_mean(close)}; accepted fields: {', '.join(sorted(options))}",
                )
            )
    for key, spec in options.items():
        if key in value and value[key] is not None:
            _check_value(value[key], spec, f"{label}.{key}", f"{path}.{key}", problems, False)
        elif spec.get("required") and key not in value:
            problems.append((f"{label}.{key}", f"is missing; accepted: {_accepted(spec, path + '.' + key)}"))


@functools.lru_cache(maxsize=16)
def _load_specs(path: str, mtime: float) -> dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        specs = yaml.safe_load(handle)["argument_specs"]
    return specs


def role_options(roles_dir: str, role: str) -> dict[str, Any]:
    """Every option any entry point of a role declares (main, preflight, facts, ...); only the
    main entry point's `required` counts for a host that runs the role."""
    path = os.path.join(roles_dir, role, "meta", "argument_specs.yml")
    specs = _load_specs(path, os.path.getmtime(path))
    options: dict[str, Any] = {}
    for entry_point, entry in specs.items():
        for name, spec in (entry.get("options") or {}).items():
            if entry_point != "main":
                spec = {**spec, "required": False}
            options.setdefault(name, spec)
    main = (specs.get("main") or {}).get("options") or {}
    options.update(main)
    return options


def settings_errors(hostvars: Mapping[str, Any], host: str, roles_dir: str, required: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Every problem of the settings one host carries, as 'host H: field: value problem; accepted: ...'.

    `hostvars` is the host's variables (inventory, group_vars, extra vars); role defaults are not
    in it, so only what the operator wrote is checked. `required` names the roles the host runs:
    their required options must be set.
    """
    specs = {role: role_options(roles_dir, role) for role in ROLES}
    specs["hosts"] = HOSTS_SPEC
    specs["handoff"] = HANDOFF_SPEC
    problems: list[tuple[str, str]] = []
    for name in sorted(k for k in hostvars.keys() if isinstance(k, str)):
        prefix = next((p for p in (*ROLES, "hosts", "handoff") if name.startswith(p + "_")), None)
        if prefix is None or name in ROLE_FACTS:
            continue
        known = specs[prefix]
        if name not in known:
            close = difflib.get_close_matches(name, list(known), n=1)
            problems.append(
                (
                    name,
                    f"is not a variable of {prefix}{_did_you_mean(close)} (a misspelt setting is silently ignored)",
                )
            )
            continue
        try:
            value = hostvars[name]
        except Exception as err:  # an undefined variable inside, a Vault file not loaded, ...
            problems.append((name, f"cannot be evaluated: {err}"))
            continue
        _check_value(value, known[name], name, name, problems, True)
    for role in required:
        for name, spec in specs[role].items():
            if spec.get("required") and name not in hostvars:
                problems.append((name, f"is missing; accepted: {_accepted(spec, name)}"))
    return [f"host {host}: {field}: {message}" for field, message in problems]


def cross_errors(settings: Mapping[str, Any], host: str, gateways: list[str]) -> list[str]:
    """Conflicts between settings, given the values a host will run with (defaults included)."""
    out: list[str] = []
    listen, tls = settings.get("gateway_listen_port"), settings.get("gateway_tls_port")
    if "gateway_listen_port" in settings and tls and tls == listen:
        out.append(f"host {host}: gateway_tls_port: {tls} is also gateway_listen_port; accepted: another port, or 0 for no TLS")
    cert, key = settings.get("gateway_tls_certificate") or "", settings.get("gateway_tls_certificate_key") or ""
    if bool(cert) != bool(key):
        missing = "gateway_tls_certificate_key" if cert else "gateway_tls_certificate"
        out.append(f"host {host}: {missing}: is empty while its pair is set; accepted: both (the operator's pair) or neither (self-signed)")
    address = settings.get("vllm_listen_address")
    others = [g for g in gateways if g != host]
    if address == "":
        out.append(
            f'host {host}: vllm_listen_address: "" (the host has no default IPv4 route to take its address from); '
            "accepted: the address on which the gateway hosts reach this host"
        )
    if isinstance(address, str) and (address.startswith("127.") or address == "::1") and others:
        out.append(
            f"host {host}: vllm_listen_address: {shown(address)} is reachable from {host} only, but the gateway "
            f"{others[0]} is another host; accepted: leave it unset (the host's address, firewalled) or an address {others[0]} reaches"
        )
    if settings.get("vllm_runtime") == "docker":
        out += container_errors(settings, host)
        if not settings.get("hosts_docker_engine"):
            out.append(
                f"host {host}: hosts_docker_engine: false, but vllm_runtime: 'docker' needs the Docker engine; "
                "accepted: leave hosts_docker_engine unset or true (playbooks/hosts.yml installs it), or vllm_runtime: venv"
            )
        models = settings.get("vllm_models")
        for i, model in enumerate(models if isinstance(models, list) else []):
            if isinstance(model, dict) and str(model.get("source", "")).startswith("modelscope:"):
                out.append(
                    f"host {host}: vllm_models[{i}].source: {shown(model['source'])}: the docker runtime downloads with the "
                    "image's Hugging Face client only; accepted: an hf: or host path source, or vllm_runtime: venv"
                )
    return out


def int_over_1(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 1


def container_errors(settings: Mapping[str, Any], host: str) -> list[str]:
    """What the docker runtime's settings would break at load or start (their forms are checked
    by RULES first; a value of the wrong form is left to that message)."""
    out = []
    image, archive = str(settings.get("vllm_image", "")), settings.get("vllm_image_archive") or ""
    shm = str(settings.get("vllm_container_shm", "host"))
    if archive and "@" in image:
        out.append(
            f"host {host}: vllm_image: {shown(image)} names a digest, but `docker load` from vllm_image_archive keeps tags, not "
            "digests; accepted: the tag the archive holds (playbooks/image.yml saves vllm_image as named), or no archive"
        )
    if settings.get("vllm_device") == "cpu" and re.match(r"(docker\.io/)?vllm/vllm-openai[:@]", image):
        out.append(
            f"host {host}: vllm_image: {shown(image)} is vLLM's CUDA image, but vllm_device is cpu; "
            "accepted: an image of vLLM's CPU build, or vllm_device: cuda"
        )
    if shm != "host" and re.fullmatch(_DOCKER_SIZE, shm):
        mib = docker_size_mib(shm)
        models = settings.get("vllm_models")
        models = models if isinstance(models, list) else []
        tp = [m.get("name") for m in models if isinstance(m, dict) and int_over_1(m.get("tensor_parallel_size"))]
        least, why = (MIN_CONTAINER_SHM_MIB, "a container needs")
        if tp:
            least, why = settings.get("min_tp_shm_mib", 1024), f"tensor-parallel model {tp[0]} needs"
        if mib < least:
            out.append(
                f"host {host}: vllm_container_shm: {shown(shm)} is {mib:g} MiB, but {why} at least {least} MiB of shared memory; "
                f'accepted: host, or a size such as "16g"'
            )
    return out


def pem_errors(host: str, field: str, content: str | None, kind: str) -> list[str]:
    """A certificate or key file the gateway will need: it must exist on the controller, in PEM."""
    if content is None:
        return [f"host {host}: {field}: the file does not exist on the controller; accepted: a PEM file on the controller"]
    marker = "CERTIFICATE" if kind == "certificate" else "PRIVATE KEY"
    if f"-----BEGIN {marker}" not in content and not (kind == "key" and re.search(r"-----BEGIN [A-Z ]*PRIVATE KEY-----", content)):
        return [f"host {host}: {field}: the file holds no PEM {kind}; accepted: a PEM file (-----BEGIN {marker}-----)"]
    return []


def report(errors: list[str]) -> str:
    """One refusal for a host: every problem, one a line."""
    return f"{len(errors)} problem(s) in the inventory; nothing was changed on any host:\n" + "\n".join(f"- {e}" for e in errors)


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {
            "preflight_settings_errors": settings_errors,
            "preflight_cross_errors": cross_errors,
            "preflight_pem_errors": pem_errors,
            "preflight_report": report,
        }


__all__ = ["AnsibleFilterError", "cross_errors", "pem_errors", "report", "settings_errors"]
