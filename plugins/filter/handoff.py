"""What a client needs after a rollout, computed from the whole fleet's plan: each gateway's base
URL, the model names, and how to reach a gateway the controller cannot (an SSH tunnel through the
address Ansible itself uses). No secret goes in: the sheet names where the key is."""

from __future__ import annotations

import shlex
from typing import Any


def base_url(scheme: str, address: str, port: int) -> str:
    default = {"http": 80, "https": 443}[scheme]
    host = f"[{address}]" if ":" in address else address
    return f"{scheme}://{host}{'' if port == default else f':{port}'}/v1"


def client_handoff(
    gateways: list[str], hostvars: Any, probes: list[dict[str, Any]] | None = None, local_port: int = 18000
) -> list[dict[str, Any]]:
    """One entry per gateway host (in inventory order): where it serves clients (`address`,
    `port`), whether the controller reached it (`probes`: the results of wait_for looped over the
    gateways), and the base URL a client on the controller uses: the gateway's own, or through
    the tunnel that brings an unreachable one to the operator's loopback.

    The address given is the gateway's default IPv4 address (the one the firewall admits gateways
    by), else the address Ansible connects to; with the operator's own certificate, the inventory
    name (a certificate names hosts, rarely addresses). TLS is preferred when on. The tunnel goes
    through the address, user, port, key and SSH options Ansible itself uses."""
    reached = {(p.get("item") or {}).get("host") for p in probes or [] if p.get("state") == "started"}
    sheet = []
    for offset, name in enumerate(gateways):
        hv = hostvars[name]
        connect = str(hv.get("ansible_host") or name)
        address = str(((hv.get("ansible_facts") or {}).get("default_ipv4") or {}).get("address") or connect)
        tls_port = int(hv.get("gateway_tls_port") or 0)
        scheme, port = ("https", tls_port) if tls_port else ("http", int(hv.get("gateway_listen_port") or 80))
        own_certificate = bool(tls_port) and bool(hv.get("gateway_tls_certificate"))
        entry: dict[str, Any] = {
            "host": name,
            "address": address,
            "port": port,
            "url": base_url(scheme, name if own_certificate else address, port),
            "reachable": name in reached,
            "self_signed": bool(tls_port) and not own_certificate,
        }
        if not entry["reachable"]:
            local = local_port + offset
            ssh = ["ssh", "-N", "-L", f"127.0.0.1:{local}:127.0.0.1:{port}"]
            ssh += shlex.split(str(hv.get("ansible_ssh_common_args") or ""))
            if hv.get("ansible_ssh_private_key_file"):
                ssh += ["-i", str(hv["ansible_ssh_private_key_file"])]
            if hv.get("ansible_port"):
                ssh += ["-p", str(hv["ansible_port"])]
            user = hv.get("ansible_user")
            ssh.append(f"{user}@{connect}" if user else connect)
            entry["tunnel"] = shlex.join(ssh)
            entry["url"] = base_url(scheme, "127.0.0.1", local)
        sheet.append(entry)
    return sheet


def served_models(servers: list[str], hostvars: Any) -> list[str]:
    """Every model name some serving host plans, sorted (the gateway routes each of them)."""
    return sorted({inst["model"] for name in servers for inst in hostvars[name].get("vllm_plan") or []})


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"vllm_client_handoff": client_handoff, "vllm_served_models": served_models}
