"""Typed config: overrides, round trip, errors that name the key and its source."""

import pytest

from cluster.config import ConfigError, JobConfig, dump_config, load_config
from tests.conftest import ROOT


def test_demo_config_loads_and_round_trips(tmp_path):
    cfg = load_config(ROOT / "cluster/configs/dice-cpu.yaml", ["learner.lr=2e-5", "task.families=[dice, urn]"])
    assert cfg.learner.lr == 2e-5 and cfg.task.families == ["dice", "urn"]
    saved = tmp_path / "config.yaml"
    saved.write_text(dump_config(cfg))
    assert load_config(saved) == cfg


@pytest.mark.parametrize("override,needle", [
    ("learner=3", "--set learner: 'learner' is a section"),
    ("learner.lr.x=3", "--set learner.lr.x: unknown key 'learner.lr.x'"),
    ("nope=1", "--set nope: unknown key 'nope'"),
    ("learner.zero_stage=4", "learner.zero_stage"),
    ("rollout.group_size=1", "rollout.group_size"),
    ("novalue", "expected key=value"),
])
def test_override_errors(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value)


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="must divide evenly over learner.world_size"):
        load_config(None, ["rollout.prompts_per_step=3", "rollout.group_size=3", "learner.world_size=2"])
    with pytest.raises(ConfigError, match="task.data"):
        load_config(None, ["task.source=parquet"])
    assert load_config(None, ["sync.overlap=true", "sync.max_staleness=1"]).sync.overlap
    with pytest.raises(ConfigError, match="task.tool_choice 'required' needs task.tools"):
        load_config(None, ["task.tool_choice=required"])
    assert load_config(None, ["task.tool_choice=required", "task.tools=[wiki]"]).task.tool_choice == "required"


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("learner: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_defaults_are_valid():
    assert JobConfig().sync.every == 1


@pytest.mark.parametrize("path", sorted((ROOT / "cluster/configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert load_config(path, []) == cfg and cfg.run.name
