"""Filters for NVIDIA GPU hosts: which PCI devices are GPUs, what `nvidia-smi` says about them,
how they are connected, and which driver packages a distribution needs.

The roles run the commands; these filters turn their text into data, with pytest tests over
outputs captured on real machines (tests/unit/fixtures/nvidia-smi, sources named there).
"""

from __future__ import annotations

import re
from typing import Any

try:
    from ansible.errors import AnsibleFilterError
except ImportError:  # pragma: no cover - the unit tests import this module without Ansible too

    class AnsibleFilterError(Exception):  # type: ignore[no-redef]
        pass


NVIDIA_VENDOR = "0x10de"
# PCI classes of GPUs: VGA controller (0x0300) and 3D controller (0x0302). NVSwitch bridges
# (0x0680) and the GPUs' audio functions (0x0403) share the vendor and are not GPUs.
GPU_CLASSES = ("0x0300", "0x0302")

# The fields the roles query, in order: nvidia-smi --query-gpu=<these> --format=csv,noheader,nounits
QUERY_FIELDS = ("index", "uuid", "name", "memory.total", "driver_version", "pci.bus_id", "persistence_mode")
_INT_FIELDS = {"index", "memory.total", "memory.used", "memory.free", "count"}


def pci_gpus(listing: str) -> list[dict[str, str]]:
    """NVIDIA GPUs among PCI devices, from lines of `<address> <vendor> <class>` as read from
    /sys/bus/pci/devices/*/{vendor,class}. No lspci needed (minimal images lack pciutils)."""
    found = []
    for line in listing.splitlines():
        parts = line.split()
        if len(parts) != 3:
            continue
        address, vendor, pci_class = parts
        if vendor.lower() == NVIDIA_VENDOR and pci_class.lower()[:6] in GPU_CLASSES:
            found.append({"address": address.rsplit("/", 1)[-1], "class": pci_class.lower()})
    return found


def _value(field: str, raw: str) -> Any:
    raw = raw.strip()
    if raw in ("N/A", "[N/A]", "[Not Supported]", ""):
        return None
    if field in _INT_FIELDS:
        return int(raw.split()[0])  # "81559 MiB" without nounits
    return raw


def parse_query_gpu(output: str, fields: list[str] | tuple[str, ...] = QUERY_FIELDS) -> list[dict[str, Any]]:
    """Rows of `nvidia-smi --query-gpu=<fields> --format=csv,noheader[,nounits]` as dicts keyed
    by field name (dots become underscores). A header line, if present, is skipped."""
    gpus = []
    keys = [f.replace(".", "_") for f in fields]
    for line in output.splitlines():
        if not line.strip() or line.replace(" ", "").lower().startswith(fields[0].lower() + ","):
            continue
        # Names may hold commas only in theory; split from the left on the known field count.
        values = [v for v in line.split(", ")] if ", " in line else line.split(",")
        if len(values) != len(fields):
            raise AnsibleFilterError(f"nvidia-smi printed {len(values)} values for {len(fields)} fields: {line!r}")
        gpus.append({k: _value(f, v) for k, f, v in zip(keys, fields, values, strict=True)})
    return gpus


def _cpu_list(text: str | None) -> list[int]:
    """'0-3,8,10-11' -> [0, 1, 2, 3, 8, 10, 11]."""
    cpus: list[int] = []
    if not text or text == "N/A":
        return cpus
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def parse_topology(output: str) -> dict[int, dict[str, Any]]:
    """`nvidia-smi topo -m` -> {gpu index: {links: {other index: 'NV18'|'PIX'|...}, cpus: [..],
    numa_node: int|None}}.

    Copes with both layouts nvidia-smi has printed (tabs or spaces, with or without the NUMA
    Affinity and GPU NUMA ID columns), NIC/mlx columns between the GPUs and the affinity columns,
    and pastes that lost a tab between two NIC columns: the GPU columns are read from the left,
    the affinity columns from the right.
    """
    lines = [line.rstrip() for line in output.splitlines()]
    start = next((i for i, line in enumerate(lines) if line.split()[:1] == ["GPU0"] and line.split()[1:2] != ["X"]), None)
    if start is None:
        raise AnsibleFilterError("no topology matrix (a header line starting with GPU0) in the nvidia-smi topo -m output")
    header = lines[start]
    for name in ("CPU Affinity", "NUMA Affinity", "GPU NUMA ID"):
        header = header.replace(name, name.replace(" ", "_"))
    columns = header.split()
    gpu_columns = [c for c in columns if re.fullmatch(r"GPU\d+", c)]
    tail = [c for c in columns if c in ("CPU_Affinity", "NUMA_Affinity", "GPU_NUMA_ID")]
    gpus: dict[int, dict[str, Any]] = {}
    for line in lines[start + 1 :]:
        cells = line.split()
        if not cells:
            break
        if not re.fullmatch(r"GPU\d+", cells[0]):
            continue
        index = int(cells[0][3:])
        links = {}
        for column, cell in zip(gpu_columns, cells[1 : 1 + len(gpu_columns)], strict=False):
            other = int(column[3:])
            if other != index:
                links[other] = cell
        # From the right; an empty last column (GPU NUMA ID) vanishes in a space-separated paste.
        right: dict[str, str] = {}
        for width in (len(tail), len(tail) - 1):
            if width > 0 and len(cells) > width:
                right = dict(zip(tail, cells[len(cells) - width :], strict=False))
                if re.fullmatch(r"[\d,-]+|N/A", right.get("CPU_Affinity", "")):
                    break
                right = {}
        numa = right.get("NUMA_Affinity")
        gpus[index] = {
            "links": links,
            "cpus": _cpu_list(right.get("CPU_Affinity")),
            "numa_node": int(numa) if numa and numa.isdigit() else None,
        }
    if not gpus:
        raise AnsibleFilterError("the nvidia-smi topo -m matrix has no GPU rows")
    return gpus


