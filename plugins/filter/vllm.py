"""Filters that turn the operator's `vllm_models` into the instances a host runs.

This is computation, not configuration, so it lives here with pytest tests instead of in Jinja:
parsing a model's `source`, expanding models x replicas into instances with stable names, ports
and GPUs, building each instance's `vllm serve` argv, and quoting it for a systemd unit.
Every refusal names the host, the model and the field, so a bad inventory fails in preflight
with a message an operator can act on.
"""

from __future__ import annotations

import base64
import itertools
import json
import math
import os
import posixpath
import re
from typing import Any

try:
    from ansible.errors import AnsibleFilterError
except ImportError:  # pragma: no cover - the unit tests import this module without Ansible too

    class AnsibleFilterError(Exception):  # type: ignore[no-redef]
        pass


# Settings every model may carry, rendered as `--flag value`. Anything else goes in extra_args.
SERVE_SETTINGS = (
    "max_model_len",
    "gpu_memory_utilization",
    "dtype",
    "max_num_seqs",
    "quantization",
    "kv_cache_dtype",
    "enable_prefix_caching",
    "trust_remote_code",
)
MODEL_DEFAULTS: dict[str, Any] = {
    "tensor_parallel_size": 1,
    "replicas": 1,
    "extra_args": [],
    "env": {},
    "fallback": None,
    "gpus": None,
    "nodes": None,
    "pipeline_parallel_size": 1,
    "rendezvous_port": None,
    "distributed_backend": "mp",
}
# vLLM's own default share of each GPU's memory.
VLLM_DEFAULT_GPU_MEMORY_UTILIZATION = 0.9
# Flags the role sets itself, or whose effect the planner must own: in extra_args they would
# clash, take GPUs the plan does not know of, or (the key, a hub token) show in `ps`.
MANAGED_FLAGS = {
    "--api-key": "the API key reaches vLLM through the environment file (vllm_api_key), never a command line",
    "--hf-token": "a token on the command line shows in ps; set vllm_hf_token (models are fetched by Ansible)",
    "--config": "a config file could set the key, the address or the port behind the plan's back; use the model's fields and extra_args",
    "--host": "set vllm_listen_address",
    "--port": "ports are planned from vllm_port_base",
    "--uds": "instances listen on their planned TCP port, which the gateway and the health gate use",
    "--model": "set the model's source",
    "--served-model-name": "set the model's name (and fallback)",
    "--tensor-parallel-size": "set the model's tensor_parallel_size",
    "--pipeline-parallel-size": "set the model's pipeline_parallel_size (stages across the hosts of its `nodes` group)",
    "--data-parallel-size": "set the model's replicas (one instance each, planned and balanced by the gateway)",
    "--data-parallel-size-local": "set the model's replicas (one instance each, planned and balanced by the gateway)",
    "--nnodes": "set the model's nodes: the inventory group of hosts that serve it together",
    "--node-rank": "set the model's nodes: ranks follow the group's inventory order",
    "--headless": "set the model's nodes: every host of the group but the first runs headless",
    "--master-addr": "set the model's nodes: the first host of the group leads",
    "--master-port": "set the model's rendezvous_port (or vllm_rendezvous_port)",
    "--distributed-executor-backend": "set the model's distributed_backend (mp: vLLM's own multi-node launcher, or ray)",
    "--prefill-context-parallel-size": "each instance would need that many times the GPUs it is planned (its ranks are "
    "tensor_parallel_size x pipeline_parallel_size x this); the plan has no field for it",
}
# Flags the model's own fields render; given in extra_args as well they would be given twice.
FIELD_FLAGS = {
    "--" + key.replace("_", "-"): key
    for key in (
        "max_model_len",
        "gpu_memory_utilization",
        "dtype",
        "max_num_seqs",
        "quantization",
        "kv_cache_dtype",
        "enable_prefix_caching",
        "trust_remote_code",
    )
}
# The role sets these in every instance's environment: the key, the planned GPUs, and loopback
# for the sockets vLLM opens between its own processes (engine queues, Gloo, NCCL bootstrap).
LOOPBACK_ENV = {"VLLM_HOST_IP": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}
MANAGED_ENV = {
    "VLLM_API_KEY": "set vllm_api_key",
    "CUDA_VISIBLE_DEVICES": "GPUs are planned; pin a model with its `gpus` list",
    **{name: "instances keep vLLM's internal sockets on loopback" for name in LOOPBACK_ENV},
}
# A group's leader listens for its peers on the rendezvous port (torch's store, or Ray's GCS), and
# vLLM's message queues take the next ports up from it (VLLM_PORT); the firewall covers this many,
# the last of them the watch (vllm-launch). Ray's daemons and workers take fixed ports of a wider
# range, so that nothing Ray opens is outside what the firewall admits from the group only.
NODE_PORTS = 32
RAY_NODE_PORTS = 64
# Offsets from the rendezvous port of what each host's Ray node listens on (vLLM's own: 1-15).
RAY_PORT_OFFSETS = {
    "--node-manager-port": 16,
    "--object-manager-port": 17,
    "--dashboard-agent-grpc-port": 18,
    "--dashboard-agent-listen-port": 19,
    "--metrics-export-port": 20,
    "--runtime-env-agent-port": 21,
    "--min-worker-port": 22,  # the driver and every worker process (one per GPU, more on restarts)
    "--max-worker-port": RAY_NODE_PORTS - 2,
}
DISTRIBUTED_BACKENDS = ("mp", "ray")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
FLAGS_DIR = posixpath.join(posixpath.dirname(posixpath.abspath(__file__)), "vllm_serve_flags")


def serve_flags(version: str) -> dict[str, str] | None:
    """Every option string of `vllm serve` in this release -> its first (canonical) spelling, from
    vllm_serve_flags/<version>.txt; None for a release without a list."""
    try:
        with open(posixpath.join(FLAGS_DIR, f"{version}.txt"), encoding="utf-8") as handle:
            lines = [line.split() for line in handle if line.strip() and not line.startswith("#")]
    except OSError:
        return None
    return {flag: words[0] for words in lines for flag in words}


def _canonical(flag: str, known: dict[str, str] | None) -> tuple[str | None, str]:
    """What argparse (as vLLM configures it) makes of an option token: (canonical flag or None, why).

    vLLM turns `_` into `-` in long names (up to a '.', for --json-arg.key forms) and argparse
    accepts any unambiguous prefix of a long option, so `--api_key` and `--api-ke` are `--api-key`.
    """
    if flag.startswith("--"):
        name = "--" + flag[2:].split(".", 1)[0].replace("_", "-")
    else:
        name = flag
    if known is None:
        # No flag list for this release: resolve against the managed flags alone.
        if name in MANAGED_FLAGS or name in FIELD_FLAGS:
            return name, ""
        prefixed = [m for m in MANAGED_FLAGS if name.startswith("--") and len(name) > 2 and m.startswith(name)]
        return (prefixed[0], "") if prefixed else (None, "")
    if name in known:
        return known[name], ""
    if name.startswith("--") and len(name) > 2:
        matches = sorted({canon for spelled, canon in known.items() if spelled.startswith(name) and spelled.startswith("--")})
        if len(matches) == 1:
            return matches[0], ""
        if matches:
            return None, f"an ambiguous abbreviation of {', '.join(matches[:4])}{', ...' if len(matches) > 4 else ''}"
    return None, "not a `vllm serve` flag"


def extra_args_problem(args: list[Any], model: dict[str, Any], known: dict[str, str] | None) -> tuple[int, str] | None:
    """The first extra_args element vLLM would misread, or the plan must refuse: (index, reason)."""
    for index, arg in enumerate(args):
        if not isinstance(arg, str):
            return index, "is not a string; quote it"
        token = arg.strip()
        if not token.startswith("-") or token == "-" or re.match(r"^-\d", token):
            continue  # a value
        if re.search(r"\s", token):
            return index, "holds a flag and something more in one element; write one flag or value per element, e.g. ['--flag', 'value']"
        if token.startswith("-O"):
            continue  # vLLM's own -O<level> shorthand for --optimization-level
        canonical, why = _canonical(token.split("=", 1)[0], known)
        if canonical in MANAGED_FLAGS:
            return index, f"sets {canonical}, which is not allowed here: {MANAGED_FLAGS[canonical]}"
        if canonical in FIELD_FLAGS and model.get(FIELD_FLAGS[canonical]) is not None:
            return index, f"sets {canonical} while the model's {FIELD_FLAGS[canonical]} field sets it too; keep one"
        if canonical is None and known is not None:
            return index, f"is {why}"
    return None


