"""daemon.json is merged into, never overwritten."""

from __future__ import annotations

import json

import pytest
from docker_daemon import AnsibleFilterError, daemon_json_merge

# What `nvidia-ctk runtime configure --runtime=docker --set-as-default` leaves, plus a site's own keys.
WRITTEN_BY_OTHERS = json.dumps(
    {
        "default-runtime": "nvidia",
        "runtimes": {"nvidia": {"args": [], "path": "nvidia-container-runtime"}},
        "registry-mirrors": ["https://mirror.example.internal"],
        "log-opts": {"max-size": "10m"},
    },
    indent=4,
)


def test_keys_other_tools_wrote_survive():
    merged = daemon_json_merge(WRITTEN_BY_OTHERS, {"log-opts": {"max-file": "3"}, "live-restore": True})
    assert merged["runtimes"] == {"nvidia": {"args": [], "path": "nvidia-container-runtime"}}
    assert merged["registry-mirrors"] == ["https://mirror.example.internal"]
    assert merged["log-opts"] == {"max-size": "10m", "max-file": "3"}
    assert merged["live-restore"] is True


def test_lists_and_scalars_are_replaced_and_none_deletes():
    merged = daemon_json_merge(WRITTEN_BY_OTHERS, {"registry-mirrors": [], "default-runtime": None})
    assert merged["registry-mirrors"] == [] and "default-runtime" not in merged


def test_same_settings_merge_to_the_same_data():
    first = daemon_json_merge("", {"live-restore": True})
    assert daemon_json_merge(json.dumps(first), {"live-restore": True}) == first == {"live-restore": True}


@pytest.mark.parametrize(("text", "message"), [("{broken", "not valid JSON"), ("[1, 2]", "JSON object")])
def test_a_broken_file_is_refused_not_replaced(text, message):
    with pytest.raises(AnsibleFilterError, match=message):
        daemon_json_merge(text, {"live-restore": True})