def gpu_facts(query_output: str, topology_output: str = "") -> list[dict[str, Any]]:
    """One fact per GPU: index, uuid, name, memory_total_mib, driver_version, pci_bus_id,
    persistence_mode, and from the topology links, numa_node and cpus (CPU affinity)."""
    gpus = parse_query_gpu(query_output)
    topology = parse_topology(topology_output) if topology_output.strip() else {}
    facts = []
    for gpu in gpus:
        topo = topology.get(gpu["index"], {})
        facts.append(
            {
                "index": gpu["index"],
                "uuid": gpu["uuid"],
                "name": gpu["name"],
                "memory_total_mib": gpu["memory_total"],
                "driver_version": gpu["driver_version"],
                "pci_bus_id": gpu["pci_bus_id"],
                "persistence_mode": gpu["persistence_mode"],
                "links": {str(k): v for k, v in topo.get("links", {}).items()},
                "numa_node": topo.get("numa_node"),
                "cpus": topo.get("cpus", []),
            }
        )
    return facts


# Driver packages per distribution family. Branch and module flavour come from the operator;
# everything distribution-specific is here, so a new distribution is a new entry plus tests.
def driver_packages(distribution: str, major: str, branch: str, modules: str = "open", prebuilt: bool = False) -> list[str]:
    """Packages that give a headless server the NVIDIA driver `branch` with `modules` ('open' or
    'proprietary') kernel modules, built by DKMS or (Ubuntu, `prebuilt`) signed by Canonical."""
    if modules not in ("open", "proprietary"):
        raise AnsibleFilterError(f"nvidia_driver_modules must be 'open' or 'proprietary', got {modules!r}")
    family = distribution.lower()
    if family == "ubuntu":
        suffix = f"{branch}-server" + ("-open" if modules == "open" else "")
        if prebuilt:
            return [f"nvidia-headless-no-dkms-{suffix}", f"nvidia-utils-{branch}-server", f"linux-modules-nvidia-{suffix}-generic"]
        return [f"nvidia-headless-{suffix}", f"nvidia-utils-{branch}-server", "linux-headers-generic"]
    if family == "debian":
        if prebuilt:
            raise AnsibleFilterError("Debian has no prebuilt signed NVIDIA modules: set nvidia_driver_prebuilt_modules: false")
        if modules == "open":
            # Measured 2026-11: bookworm's nvidia-open-kernel-dkms (535.261) lags its other driver
            # packages (535.309 in bookworm-updates) and needs their older firmware: apt refuses.
            raise AnsibleFilterError(
                "Debian 12's open-module package lags its other driver packages and cannot be installed with them: "
                "set nvidia_driver_modules: proprietary"
            )
        return ["nvidia-kernel-dkms", "nvidia-smi", "nvidia-persistenced", "libcuda1", "linux-headers-amd64"]
    raise AnsibleFilterError(f"no NVIDIA driver packages known for {distribution} {major}; supported: Ubuntu 22.04/24.04, Debian 12")


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {
            "nvidia_pci_gpus": pci_gpus,
            "nvidia_gpu_facts": gpu_facts,
            "nvidia_driver_packages": driver_packages,
        }