def env_problem(env: Any) -> tuple[str, str] | None:
    """The first environment entry the env file would mangle, or the role must own:
    (variable name, the value shown with what is wrong and what is accepted)."""
    if not isinstance(env, dict):
        return "", f"{_shown(env)} is not a mapping; accepted: variable names mapped to strings or numbers"
    for name, value in env.items():
        if not isinstance(name, str) or not ENV_NAME_RE.match(name):
            return str(name), f"{_shown(name)} is not a variable name; accepted: letters, digits and '_', not starting with a digit"
        if name in MANAGED_ENV:
            return name, f"{_shown(value)} is refused: {name} is set by the role ({MANAGED_ENV[name]})"
        if isinstance(value, bool) or value is None or not isinstance(value, (str, int, float)):
            kind = (
                "a YAML boolean"
                if isinstance(value, bool)
                else "null"
                if value is None
                else "a list"
                if isinstance(value, (list, tuple))
                else "a mapping"
                if isinstance(value, dict)
                else "not text"
            )
            return name, f"{_shown(value)} is {kind}; accepted: a string or a number (write '1' or 'true' in quotes)"
        if isinstance(value, str) and any(ord(c) < 32 or ord(c) == 127 for c in value):
            return name, f"{_shown(value)} holds a control character (a newline?); accepted: one line of text"
    return None


NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
SYSTEMD_SAFE_RE = re.compile(r"^[A-Za-z0-9_@+=:,./-]+$")


def _fail(host: str, where: str, message: str) -> AnsibleFilterError:
    return AnsibleFilterError(f"host {host}: {where}: {message}")


def parse_source(source: str) -> dict[str, str]:
    """Classify a model source.

    `/abs/path` is already on the host; `controller:/abs/path` is copied from the controller;
    `hf:org/name[@rev]` (or a bare `org/name`) comes from Hugging Face; `modelscope:org/name`
    from ModelScope.
    """
    if not isinstance(source, str) or not source:
        raise AnsibleFilterError("source must be a non-empty string")
    if source.startswith("/"):
        return {"kind": "host", "location": posixpath.normpath(source)}
    if source.startswith("controller:"):
        path = source[len("controller:") :]
        if not path.startswith("/"):
            raise AnsibleFilterError(f"source {source!r}: a controller path must be absolute")
        return {"kind": "controller", "location": posixpath.normpath(path)}
    for prefix, kind in (("hf:", "huggingface"), ("huggingface:", "huggingface"), ("modelscope:", "modelscope")):
        if source.startswith(prefix):
            return _hub_source(kind, source[len(prefix) :], source)
    if HUB_ID_RE.match(source):
        return _hub_source("huggingface", source, source)
    raise AnsibleFilterError(f"source {source!r} is neither an absolute host path, controller:/path, hf:org/name nor modelscope:org/name")


def _hub_source(kind: str, ref: str, source: str) -> dict[str, str]:
    if not HUB_ID_RE.match(ref):
        raise AnsibleFilterError(f"source {source!r}: expected org/name or org/name@revision")
    repo, _, revision = ref.partition("@")
    return {"kind": kind, "repo": repo, "revision": revision}


def _model_dir(source: dict[str, str], models_dir: str) -> str:
    if source["kind"] == "host":
        return source["location"]
    if source["kind"] == "controller":
        return posixpath.join(models_dir, posixpath.basename(source["location"]))
    suffix = f"@{source['revision']}" if source["revision"] else ""
    return posixpath.join(models_dir, source["repo"].replace("/", "--") + suffix)


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def serve_args(model: dict[str, Any], *, path: str, host: str, port: int, aliases: list[str] = ()) -> list[str]:
    """The `vllm serve` argv of one instance (everything but the key, which is in the env file).

    `aliases` are the models this one stands in for as a fallback: the gateway sends their
    requests here when all their own instances are down, so it must answer to their names.
    """
    args = ["--model", path, "--served-model-name", model["name"], *aliases, "--host", host, "--port", str(port)]
    args += ["--tensor-parallel-size", str(model["tensor_parallel_size"])]
    for key in SERVE_SETTINGS:
        value = model.get(key)
        if value is None:
            continue
        if isinstance(value, bool):
            args.append(_flag(key) if value else "--no-" + _flag(key)[2:])
        else:
            args += [_flag(key), str(value)]
    return args + [str(arg) for arg in model["extra_args"]]


