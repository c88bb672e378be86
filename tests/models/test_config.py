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


@pytest.mark.slow
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


def test_fields_added_later_keep_the_ids_of_older_configs_and_read_old_json_as_the_old_network():
    """A config written before caps_init/backbone_width existed has neither key: it reads back as fan_in and
    fixed width (what built it), and a config holding those values still has its old id."""
    old = CapsNetConfig(caps_init="fan_in", backbone_width="fixed")
    d = old.to_dict()
    assert "caps_init" not in d and "backbone_width" not in d
    assert CapsNetConfig.from_dict(d) == old
    new = CapsNetConfig()
    assert new.caps_init == "coupled" and new.to_dict()["caps_init"] == "coupled"
    assert CapsNetConfig.from_dict(new.to_dict()) == new and new.id != old.id


def test_backbone_width_follows_p_like_the_papers_code():
    assert CapsNetConfig(primary_types=16, primary_dim=12).conv_channels == (48, 96, 192)
    assert CapsNetConfig(primary_types=8, primary_dim=8).conv_channels == (48, 96, 192)
    follow = CapsNetConfig(primary_types=8, primary_dim=8, backbone_width="follow_p")
    assert follow.conv_channels == (16, 32, 64)
    assert CapsNetConfig(primary_types=8, primary_dim=16, backbone_width="follow_p").conv_channels == (
        32,
        64,
        128,
    )
    sab = CapsNetConfig(backbone="sabour", primary_types=32, primary_dim=8, backbone_width="follow_p")
    assert sab.conv_channels == (256,)
    with pytest.raises(ValueError, match="caps_init"):
        CapsNetConfig(caps_init="xavier")
    with pytest.raises(ValueError, match="backbone_width"):
        CapsNetConfig(backbone_width="wide")
