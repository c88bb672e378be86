"""CapsNetConfig: frozen, hashable, stable id, JSON round trip, clear errors."""

import json
import os
import subprocess
import sys

import pytest

from capsbench.models import CapsNetConfig


def test_config_round_trips_through_json_and_keeps_its_id():
    cfg = CapsNetConfig(intermediate=((16, 12), (8, 8)), routing_iters=5)
    again = CapsNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.id == cfg.id


def test_config_id_changes_with_any_field_and_is_stable_across_processes():
    a = CapsNetConfig()
    assert a.id != CapsNetConfig(routing_iters=2).id
    assert a.id != CapsNetConfig(intermediate=((16, 12),)).id
    # Ids must not depend on dict order or Python's hash seed: another process with another seed agrees.
    code = "from capsbench.models import CapsNetConfig; print(CapsNetConfig().id)"
    other = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
    )
    assert other.stdout.strip() == a.id and len(a.id) == 10


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        CapsNetConfig().routing_iters = 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"backbone": "resnet"}, "unknown backbone"),
        ({"routing_iters": 0}, "routing_iters"),
        ({"primary_layout": "weird"}, "primary_layout"),
        ({"backbone_channels": (8, 8)}, "has 3 convs"),
    ],
)
def test_bad_config_says_what_is_wrong(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CapsNetConfig(**kwargs)


def test_unknown_field_in_json_is_refused():
    with pytest.raises(ValueError, match="unknown CapsNetConfig fields"):
        CapsNetConfig.from_dict({"backbone": "sahu", "capsules": 3})