def _shown(value: Any) -> str:
    """A value as an operator wrote it, for a message (JSON, shortened)."""
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def _whole(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _validate_model(host: str, index: int, model: dict[str, Any], flags: dict[str, str] | None) -> dict[str, Any]:
    where = f"vllm_models[{index}]"
    if not isinstance(model, dict):
        raise _fail(host, where, f"{_shown(model)} is not a mapping; accepted: a mapping with at least name and source")
    model = {**MODEL_DEFAULTS, **model}
    name = model.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise _fail(
            host,
            f"{where}.name",
            f"{_shown(name)} is not a name; accepted: 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
    where = f"vllm_models[{index}] ({name})"
    for field in ("replicas", "tensor_parallel_size"):
        if not _whole(model[field], 1):
            raise _fail(host, f"{where}.{field}", f"{_shown(model[field])} is refused; accepted: a whole number >= 1, without quotes")
    if not _whole(model["pipeline_parallel_size"], 1):
        raise _fail(
            host, f"{where}.pipeline_parallel_size", f"{_shown(model['pipeline_parallel_size'])} is refused; accepted: a whole number >= 1"
        )
    if model["nodes"] is None and model["pipeline_parallel_size"] > 1:
        raise _fail(
            host,
            f"{where}.pipeline_parallel_size",
            f"{model['pipeline_parallel_size']} stages need several hosts; accepted: 1, or a `nodes` group whose host count it divides",
        )
    if model["nodes"] is None and model["rendezvous_port"] is not None:
        raise _fail(
            host,
            f"{where}.rendezvous_port",
            f"{_shown(model['rendezvous_port'])} is the port a group of hosts meets on, and the model has no `nodes`; "
            "accepted: the `nodes` group of the hosts that serve it together, or no rendezvous_port",
        )
    backend = model["distributed_backend"]
    if backend not in DISTRIBUTED_BACKENDS:
        raise _fail(host, f"{where}.distributed_backend", f"{_shown(backend)} is refused; accepted: mp or ray")
    if backend != "mp" and model["nodes"] is None:
        raise _fail(
            host,
            f"{where}.distributed_backend",
            f"{backend} spans a group of hosts; accepted: mp (the default) for a model on one host, or a `nodes` group",
        )
    util = model.get("gpu_memory_utilization")
    if util is not None and not (isinstance(util, (int, float)) and not isinstance(util, bool) and 0 < util <= 1):
        raise _fail(host, f"{where}.gpu_memory_utilization", f"{_shown(util)} is refused; accepted: a number in (0, 1], without quotes")
    if not isinstance(model["extra_args"], list):
        raise _fail(host, f"{where}.extra_args", f"{_shown(model['extra_args'])} is not a list; accepted: a list, e.g. ['--enforce-eager']")
    problem = extra_args_problem(model["extra_args"], model, flags)
    if problem:
        at, reason = problem
        raise _fail(host, f"{where}.extra_args[{at}]", f"{_shown(model['extra_args'][at])} {reason}")
    problem = env_problem(model["env"])
    if problem:
        raise _fail(host, f"{where}.env{'.' + problem[0] if problem[0] else ''}", problem[1])
    try:
        model["source_parsed"] = parse_source(model.get("source"))
    except AnsibleFilterError as err:
        raise _fail(host, f"{where}.source", str(err)) from None
    return model


# nvidia-smi topo -m cells (parsed by plugins/filter/nvidia.py), best first; NV# = any number of NVLinks.
_LINK_RANK = {"PIX": 1, "PXB": 2, "PHB": 3, "NODE": 4, "SYS": 5}


def _rank(link: str | None) -> int:
    if link is None:
        return 6
    return 0 if link.startswith("NV") else _LINK_RANK.get(link, 6)


def _normalise_gpus(gpus: list[Any] | None) -> tuple[list[int] | None, dict[int, dict[str, Any]]]:
    """Indices plus, where the host's GPU facts were given instead of bare indices, the facts."""
    if gpus is None:
        return None, {}
    facts = {int(g["index"]): g for g in gpus if isinstance(g, dict)}
    return [int(g["index"]) if isinstance(g, dict) else int(g) for g in gpus], facts


def place_gpus(free: list[int], want: int, facts: dict[int, dict[str, Any]]) -> list[int]:
    """The `want` free GPUs a tensor-parallel instance should get: the set whose worst pair is
    best connected (all NVLink, then one PCIe switch, ..., then across NUMA nodes), then the best
    total, then the lowest indices. Without topology facts, the first `want` free GPUs."""
    if want <= 1 or not facts or want >= len(free):
        return free[:want]

    def cost(group: tuple[int, ...]) -> tuple[int, int, tuple[int, ...]]:
        ranks = [_rank((facts.get(a) or {}).get("links", {}).get(str(b))) for a, b in itertools.combinations(group, 2)]
        return max(ranks), sum(ranks), group

    groups = itertools.combinations(sorted(free), want)
    return list(min(itertools.islice(groups, 200000), key=cost))


def _numa_binding(assigned: list[int], facts: dict[int, dict[str, Any]]) -> tuple[int | None, list[int]]:
    """The NUMA node and CPUs an instance is bound to when all its GPUs sit on one node."""
    nodes = {(facts.get(g) or {}).get("numa_node") for g in assigned}
    if not assigned or len(nodes) != 1 or None in nodes:
        return None, []
    return nodes.pop(), sorted(set((facts.get(assigned[0]) or {}).get("cpus") or []))


def cpu_ranges(cpus: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2 5' (systemd CPUAffinity= syntax)."""
    out, cpus = [], sorted(cpus)
    for _, run in itertools.groupby(enumerate(cpus), key=lambda p: p[1] - p[0]):
        run = [c for _, c in run]
        out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return " ".join(out)


def plan_instances(
    models: list[dict[str, Any]],
    host: str,
    *,
    listen_address: str = "127.0.0.1",
    port_base: int = 8000,
    models_dir: str = "/var/lib/vllm/models",
    gpus: list[Any] | None = None,
    reserved_ports: list[int] | None = None,
    nccl_env: dict[str, Any] | None = None,
    env: dict[str, Any] | None = None,
    version: str | None = None,
    node_groups: dict[str, list[dict[str, Any]]] | None = None,
    rendezvous_port: int = 29500,
    device: str = "cuda",
) -> list[dict[str, Any]]:
    """Expand models x replicas into this host's instances: name, port, GPUs, argv, env.

    A model with `nodes` is one instance served by the hosts of that inventory group together
    (`node_groups`: each group's hosts in inventory order with the address and interface they
    reach each other on): the first leads (its API is the one the gateway sees), the others run
    headless and listen on no API port (with distributed_backend ray: the leader runs Ray's head
    and `vllm serve`, the others a Ray worker node each, and no vLLM of their own).
    `gpus` is the host's GPU indices (the operator's override) or its GPU facts (nvidia_gpu_facts,
    which add NVLink/PCIe topology and NUMA affinity); None means a host without GPUs (the CPU
    build), where no GPU is pinned. Tensor-parallel instances get the best-connected free GPUs and
    are bound to their NUMA node's CPUs; `nccl_env` goes into every tensor-parallel instance's
    environment (the model's own env wins). Names are `<model>-<replica>` so that
    adding a replica never renames, and so never restarts, the instances already running.
    """
    if not isinstance(models, list) or not models:
        raise _fail(host, "vllm_models", f"{_shown(models)} is refused; accepted: a non-empty list of models")
    for field, value in (("vllm_env", env), ("vllm_nccl_env", nccl_env)):
        problem = env_problem(value or {})
        if problem:
            raise _fail(host, f"{field}{'.' + problem[0] if problem[0] else ''}", problem[1])
    flags = serve_flags(version) if version else None
    validated = [_validate_model(host, i, model, flags) for i, model in enumerate(models)]
    seen: dict[str, int] = {}
    for i, model in enumerate(validated):
        if model["name"] in seen:
            raise _fail(host, f"vllm_models[{i}].name", f"{model['name']!r} is already the name of vllm_models[{seen[model['name']]}]")
        seen[model["name"]] = i
    aliases: dict[str, list[str]] = {}
    for i, model in enumerate(validated):
        fallback = model["fallback"]
        if fallback is None:
            continue
        if fallback == model["name"]:
            raise _fail(host, f"vllm_models[{i}] ({model['name']}).fallback", "a model cannot be its own fallback")
        if fallback in seen and validated[seen[fallback]]["fallback"] is not None:
            raise _fail(
                host, f"vllm_models[{i}] ({model['name']}).fallback", f"{fallback!r} has a fallback itself; chains are not supported"
            )
        aliases.setdefault(fallback, []).append(model["name"])
    dirs: dict[str, str] = {}
    for model in validated:
        src = model["source_parsed"]
        path = _model_dir(src, models_dir)
        other = dirs.setdefault(path, model["source"])
        if other != model["source"] and src["kind"] != "host":
            raise _fail(host, f"vllm_models ({model['name']}).source", f"{model['source']!r} and {other!r} would both be stored in {path}")
        model["path"] = path
        if model["distributed_backend"] == "ray" and device == "cpu":
            raise _fail(
                host,
                f"vllm_models ({model['name']}).distributed_backend",
                "ray is refused: the CPU build of vLLM does not support Ray; accepted: mp (vLLM's own multi-node launcher)",
            )

    reserved = set(reserved_ports or [])
    gpus, gpu_facts = _normalise_gpus(gpus)
    free_gpus = list(gpus) if gpus is not None else None
    if free_gpus is not None:
        # GPUs a model pins explicitly are shared on purpose and leave the automatic pool.
        pinned = {g for m in validated for g in (m["gpus"] or [])}
        for i, model in enumerate(validated):
            for g in model["gpus"] or []:
                if g not in free_gpus:
                    raise _fail(
                        host, f"vllm_models[{i}] ({model['name']}).gpus", f"GPU {g} is not one of this host's GPUs {list(gpus or [])}"
                    )
        free_gpus = [g for g in free_gpus if g not in pinned]
    shared_use: dict[int, list[tuple[str, float]]] = {}
    instances: list[dict[str, Any]] = []
    port = port_base
    nodes = {m["name"]: _node_plan(m, host, node_groups or {}, rendezvous_port) for m in validated if m["nodes"] is not None}
    spanned = sorted({n["group"] for n in nodes.values()})
    if len(spanned) > 1:
        raise _fail(host, "vllm_models", f"this host is in groups {', '.join(map(repr, spanned))}; accepted: one `nodes` group per host")
    if len(nodes) > 1:
        raise _fail(
            host,
            "vllm_models",
            f"{', '.join(sorted(nodes))} are all served by group {spanned[0]!r}; accepted: one model per group of hosts "
            "(they would share its ports)",
        )
    for model in validated:
        node = nodes.get(model["name"])
        for replica in range(model["replicas"]):
            name = f"{model['name']}-{replica}"
            while port in reserved:
                port += 1
            if port > 65535:
                raise _fail(host, f"vllm_models ({model['name']})", f"ran out of ports above vllm_port_base {port_base}")
            assigned: list[int] = []
            if free_gpus is not None and model["gpus"]:
                assigned = list(model["gpus"])
                if len(assigned) != model["tensor_parallel_size"]:
                    raise _fail(
                        host,
                        f"vllm_models ({model['name']}).gpus",
                        f"lists {len(assigned)} GPU(s) for tensor_parallel_size {model['tensor_parallel_size']}",
                    )
                util = model.get("gpu_memory_utilization") or VLLM_DEFAULT_GPU_MEMORY_UTILIZATION
                for g in assigned:
                    shared_use.setdefault(g, []).append((name, util))
            elif free_gpus is not None:
                want = model["tensor_parallel_size"]
                if want > len(free_gpus):
                    raise _fail(
                        host,
                        f"vllm_models ({model['name']}).tensor_parallel_size",
                        f"instance {name} needs {want} GPU(s) but only {len(free_gpus)} of {len(gpus or [])} are left",
                    )
                assigned = place_gpus(free_gpus, want, gpu_facts)
                free_gpus = [g for g in free_gpus if g not in assigned]
            numa_node, cpus = _numa_binding(assigned, gpu_facts)
            # Host-wide, then NCCL for tensor parallel, then the model's own; the role's last.
            instance_env = {str(k): str(v) for k, v in (env or {}).items()}
            if model["tensor_parallel_size"] > 1:
                instance_env.update({str(k): str(v) for k, v in (nccl_env or {}).items()})
            instance_env.update({str(k): str(v) for k, v in model["env"].items()})
            instance_env.update(LOOPBACK_ENV)
            args = serve_args(model, path=model["path"], host=listen_address, port=port, aliases=aliases.get(model["name"], []))
            if node is not None:
                # The group's processes talk over the address its hosts reach each other on.
                instance_env.update({"VLLM_HOST_IP": node["address"], "VLLM_PORT": str(node["rendezvous_port"] + 1)})
                if node["interface"]:
                    instance_env.update({"GLOO_SOCKET_IFNAME": node["interface"], "NCCL_SOCKET_IFNAME": node["interface"]})
                at = args.index("--tensor-parallel-size")
                args = args[:at] + args[at + 2 :] + node_args(node)
                if node["backend"] == "ray":
                    instance_env["RAY_USAGE_STATS_ENABLED"] = "0"  # Ray asks to phone home otherwise
                    if node["role"] == "follower":
                        args = []  # a Ray worker node: vLLM runs on the leader only, its workers here
            if free_gpus is not None:
                instance_env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in assigned)
            health_host = "127.0.0.1" if listen_address in ("0.0.0.0", "::") else listen_address
            follower = node is not None and node["role"] == "follower"
            instances.append(
                {
                    "name": name,
                    "model": model["name"],
                    "replica": replica,
                    "listen_address": listen_address,
                    "port": port,
                    "gpus": assigned,
                    "tensor_parallel_size": model["tensor_parallel_size"],
                    # What vLLM is given over the whole instance (a group of hosts, or this one).
                    "world": {
                        "tensor_parallel_size": node["tensor_parallel_total"] if node else model["tensor_parallel_size"],
                        "pipeline_parallel_size": model["pipeline_parallel_size"],
                    },
                    "numa_node": numa_node,
                    "cpus": cpu_ranges(cpus),
                    "source": model["source_parsed"],
                    "model_path": model["path"],
                    "fallback": model["fallback"],
                    "args": args,
                    "env": instance_env,
                    # A follower answers nothing itself: the leader's /health is the group's.
                    "health_url": None if follower else f"http://{_url_host(health_host)}:{port}/health",
                    **({"port": None, "role": "follower"} if follower else {"role": "leader" if node else "single"}),
                    **({"node": node} if node else {}),
                }
            )
            if not follower:
                port += 1
    for node in nodes.values():
        span = range(node["rendezvous_port"], node["watch_port"] + 1)
        taken = sorted({i["port"] for i in instances if i["port"] in span} | (reserved & set(span)))
        if taken:
            raise _fail(
                host,
                "vllm_rendezvous_port",
                f"{node['rendezvous_port']}: the ports {span.start}-{span.stop - 1} of group {node['group']!r} hold port(s) "
                f"{', '.join(map(str, taken))} planned or reserved here; accepted: a rendezvous port {len(span)} ports clear of them",
            )
    for gpu, users in sorted(shared_use.items()):
        total = sum(u for _, u in users)
        if total > 1.0 + 1e-9:
            detail = ", ".join(f"{n} {u:g}" for n, u in users)
            raise _fail(host, "vllm_models.gpu_memory_utilization", f"GPU {gpu} is shared by {detail}: {total:g} > 1.0")
    return instances


def _node_plan(model: dict[str, Any], host: str, groups: dict[str, list[dict[str, Any]]], rendezvous: int) -> dict[str, Any]:
    """Where this host stands in the group of hosts that serve `model` together: its rank (the
    group's inventory order), the leader (rank 0) and its address, the rendezvous port, the
    sizes vLLM gets, and the addresses the group's hosts reach each other on."""
    name, group = model["name"], model["nodes"]
    where = f"vllm_models ({name}).nodes"
    members = groups.get(group) if isinstance(group, str) else None
    if members is None:
        raise _fail(host, where, f"{_shown(group)} is not an inventory group; accepted: the group of the hosts that serve {name} together")
    names = [m["host"] for m in members]
    if host not in names:
        raise _fail(
            host, where, f"this host is not in group {group!r} ({', '.join(names)}); accepted: list the model on the group's hosts only"
        )
    if len(names) < 2:
        raise _fail(host, where, f"group {group!r} has one host; accepted: a group of several hosts, or no `nodes` for a model on one host")
    if model["replicas"] != 1:
        raise _fail(
            host,
            f"vllm_models ({name}).replicas",
            f"{model['replicas']}: a group of hosts runs one instance; accepted: 1 (another group for more)",
        )
    pp, nnodes, tp = model["pipeline_parallel_size"], len(names), model["tensor_parallel_size"]
    if nnodes % pp:
        raise _fail(
            host,
            f"vllm_models ({name}).pipeline_parallel_size",
            f"{pp} does not divide the {nnodes} hosts of group {group!r}; "
            f"accepted: 1 (tensor parallel across the hosts) or a divisor of {nnodes}",
        )
    for member in members:
        if member.get("problem"):
            raise _fail(
                member["host"],
                "vllm_node_interface",
                f"{member['problem']} (group {group!r}); accepted: the interface that holds vllm_node_address (the default "
                "route's address when unset), for Gloo and NCCL, or \"\" to find it",
            )
        if member.get("address") and not member.get("interface"):
            raise _fail(
                member["host"],
                "vllm_node_interface",
                f"no interface of {member['host']} holds {member['address']} (group {group!r}); accepted: the interface of "
                "vllm_node_address, for Gloo and NCCL",
            )
        if not member.get("address"):
            raise _fail(
                host,
                f"vllm_models ({name}).nodes",
                f"no address is known for {member['host']} of group {group!r} (not in this run, or no default IPv4 route); "
                "accepted: a run with every host of the group, or its vllm_node_address",
            )
    rank = names.index(host)
    port = model["rendezvous_port"] if model["rendezvous_port"] is not None else rendezvous
    backend = model["distributed_backend"]
    width = RAY_NODE_PORTS if backend == "ray" else NODE_PORTS
    if not _whole(port, 1024) or port > 65535 - width:
        raise _fail(
            host,
            f"vllm_models ({name}).rendezvous_port",
            f"{_shown(port)} is refused; accepted: a whole number from 1024 to {65535 - width} (group {group!r} takes {width} ports)",
        )
    return {
        "group": group,
        "node_rank": rank,
        "nnodes": nnodes,
        "role": "leader" if rank == 0 else "follower",
        "leader": names[0],
        "hosts": names,
        "leader_address": members[0]["address"],
        "address": members[rank]["address"],
        "interface": members[rank].get("interface") or "",
        "peers": [m["address"] for m in members if m["host"] != host],
        "rendezvous_port": port,
        # The last port of the range: where the group's hosts watch each other (vllm-launch).
        "watch_port": port + width - 1,
        "backend": backend,
        "tensor_parallel_total": tp * nnodes // pp,
        "pipeline_parallel_size": pp,
    }


def node_args(node: dict[str, Any]) -> list[str]:
    """vLLM's flags for one host of a group, after the instance's own: the sizes over the whole
    group, then either vLLM's own multi-node launcher (every host starts `vllm serve`, all but the
    leader headless) or Ray (the leader's vLLM places its workers on the group's Ray nodes)."""
    args = ["--tensor-parallel-size", str(node["tensor_parallel_total"]), "--pipeline-parallel-size", str(node["pipeline_parallel_size"])]
    if node["backend"] == "ray":
        return [*args, "--distributed-executor-backend", "ray"]
    args += ["--nnodes", str(node["nnodes"]), "--node-rank", str(node["node_rank"])]
    args += ["--master-addr", node["leader_address"], "--master-port", str(node["rendezvous_port"])]
    return args + (["--headless"] if node["role"] == "follower" else [])


def node_groups(models: Any, groups: dict[str, list[str]], hostvars: Any) -> dict[str, list[dict[str, Any]]]:
    """The inventory groups this host's models span, each as its hosts in inventory order with
    the address and interface they reach each other on: `vllm_node_address` and
    `vllm_node_interface`, else the host's default IPv4 route (facts)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for model in models if isinstance(models, list) else []:
        group = model.get("nodes") if isinstance(model, dict) else None
        if not isinstance(group, str) or group not in groups:
            continue
        members = []
        for name in groups[group]:
            hv = hostvars[name] if name in hostvars else {}
            facts = hv.get("ansible_facts") or {}
            default = facts.get("default_ipv4") or {}
            address = hv.get("vllm_node_address") or default.get("address") or ""
            # The addresses each interface holds (facts: one entry per interface, dashes as '_').
            held = {i: _ipv4_addresses(facts.get(i.replace("-", "_")) or {}) for i in facts.get("interfaces") or []}
            holding = [i for i, addresses in held.items() if address in addresses]
            found = default.get("interface") if address == default.get("address") else (holding[0] if holding else "")
            given = hv.get("vllm_node_interface")
            listed = given.replace(":", "_") if isinstance(given, str) else given  # facts list an alias eth0:1 as eth0_1
            problem = ""
            if given and held and listed not in held:
                problem = f"{given!r} is not an interface of {name} (it has {', '.join(sorted(held))})"
            elif given and held and address and address not in held[listed]:
                problem = f"{given!r} of {name} does not hold {address}" + (f" ({', '.join(holding)} does)" if holding else "")
            members.append({"host": name, "address": address, "interface": given or found or "", "problem": problem})
        out[group] = members
    return out


def _ipv4_addresses(interface: dict[str, Any]) -> set[str]:
    """The IPv4 addresses an interface's facts hold: its primary and its secondaries."""
    entries = [interface.get("ipv4") or {}, *(interface.get("ipv4_secondaries") or [])]
    return {e["address"] for e in entries if isinstance(e, dict) and e.get("address")}


# Fields the hosts of a group may set differently: the environment (interface names, CPU binding).
NODE_LOCAL_FIELDS = ("env",)
# Host settings the hosts of a group must share: they run one vLLM together.
NODE_SHARED_SETTINGS = ("vllm_version", "vllm_device", "vllm_runtime", "vllm_image", "vllm_models_dir")


def ray_start_args(node: dict[str, Any], gpus: list[int]) -> list[str]:
    """`ray start` for one host of a group (distributed_backend ray): the head on the leader, its
    GCS on the rendezvous port, a worker node elsewhere; every port Ray opens fixed inside the
    group's range, no dashboard, no usage report, in the foreground (the unit holds it). A host's
    GPUs (when known: after the driver) are given as its Ray GPUs, and as many CPUs, which bounds
    the idle workers Ray starts ahead to the worker ports it has."""
    port = node["rendezvous_port"]
    if node["role"] == "leader":
        args = ["--head", f"--port={port}", "--include-dashboard=false"]
    else:
        args = [f"--address={_url_host(node['leader_address'])}:{port}"]
    args.append(f"--node-ip-address={node['address']}")
    args += [f"{flag}={port + offset}" for flag, offset in RAY_PORT_OFFSETS.items()]
    if gpus:
        args += [f"--num-gpus={len(gpus)}", f"--num-cpus={len(gpus)}"]
    return [*args, "--disable-usage-stats", "--block"]


def launch_args(instance: dict[str, Any]) -> list[str]:
    """vllm-launch's own arguments for one host of a group: where it listens for its peers, whom
    it watches (the leader every follower, a follower the leader), this host's Ray node (Ray
    groups), and `--` before vLLM's."""
    node = instance["node"]
    watch = node["watch_port"]
    peers = node["peers"] if node["role"] == "leader" else [node["leader_address"]]
    args = ["--watch", f"{_url_host(node['address'])}:{watch}"]
    for peer in peers:
        args += ["--peer", f"{_url_host(peer)}:{watch}"]
    if node["backend"] == "ray":
        args += ["--ray-address", f"{_url_host(node['leader_address'])}:{node['rendezvous_port']}"]
        args += [f"--ray={arg}" for arg in ray_start_args(node, instance["gpus"])]
    return [*args, "--"]


def node_group_errors(servers: list[str], hostvars: Any, groups: dict[str, list[str]]) -> list[str]:
    """What the hosts of a group must agree on, checked across hosts in preflight: every host of
    the group plans the model (a host in two groups gets one group's vllm_models only), with the
    same definition, and as many GPUs."""
    errors: list[str] = []
    seen: dict[tuple[str, str], list[tuple[str, Any, Any]]] = {}
    sides: dict[tuple[str, str], list[tuple[str, dict[str, Any]]]] = {}
    for name in servers:
        hv = hostvars[name]
        for inst in hv.get("vllm_plan") or []:
            if inst.get("node"):
                model = next((m for m in hv.get("vllm_models") or [] if isinstance(m, dict) and m.get("name") == inst["model"]), None)
                model = {k: v for k, v in (model or {}).items() if k not in NODE_LOCAL_FIELDS}
                gpus = hv.get("vllm_gpus") or hv.get("nvidia_driver_gpus") or []
                seen.setdefault((inst["node"]["group"], inst["model"]), []).append(
                    (name, model, len(gpus) if isinstance(gpus, list) else gpus)
                )
                node = inst["node"]
                side = {f: hv.get(f) for f in NODE_SHARED_SETTINGS}
                side |= {
                    "the rendezvous port": node["rendezvous_port"],
                    "the leader's address": node["leader_address"],
                    "address": node["address"],
                }
                sides.setdefault((node["group"], inst["model"]), []).append((name, side))
    for (group, _), sided in sorted(sides.items()):
        first_host, first = sided[0]
        for name, side in sided[1:]:
            for field in (*NODE_SHARED_SETTINGS, "the rendezvous port", "the leader's address"):
                if side[field] != first[field]:
                    errors.append(
                        f"host {name}: {field}: {_shown(side[field])}, but {first_host} of group {group!r} has {_shown(first[field])}; "
                        "accepted: the same on every host of the group (its group_vars)"
                    )
        by_address: dict[str, str] = {}
        for name, side in sided:
            other = by_address.setdefault(side["address"], name)
            if other != name:
                errors.append(
                    f"host {name}: vllm_node_address: {side['address']} is {other}'s too (group {group!r}); accepted: each host its own"
                )
    for (group, model_name), members in sorted(seen.items()):
        planned_by = {m[0] for m in members}
        for name in groups.get(group, []):
            if name not in servers:
                errors += [
                    f"host {m[0]}: vllm_models ({model_name}).nodes: {name} of group {group!r} is not in this run; accepted: a run "
                    "with every host of the group (a group changes together: --limit all of them or none)"
                    for m in members
                ]
            elif name not in planned_by:
                others = sorted(g for g, hosts in groups.items() if name in hosts and g not in (group, "all", "ungrouped", "vllm_servers"))
                errors.append(
                    f"host {name}: vllm_models: does not plan {model_name!r}, which group {group!r} serves across its hosts"
                    + (f" (the host is also in {', '.join(map(repr, others))}, whose vllm_models it got)" if others else "")
                    + "; accepted: one group of hosts per host, the model in the group's group_vars"
                )
        first_host, first_model, first_gpus = members[0]
        for name, model, gpus in members[1:]:
            if model != first_model:
                errors.append(
                    f"host {name}: vllm_models ({model_name}): differs from its definition on {first_host}, which serves it in the same "
                    f"group {group!r} (env aside); accepted: one definition for the group (its group_vars)"
                )
            if gpus != first_gpus:
                errors.append(
                    f"host {name}: vllm_gpus: {gpus} GPU(s), but {first_host} of group {group!r} has {first_gpus}; accepted: hosts with "
                    "as many GPUs each (vLLM gives every host of a group the same share)"
                )
    return errors


def check_heads(results: list[dict[str, Any]], host: str) -> list[str]:
    """Refuse a tensor_parallel_size that does not divide the model's attention heads.

    `results` are slurp results of each tensor-parallel model's config.json, with the instance as
    `item`; a model whose config is not readable yet (a hub model not downloaded) is left to vLLM.
    Returns the models checked. Multimodal configs keep the language model's heads in a
    sub-config (text_config, llm_config, language_config)."""
    checked = []
    for result in results:
        item, content = result.get("item") or {}, result.get("content")
        world = item.get("world") or {}
        tp = int(world.get("tensor_parallel_size") or item.get("tensor_parallel_size") or 1)
        pp = int(world.get("pipeline_parallel_size") or 1)
        if not content or (tp == 1 and pp == 1):
            continue
        try:
            config = json.loads(base64.b64decode(content))
        except ValueError:
            raise _fail(host, f"vllm_models ({item['model']}).source", "its config.json is not valid JSON") from None
        for sub in ("text_config", "llm_config", "language_config"):
            if "num_attention_heads" not in config and isinstance(config.get(sub), dict):
                config = config[sub]
        heads = config.get("num_attention_heads")
        kv_heads = config.get("num_key_value_heads", heads)
        for field, value in (("num_attention_heads", heads), ("num_key_value_heads", kv_heads)):
            if isinstance(value, int) and value % tp:
                across = (
                    f" ({item['tensor_parallel_size']} per host x {tp // int(item['tensor_parallel_size'] or 1)} hosts)"
                    if item.get("node")
                    else ""
                )
                raise _fail(
                    host,
                    f"vllm_models ({item['model']}).tensor_parallel_size",
                    f"{tp}{across} does not divide the model's {field} ({value}); use a divisor of {value}",
                )
        layers = config.get("num_hidden_layers")
        if isinstance(layers, int) and layers % pp:
            raise _fail(
                host,
                f"vllm_models ({item['model']}).pipeline_parallel_size",
                f"{pp} does not divide the model's num_hidden_layers ({layers}); use a divisor of {layers}",
            )
        checked.append(item["model"])
    return checked


def plan_report(models: Any, host: str, **kwargs: Any) -> dict[str, Any]:
    """plan_instances for preflight: {"plan": [...], "error": None} or {"plan": None, "error": why},
    so that every host's problems are collected and reported together instead of one at a time."""
    try:
        return {"plan": plan_instances(models, host, **kwargs), "error": None}
    except AnsibleFilterError as err:
        return {"plan": None, "error": str(err)}
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        return {"plan": None, "error": f"host {host}: vllm_models: could not be planned: {err}"}


def planned(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The plan of a plan_report, or its refusal raised."""
    if report["error"]:
        raise AnsibleFilterError(report["error"])
    return report["plan"]


def host_errors(
    plan: list[dict[str, Any]],
    host: str,
    *,
    host_paths: list[dict[str, Any]],
    configs: list[dict[str, Any]],
    shm_mib: int | None,
    min_shm_mib: int,
    wheelhouse: str,
    ephemeral: str | None = None,
) -> list[str]:
    """What a plan needs that is not there, found before any change: model directories on the
    host and on the controller (this filter runs on the controller), the wheelhouse, heads that
    the tensor-parallel size divides, /dev/shm for tensor parallelism, and a group's ports outside
    the host's ephemeral range (`ephemeral`: /proc/sys/net/ipv4/ip_local_port_range)."""
    errors = []
    low, high = (int(p) for p in ephemeral.split()) if ephemeral else (0, -1)
    for inst in plan:
        node = inst.get("node")
        if node and node["rendezvous_port"] <= high and node["watch_port"] >= low:
            errors.append(
                f"host {host}: vllm_rendezvous_port: {node['rendezvous_port']}: the ports {node['rendezvous_port']}-{node['watch_port']} "
                f"of group {node['group']!r} reach into this host's ephemeral port range {low}-{high} "
                "(net.ipv4.ip_local_port_range), where any outgoing connection may hold one when the group starts; "
                f"accepted: a range below {low} or above {high} (the model's rendezvous_port, or vllm_rendezvous_port)"
            )
    for result in host_paths:
        item = result.get("item") or {}
        if not (result.get("stat") or {}).get("exists"):
            errors.append(
                f"host {host}: vllm_models ({item.get('model')}).source: {item.get('location')!r} does not exist on this host; "
                "accepted: a model directory on the host, controller:/path, or hf:org/name"
            )
    for source in model_sources(plan):
        if source["kind"] == "controller" and not posixpath.isfile(posixpath.join(source["location"], "config.json")):
            errors.append(
                f'host {host}: vllm_models ({source["model"]}).source: "controller:{source["location"]}" '
                "has no config.json on the controller; "
                "accepted: a model directory on the controller"
            )
    if wheelhouse:
        wheels = [f for f in os.listdir(wheelhouse) if f.endswith(".whl")] if posixpath.isdir(wheelhouse) else []
        if not wheels:
            errors.append(
                f"host {host}: vllm_wheelhouse: {wheelhouse!r} is not a directory of wheels on the controller; "
                "accepted: a directory built by playbooks/wheelhouse.yml, or empty to install from an index"
            )
    try:
        check_heads(configs, host)
    except AnsibleFilterError as err:
        errors.append(str(err))
    tp = sorted({i["model"] for i in plan if i["tensor_parallel_size"] > 1})
    if tp and shm_mib is not None and shm_mib < min_shm_mib:
        errors.append(
            f"host {host}: /dev/shm: {shm_mib} MiB is too small for the tensor-parallel instances of {', '.join(tp)}; "
            f"accepted: at least {min_shm_mib} MiB (a container host: --shm-size or --ipc=host)"
        )
    return errors


def _url_host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def systemd_command_line(argv: list[str]) -> str:
    """Quote an argv for ExecStart=: systemd expands `%` specifiers and `$VAR`, so escape both."""
    out = []
    for arg in argv:
        arg = str(arg).replace("%", "%%").replace("$", "$$")
        if not SYSTEMD_SAFE_RE.match(arg):
            arg = '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'
        out.append(arg)
    return " ".join(out)


def environment_value(value: Any) -> str:
    """A value for a systemd EnvironmentFile=, double-quoted. systemd unescapes only \\" and \\\\
    there and expands nothing, so every other character (UTF-8, $, %) is kept as written; control
    characters cannot be carried and are refused by the planner before anything is written."""
    text = str(value)
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise AnsibleFilterError("an environment value cannot hold control characters")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# The docker runtime: the key file is mounted here and read by the entrypoint below, so the key is
# in no command line (the container's, the docker client's, `ps` on the host) and in no
# `docker inspect` output. The rest of the environment is passed by name from the wrapper
# unit's own environment (`--env NAME`), so no value shows in a command line either.
CONTAINER_SECRET = "/run/secrets/vllm-api-key"
CONTAINER_LAUNCHER = "/usr/local/libexec/vllm-launch"
# Every container the role runs: no capabilities, no privilege gain, and only an image the host
# already holds (a pull would reach a registry mid-rollout).
CONTAINER_CONFINEMENT = ["--pull=never", "--cap-drop", "ALL", "--security-opt", "no-new-privileges"]
CONTAINER_ENTRYPOINT = f'VLLM_API_KEY="$(cat {CONTAINER_SECRET})" && export VLLM_API_KEY && exec "$@"'
# Inside its container an instance sees only its GPUs, numbered from 0: the host's indices in
# CUDA_VISIBLE_DEVICES would name GPUs it does not have.
HOST_ONLY_ENV = {"CUDA_VISIBLE_DEVICES"}


def container_env_names(instance: dict[str, Any], service_env: dict[str, Any]) -> list[str]:
    """The variables a container gets from its wrapper unit: the service's, then the instance's.
    Passed by name, so no value is in a command line; `docker inspect` (root only, through the
    engine's socket) shows the values, which is why the key is not among them."""
    return sorted(set(service_env) | {k for k in instance["env"] if k not in HOST_ONLY_ENV})


def container_argv(
    instance: dict[str, Any],
    *,
    image: str,
    uid: Any,
    gid: Any,
    service_env: dict[str, Any],
    key_file: str,
    writable: list[str],
    shm: str = "host",
    start_timeout: int = 1800,
    docker: str = "/usr/bin/docker",
    python: str = "python3",
    launcher: str = "",
) -> list[str]:
    """`docker run` for one instance, run in the foreground by its systemd unit (which owns
    restarts, the health gate and logs). Host networking keeps every socket where the venv
    runtime has it (the API on the instance's address, vLLM's internal ones on loopback) and under
    the same nftables rules; published ports would bypass them. The model directory is mounted
    read-only at the same path, so the command line is the venv runtime's, unchanged."""
    argv = [docker, "run", "--rm", "--name", f"vllm-{instance['name']}", *CONTAINER_CONFINEMENT, "--network", "host"]
    argv += ["--user", f"{uid}:{gid}", "--read-only", "--tmpfs", "/tmp:rw,nosuid,nodev,size=1g"]
    argv += ["--ipc", "host"] if shm == "host" else ["--shm-size", str(shm)]
    argv += ["--log-driver", "json-file", "--log-opt", "max-size=50m", "--log-opt", "max-file=3"]
    # No --ulimit: a container inherits the engine's limits (docker.service: as many open files
    # as the kernel allows; daemon.json "default-ulimits" to change), and an engine without
    # CAP_SYS_RESOURCE (Docker in Docker) cannot raise them per container.
    argv += ["--stop-timeout", "80"]
    if instance["health_url"]:
        probe = f"import urllib.request as u; u.urlopen('{instance['health_url']}', timeout=5)"
        argv += ["--health-cmd", f'{python} -c "{probe}"', "--health-interval", "30s", "--health-timeout", "10s"]
        argv += ["--health-start-period", f"{int(start_timeout)}s"]
    if instance["gpus"]:
        argv += ["--gpus", '"device=' + ",".join(str(g) for g in instance["gpus"]) + '"']
    if instance.get("cpus"):
        argv += ["--cpuset-cpus", instance["cpus"], "--cpuset-mems", str(instance["numa_node"])]
    for name in container_env_names(instance, service_env):
        argv += ["--env", name]
    argv += ["--volume", f"{instance['model_path']}:{instance['model_path']}:ro"]
    argv += [arg for path in writable for arg in ("--volume", f"{path}:{path}:rw")]
    argv += ["--volume", f"{key_file}:{CONTAINER_SECRET}:ro"]
    node = instance.get("node")
    if node:
        # One host of a group: vllm-launch (mounted from the host) runs `vllm serve` and the watch.
        argv += ["--volume", f"{launcher}:{CONTAINER_LAUNCHER}:ro"]
    argv += ["--entrypoint", "/bin/sh", image, "-c", CONTAINER_ENTRYPOINT, "vllm"]
    if node:
        return [*argv, python, CONTAINER_LAUNCHER, *launch_args(instance), *instance["args"]]
    return [*argv, python, "-m", "vllm.entrypoints.openai.api_server", *instance["args"]]


def hf_container_argv(image: str, models_dir: str, docker: str = "docker") -> list[str]:
    """The image's own `hf` client in a throwaway container, confined like an instance, writing
    into the models directory only (a docker host has no virtualenv to run it from)."""
    argv = [docker, "run", "--rm", *CONTAINER_CONFINEMENT, "--network", "host"]
    argv += [arg for name in ("HF_TOKEN", "HF_ENDPOINT", "HF_HUB_DISABLE_TELEMETRY") for arg in ("--env", name)]
    return [*argv, "--volume", f"{models_dir}:{models_dir}:rw", "--entrypoint", "hf", image]


def archive_image_id(manifest: str, image: str, strict: bool = True) -> str:
    """The image id (`sha256:<config digest>`, what `docker image inspect` reports) of `image` in a
    `docker save` archive's manifest.json. The archive must name it: an archive left over from
    another version is refused, not loaded under a name it does not hold. Not `strict` (the
    playbook that writes the archive): "" for an archive that does not hold it."""
    if not strict:
        try:
            return archive_image_id(manifest, image)
        except AnsibleFilterError:
            return ""
    try:
        entries = json.loads(manifest)
    except ValueError as exc:
        raise AnsibleFilterError(f"vllm_image_archive: manifest.json is not JSON ({exc})") from exc
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "Config" in e for e in entries):
        raise AnsibleFilterError("vllm_image_archive: manifest.json is not a docker save manifest")
    named = [e for e in entries if image in (e.get("RepoTags") or [])]
    if len(named) != 1:
        tags = sorted(t for e in entries for t in e.get("RepoTags") or [])
        raise AnsibleFilterError(f"vllm_image_archive holds no image named {image!r} (it holds {tags})")
    digest = posixpath.basename(named[0]["Config"]).removesuffix(".json")
    return f"sha256:{digest}"


# vLLM prefixes every line of a traceback with its log header; the reason is the exception line.
LOG_PREFIX_RE = re.compile(r"^(\(\w+ pid=\d+\) )?((ERROR|WARNING|INFO|DEBUG)( \d\d-\d\d [\d:]+)? \[[^\]]+\] ?)?")
REASON_RE = re.compile(r"^\s*[\w.]*(Error|Exception)\b: \S")


def journal_summary(output: str, errors: int = 8, tail: int = 12) -> str:
    """The exception lines first (a start failure ends in a long traceback whose last lines
    rarely say why), then the journal's tail, without repeats."""
    lines = [line.rstrip() for line in output.splitlines() if line.strip()]
    found: list[str] = []
    for line in lines:
        text = LOG_PREFIX_RE.sub("", line).strip()
        if REASON_RE.match(text) and text not in found:
            found.append(text)
    parts = ["Errors:", *found[-errors:], ""] if found else []
    return "\n".join([*parts, "Last lines:", *lines[-tail:]])


def model_sources(instances: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The distinct models a host must fetch (replicas share one copy on disk)."""
    by_path: dict[str, dict[str, Any]] = {}
    for inst in instances:
        by_path.setdefault(inst["model_path"], {"dest": inst["model_path"], "model": inst["model"], **inst["source"]})
    return list(by_path.values())


def gateway_servers(names: list[str], hostvars: Any, gateway: str) -> list[dict[str, Any]]:
    """How gateway `gateway` reaches each serving host: [{host, address, plan}]."""
    servers = []
    for name in names:
        hv = hostvars[name]
        if "vllm_plan" not in hv:
            raise AnsibleFilterError(f"host {name}: no instance plan; run the gateway through site.yml so preflight plans every host")
        # A group's followers serve through their leader: the gateway sees one instance.
        plan = [i for i in hv["vllm_plan"] if i.get("role") != "follower"]
        if not plan:
            # Nothing to route to here (only followers), but the host is still a serving host.
            servers.append({"host": name, "address": "", "plan": []})
            continue
        listen = str(plan[0]["listen_address"])
        if listen in ("0.0.0.0", "::"):
            address = "127.0.0.1" if name == gateway else str(hv.get("ansible_host", name))
        elif (listen.startswith("127.") or listen == "::1") and name != gateway:
            raise AnsibleFilterError(
                f"host {name}: vllm_listen_address: {listen} is only reachable from {name} itself, "
                f"but gateway {gateway} is another host; leave vllm_listen_address at its default"
            )
        else:
            address = listen
        servers.append({"host": name, "address": address, "plan": plan})
    return servers


def gateway_models(servers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Group every instance of every serving host by model, for the gateway's upstreams.

    `servers` is [{host, address, plan}], where address is how the gateway reaches that host.
    A model with a fallback gets the fallback's instances as backup servers.
    """
    by_model: dict[str, dict[str, Any]] = {}
    for server in servers:
        for inst in server["plan"]:
            entry = by_model.setdefault(
                inst["model"],
                {
                    "name": inst["model"],
                    "upstream": "vllm_" + re.sub(r"[^A-Za-z0-9_]", "_", inst["model"]),
                    "fallback": inst["fallback"],
                    "servers": [],
                },
            )
            if entry["fallback"] != inst["fallback"]:
                raise AnsibleFilterError(f"host {server['host']}: vllm_models ({inst['model']}).fallback differs between serving hosts")
            entry["servers"].append(
                {
                    "host": server["host"],
                    "instance": inst["name"],
                    "id": f"{inst['name']}@{server['host']}",
                    "address": f"{_url_host(server['address'])}:{inst['port']}",
                }
            )
    # nginx compares upstream names without case, and the upstream name turns '.' and '-' into '_'.
    upstreams: dict[str, str] = {}
    for entry in by_model.values():
        other = upstreams.setdefault(entry["upstream"].lower(), entry["name"])
        if other != entry["name"]:
            raise AnsibleFilterError(
                f"vllm_models: the model names {other!r} and {entry['name']!r} are one name to nginx (case, '.', '-' and '_' aside); "
                "accepted: names that differ in a letter or digit"
            )
    for entry in by_model.values():
        fallback = entry["fallback"]
        if fallback is not None and fallback not in by_model:
            raise AnsibleFilterError(f"vllm_models ({entry['name']}).fallback: no serving host runs a model named {fallback!r}")
        entry["backups"] = by_model[fallback]["servers"] if fallback else []
    return sorted(by_model.values(), key=lambda e: e["name"])


def instance_changes(instances: list[dict[str, Any]], active: list[str], *changed: list[bool]) -> list[dict[str, Any]]:
    """Each planned instance as {name, model, state}: `new` when it does not serve (never
    started, stopped, failed, or starting), `changed` when it serves but one of its files would
    change (`changed`: one list per file kind, in plan order: drop-in, environment, and the key
    file of a container; an empty list when that kind is not used), else `same`."""
    kinds = [list(kind) for kind in changed]
    out = []
    for i, (inst, state) in enumerate(zip(instances, active, strict=True)):
        touched = any(kind[i] for kind in kinds if kind)
        kind = "new" if state.strip() != "active" else "changed" if touched else "same"
        node = inst.get("node") or {}
        out.append({"name": inst["name"], "model": inst["model"], "state": kind, "group": node.get("group"), "role": node.get("role")})
    return out


def _step(setting: Any, total: int) -> int:
    """A batch size: a count, or a percentage ('25%') of `total`, at least 1."""
    if isinstance(setting, str) and setting.endswith("%"):
        return max(1, math.floor(total * int(setting[:-1]) / 100))
    return max(1, int(setting))


def rollout_batches(hosts: list[str], hostvars: Any, gateways: list[str], batch: Any = 1, serial: Any = 1) -> list[dict[str, Any]]:
    """The order in which instances that serve and whose configuration changed are restarted:
    [{"instances": [{host, name, model}], "unavailable": [models with no instance left serving]}].

    Each host's `__vllm_changes` lists its planned instances as {name, model, state}, state being
    new (not serving: started at once, elsewhere), changed or same. With a gateway in front, a
    batch holds at most `batch` instances of each model (a count, or a percentage of that model's
    instances on all hosts), so a model keeps its other instances serving while a batch is drained
    and restarted; different models change in the same batch. A model with one instance has none
    left while it restarts: the batch says so. Without a gateway nothing can drain, so whole hosts
    change, `serial` of them at a time (a count or a percentage of hosts). Every host computes the
    same list from the same hostvars, so all of them walk it in step.
    """
    changes = {h: list(hostvars[h].get("__vllm_changes") or []) for h in hosts}
    # The hosts of a group serve one instance: a change on one restarts it on all of them.
    regrouped = {i["group"] for h in hosts for i in changes[h] if i.get("group") and i["state"] == "changed"}
    changes = {
        h: [{**i, "state": "changed"} if i.get("group") in regrouped and i["state"] == "same" else i for i in v] for h, v in changes.items()
    }

    def key(host: str, inst: dict[str, Any]) -> tuple[str, str]:
        # An instance served by a group of hosts is one instance wherever it appears.
        return (inst["model"], f"group {inst['group']}" if inst.get("group") else f"{host}/{inst['name']}")

    totals: dict[str, set[tuple[str, str]]] = {}
    for host in hosts:
        for inst in changes[host]:
            totals.setdefault(inst["model"], set()).add(key(host, inst))
    groups: list[list[dict[str, Any]]] = []
    if gateways:
        queues: dict[str, dict[tuple[str, str], list[dict[str, Any]]]] = {}
        for host in hosts:
            for inst in changes[host]:
                if inst["state"] == "changed":
                    entry = {"host": host, "name": inst["name"], "model": inst["model"]}
                    entry |= {"group": inst.get("group"), "role": inst.get("role")}
                    queues.setdefault(inst["model"], {}).setdefault(key(host, inst), []).append(entry)
        for model, queue in queues.items():
            size = _step(batch, len(totals[model]))
            units = list(queue.values())
            for k in range(0, len(units), size):
                if k // size == len(groups):
                    groups.append([])
                groups[k // size].extend(e for unit in units[k : k + size] for e in unit)
    else:
        # Whole hosts change, `serial` at a time; the hosts of a group count as one and change together.
        touched = [h for h in hosts if any(i["state"] == "changed" for i in changes[h])]
        clusters: list[list[str]] = []
        for h in touched:
            mine = {i.get("group") for i in changes[h] if i["state"] == "changed" and i.get("group")}
            home = next((c for c in clusters if any(mine & {i.get("group") for i in changes[o] if i.get("group")} for o in c)), None)
            if home is None:
                clusters.append([h])
            else:
                home.append(h)
        size = _step(serial, len(hosts))
        groups = [
            [
                {"host": h, "name": i["name"], "model": i["model"], "group": i.get("group"), "role": i.get("role")}
                for cluster in clusters[k : k + size]
                for h in cluster
                for i in changes[h]
                if i["state"] == "changed"
            ]
            for k in range(0, len(clusters), size)
        ]
    out = []
    for group in groups:
        units: dict[str, set[tuple[str, str]]] = {}
        for inst in group:
            units.setdefault(inst["model"], set()).add(key(inst["host"], inst))
        spanning = sorted({i["group"] for i in group if i.get("group")})
        out.append(
            {
                "instances": group,
                "unavailable": sorted(m for m, n in units.items() if len(n) >= len(totals[m])),
                "groups": spanning,
            }
        )
    return out


def gateway_report(names: list[str], hostvars: Any, gateway: str, balancing: str = "least_conn") -> dict[str, Any]:
    """The gateway's upstreams for preflight, from the serving hosts whose own checks passed
    (they report their own problems): {"plan": [...], "errors": [...]}."""
    sound = [n for n in names if not hostvars[n].get("__preflight_settings_errors") and not hostvars[n].get("vllm_preflight_errors")]
    try:
        plan = gateway_models(gateway_servers(sound, hostvars, gateway))
    except AnsibleFilterError as err:
        text = str(err)
        return {"plan": None, "errors": [text if text.startswith("host ") else f"host {gateway}: {text}"]}
    errors = []
    if len(sound) == len(names) and not plan:
        errors.append(f"host {gateway}: vllm_servers: no serving host plans an instance; accepted: at least one model on one host")
    if balancing == "hash" and any(m["fallback"] for m in plan):
        with_fallback = ", ".join(m["name"] for m in plan if m["fallback"])
        errors.append(
            f'host {gateway}: gateway_balancing: "hash" cannot serve the fallback of {with_fallback} (nginx has no backup servers '
            "with hash); accepted: least_conn or round_robin, or no fallback"
        )
    return {"plan": plan, "errors": errors}


def firewall_ports(instances: list[dict[str, Any]], manifest: str, configured: list[str]) -> list[int]:
    """Ports the firewall covers: the planned instances', and those of instances still configured
    on the host that the plan dropped (`manifest`: the last run's instances.json, base64)."""
    planned = {i["name"] for i in instances}
    instances = [i for i in instances if i.get("port") is not None]
    try:
        last = json.loads(base64.b64decode(manifest)) if manifest else []
    except ValueError:
        last = []
    leaving = [i["port"] for i in last if isinstance(i, dict) and i.get("name") in set(configured) - planned and i.get("port")]
    return sorted({int(i["port"]) for i in instances} | {int(p) for p in leaving})


def stale_ids(hostvars: Any, hosts: list[str]) -> list[str]:
    """<host>/<instance> of every instance that preflight no longer plans, on all hosts."""
    return [f"{h}/{name}" for h in hosts for name in (hostvars[h].get("__vllm_stale") or [])]


def gateway_routes(models: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """What the gateway's router reads: per model its upstream, fallback and instance ids."""
    return {m["name"]: {"upstream": m["upstream"], "fallback": m["fallback"], "instances": [s["id"] for s in m["servers"]]} for m in models}


def gateway_instances(models: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Every instance behind the gateway once, {id, address}: its /health and /metrics routes."""
    return [{"id": s["id"], "address": s["address"]} for m in models for s in m["servers"]]


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {
            "vllm_parse_source": parse_source,
            "vllm_plan_instances": plan_instances,
            "vllm_plan_report": plan_report,
            "vllm_planned": planned,
            "vllm_host_errors": host_errors,
            "vllm_check_heads": check_heads,
            "vllm_model_sources": model_sources,
            "vllm_systemd_command_line": systemd_command_line,
            "vllm_container_argv": container_argv,
            "vllm_hf_container_argv": hf_container_argv,
            "vllm_archive_image_id": archive_image_id,
            "vllm_container_env_names": container_env_names,
            "vllm_environment_value": environment_value,
            "vllm_journal_summary": journal_summary,
            "vllm_gateway_models": gateway_models,
            "vllm_gateway_servers": gateway_servers,
            "vllm_gateway_report": gateway_report,
            "vllm_rollout_batches": rollout_batches,
            "vllm_instance_changes": instance_changes,
            "vllm_stale_ids": stale_ids,
            "vllm_firewall_ports": firewall_ports,
            "vllm_gateway_routes": gateway_routes,
            "vllm_gateway_instances": gateway_instances,
            "vllm_node_groups": node_groups,
            "vllm_launch_args": launch_args,
            "vllm_node_group_errors": node_group_errors,
        }
