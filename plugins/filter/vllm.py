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
MODEL_DEFAULTS: dict[str, Any] = {"tensor_parallel_size": 1, "replicas": 1, "extra_args": [], "env": {}, "fallback": None, "gpus": None}
# vLLM's own default share of each GPU's memory.
VLLM_DEFAULT_GPU_MEMORY_UTILIZATION = 0.9
# The role sets these itself; in extra_args they would clash, or (the key) leak into `ps`.
MANAGED_FLAGS = {
    "--api-key": "the API key is passed through the environment file (vllm_api_key), never on a command line",
    "--host": "set vllm_listen_address",
    "--port": "ports are planned from vllm_port_base",
    "--model": "set the model's source",
    "--served-model-name": "set the model's name",
    "--tensor-parallel-size": "set the model's tensor_parallel_size",
    "-tp": "set the model's tensor_parallel_size",
}
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


def _validate_model(host: str, index: int, model: dict[str, Any]) -> dict[str, Any]:
    where = f"vllm_models[{index}]"
    if not isinstance(model, dict):
        raise _fail(host, where, "each model must be a mapping with at least name and source")
    model = {**MODEL_DEFAULTS, **model}
    name = model.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise _fail(host, f"{where}.name", f"{name!r} must be 1-63 letters, digits, '.', '_' or '-'")
    where = f"vllm_models[{index}] ({name})"
    for field in ("replicas", "tensor_parallel_size"):
        value = model[field]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _fail(host, f"{where}.{field}", f"must be a whole number >= 1, got {value!r}")
    util = model.get("gpu_memory_utilization")
    if util is not None and not (isinstance(util, (int, float)) and 0 < util <= 1):
        raise _fail(host, f"{where}.gpu_memory_utilization", f"must be in (0, 1], got {util!r}")
    if not isinstance(model["extra_args"], list):
        raise _fail(host, f"{where}.extra_args", "must be a list of strings, e.g. ['--enable-chunked-prefill']")
    for arg in model["extra_args"]:
        flag = str(arg).split("=", 1)[0]
        if flag in MANAGED_FLAGS:
            raise _fail(host, f"{where}.extra_args", f"{flag} is not allowed here: {MANAGED_FLAGS[flag]}")
    if not isinstance(model["env"], dict):
        raise _fail(host, f"{where}.env", "must be a mapping of variable names to values")
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
) -> list[dict[str, Any]]:
    """Expand models x replicas into this host's instances: name, port, GPUs, argv, env.

    `gpus` is the host's GPU indices (the operator's override) or its GPU facts (nvidia_gpu_facts,
    which add NVLink/PCIe topology and NUMA affinity); None means a host without GPUs (the CPU
    build), where no GPU is pinned. Tensor-parallel instances get the best-connected free GPUs and
    are bound to their NUMA node's CPUs; `nccl_env` goes into every tensor-parallel instance's
    environment (the model's own env wins). Names are `<model>-<replica>` so that
    adding a replica never renames, and so never restarts, the instances already running.
    """
    if not isinstance(models, list) or not models:
        raise _fail(host, "vllm_models", "must be a non-empty list of models")
    validated = [_validate_model(host, i, model) for i, model in enumerate(models)]
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
    for model in validated:
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
            env = {str(k): str(v) for k, v in (nccl_env or {}).items()} if model["tensor_parallel_size"] > 1 else {}
            env.update({str(k): str(v) for k, v in model["env"].items()})
            if free_gpus is not None:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in assigned)
            health_host = "127.0.0.1" if listen_address in ("0.0.0.0", "::") else listen_address
            instances.append(
                {
                    "name": name,
                    "model": model["name"],
                    "replica": replica,
                    "listen_address": listen_address,
                    "port": port,
                    "gpus": assigned,
                    "tensor_parallel_size": model["tensor_parallel_size"],
                    "numa_node": numa_node,
                    "cpus": cpu_ranges(cpus),
                    "source": model["source_parsed"],
                    "model_path": model["path"],
                    "fallback": model["fallback"],
                    "args": serve_args(model, path=model["path"], host=listen_address, port=port, aliases=aliases.get(model["name"], [])),
                    "env": env,
                    "health_url": f"http://{_url_host(health_host)}:{port}/health",
                }
            )
            port += 1
    for gpu, users in sorted(shared_use.items()):
        total = sum(u for _, u in users)
        if total > 1.0 + 1e-9:
            detail = ", ".join(f"{n} {u:g}" for n, u in users)
            raise _fail(host, "vllm_models.gpu_memory_utilization", f"GPU {gpu} is shared by {detail}: {total:g} > 1.0")
    return instances


def check_heads(results: list[dict[str, Any]], host: str) -> list[str]:
    """Refuse a tensor_parallel_size that does not divide the model's attention heads.

    `results` are slurp results of each tensor-parallel model's config.json, with the instance as
    `item`; a model whose config is not readable yet (a hub model not downloaded) is left to vLLM.
    Returns the models checked. Multimodal configs keep the language model's heads in a
    sub-config (text_config, llm_config, language_config)."""
    checked = []
    for result in results:
        item, content = result.get("item") or {}, result.get("content")
        tp = int(item.get("tensor_parallel_size") or 1)
        if not content or tp == 1:
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
                raise _fail(
                    host,
                    f"vllm_models ({item['model']}).tensor_parallel_size",
                    f"{tp} does not divide the model's {field} ({value}); use a divisor of {value}",
                )
        checked.append(item["model"])
    return checked


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
        plan = hv["vllm_plan"]
        if not plan:
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
                {"host": server["host"], "instance": inst["name"], "address": f"{_url_host(server['address'])}:{inst['port']}"}
            )
    upstreams = {e["upstream"]: e["name"] for e in by_model.values()}
    if len(upstreams) != len(by_model):
        raise AnsibleFilterError("two model names map to the same gateway upstream; rename one (letters, digits, '_')")
    for entry in by_model.values():
        fallback = entry["fallback"]
        if fallback is not None and fallback not in by_model:
            raise AnsibleFilterError(f"vllm_models ({entry['name']}).fallback: no serving host runs a model named {fallback!r}")
        entry["backups"] = by_model[fallback]["servers"] if fallback else []
    return sorted(by_model.values(), key=lambda e: e["name"])


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {
            "vllm_parse_source": parse_source,
            "vllm_plan_instances": plan_instances,
            "vllm_check_heads": check_heads,
            "vllm_model_sources": model_sources,
            "vllm_systemd_command_line": systemd_command_line,
            "vllm_journal_summary": journal_summary,
            "vllm_gateway_models": gateway_models,
            "vllm_gateway_servers": gateway_servers,
        }
