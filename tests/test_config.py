import re
from pathlib import Path

import pytest

from amd_fast.config import Config, ConfigError, FinetuneRunConfig, ProbeRunConfig, load_config

PRESETS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_presets_load(preset):
    """Every preset loads into its kind of config: fine-tuning, probing or pre-training."""
    if preset.name.startswith("finetune_"):
        cfg = load_config(preset, root=FinetuneRunConfig)
        assert cfg.finetune.layer_decay == 0.75 and cfg.model.drop_path == 0.1
    elif preset.name.startswith("probe_"):
        cfg = load_config(preset, root=ProbeRunConfig)
        assert cfg.probe.seeds == [0, 1, 2]
    else:
        cfg = load_config(preset)
        assert cfg.objective.name in ("amd", "dmae", "mae")


def test_dotted_overrides_are_typed():
    cfg = load_config(None, ["data.batch_size=3", "optim.base_lr=2e-4", "objective.student_layers=[2, 4]",
                             "--train.tensorboard=false", "teacher.model.arch=vit_large"])  # fmt: skip
    assert cfg.data.batch_size == 3
    assert cfg.optim.base_lr == 2e-4
    assert cfg.objective.student_layers == [2, 4]
    assert cfg.train.tensorboard is False
    assert cfg.teacher.model.arch == "vit_large"


def test_unknown_field_names_field_and_allowed_ones():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["optim.lr=1e-3"])
    assert "optim.lr" in str(e.value) and "base_lr" in str(e.value)
    with pytest.raises(ConfigError, match="unknown field 'trainer'"):
        load_config(None, ["trainer.steps=3"])


def test_wrong_value_names_allowed_values():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["objective.name=byol"])
    msg = str(e.value)
    assert "objective.name" in msg and "'amd'" in msg and "'dmae'" in msg and "'mae'" in msg
    with pytest.raises(ConfigError, match="data.batch_size must be an integer"):
        load_config(None, ["data.batch_size=four"])


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="teacher_ratio"):
        load_config(None, ["mask.student_ratio=0.5", "mask.teacher_ratio=0.75"])
    with pytest.raises(ConfigError, match="student_layers"):
        load_config(None, ["objective.student_layers=[6]"])


def test_yaml_boolean_words_are_read_as_the_user_meant(tmp_path):
    """`off` / `on` / `yes` / `no` are booleans to YAML 1.1: bare on the command line they stay the words a choice
    field takes; in a preset file they are read back as the allowed word; a bool field takes them too."""
    cfg = load_config(None, ["train.autocast=off", "train.tensorboard=off", "train.progress=yes", "optim.fused=no"])
    assert cfg.train.autocast == "off" and cfg.train.tensorboard is False and cfg.train.progress is True
    assert cfg.optim.fused is False
    preset = tmp_path / "p.yaml"
    preset.write_text("train:\n  autocast: off\n  tensorboard: off\n")
    cfg = load_config(preset)
    assert cfg.train.autocast == "off" and cfg.train.tensorboard is False
    with pytest.raises(ConfigError, match=r"mask.kind='off' is not allowed; allowed values: 'tube', 'random'"):
        load_config(None, ["mask.kind=off"])
    preset.write_text("mask:\n  kind: on\n")
    with pytest.raises(ConfigError, match=r"mask.kind=True .*YAML read on/yes/true as the boolean True; quote"):
        load_config(preset)
    with pytest.raises(ConfigError, match=r"train.autocast='bf16' is not allowed"):
        load_config(None, ["train.autocast=bf16"])


@pytest.mark.parametrize("root", [Config, FinetuneRunConfig, ProbeRunConfig], ids=lambda r: r.__name__)
def test_output_dir_that_cannot_hold_a_run_is_refused(root, tmp_path):
    """An empty train.output_dir wrote the run into the working folder and a pre-trained teacher into /teacher (its
    `<output_dir>/teacher`); the filesystem root and a file are no run folders either. Refused at start, naming the
    field and what was typed."""
    a_file = tmp_path / "notes.txt"
    a_file.write_text("")
    for typed, why in (("", "is empty"), ("/", "is the filesystem root"), ("//", "is the filesystem root"),
                       (str(a_file), "is a file")):  # fmt: skip
        with pytest.raises(ConfigError, match=rf"^train.output_dir={re.escape(repr(typed))} {why}"):
            load_config(None, [f"train.output_dir={typed}"], root=root)
    preset = tmp_path / "p.yaml"
    preset.write_text("train:\n  output_dir: ''\n")
    with pytest.raises(ConfigError, match=r"^train.output_dir='' is empty"):
        load_config(preset, root=root)
    assert load_config(None, [f"train.output_dir={tmp_path / 'run'}"], root=root).train.output_dir == str(
        tmp_path / "run"
    )
