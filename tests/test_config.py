"""The configuration dataclasses are the flags' one home: the flags are generated from their
fields, configurations are built back from parsed flags strictly, and --help lists them."""
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from absl import flags

from experiments.flags import FlagConflict, define_options
from umr.config import ConfigError, for_stage, from_values, option_fields, stage_default
from umr.nets import ArchitectureConfig, MeshNet
from umr.objectives import ObjectiveConfig
from umr.quirks import Quirks
from umr.trainer import TrainSettings

REPO = Path(__file__).resolve().parents[1]


def parsed(stage, *argv):
    fv = flags.FlagValues()
    for cls in (TrainSettings, ObjectiveConfig, ArchitectureConfig):
        define_options(cls, stage, fv)
    fv(["prog", *argv])
    return fv


@pytest.mark.parametrize("stage", [1, 2])
def test_flags_are_generated_from_the_fields(stage):
    fv = parsed(stage)
    for cls in (TrainSettings, ObjectiveConfig, ArchitectureConfig):
        for f in option_fields(cls, stage):
            assert fv[f.name].default == stage_default(f, stage), f.name
            assert fv[f.name].help.endswith(f.metadata["help"]), f.name  # enums: '<a|b>: ' first
    # the stages' own options and defaults
    assert ("ori_reg_wt" in fv) == (stage == 1) and ("vertex_loss_wt" in fv) == (stage == 2)
    assert fv["mask_loss_wt"].default == (3.0 if stage == 1 else 2.5)
    config = from_values(ObjectiveConfig, fv, stage, quirks=Quirks())
    assert config == ObjectiveConfig.for_stage(stage)
    assert from_values(TrainSettings, fv, stage) == TrainSettings()


def test_values_from_the_command_line_reach_the_configuration():
    fv = parsed(2, "--vertex_loss_wt=30", "--texture_loss=l1", "--nouse_gan", "--batch_size=16", "--uv_height=32")
    config = from_values(ObjectiveConfig, fv, 2, quirks=Quirks())
    assert config.vertex_loss_wt == 30 and config.texture_loss == "l1" and not config.use_gan
    assert from_values(TrainSettings, fv).batch_size == 16
    assert from_values(ArchitectureConfig, fv).uv_height == 32
    with pytest.raises(flags.IllegalFlagValueError):
        parsed(2, "--mask_loss_wt=-1")  # the field's lower bound
    with pytest.raises(flags.IllegalFlagValueError):
        parsed(2, "--texture_loss=l2")  # the field's choices


def test_a_field_without_a_flag_is_an_error_not_a_default():
    fv = parsed(2)
    values = {name: fv[name].value for name in fv}
    del values["prob_loss_wt"]
    with pytest.raises(ConfigError, match="prob_loss_wt"):
        from_values(ObjectiveConfig, values, 2, quirks=Quirks())
    with pytest.raises(ConfigError, match="no field"):
        for_stage(ObjectiveConfig, 2, prob_loss_weight=1.0)


def test_stage_1_and_stage_2_flags_in_one_process_conflict():
    fv = flags.FlagValues()
    define_options(ObjectiveConfig, 1, fv)
    define_options(ObjectiveConfig, 1, fv)  # the same definitions again: nothing happens
    with pytest.raises(FlagConflict, match="mask_loss_wt"):
        define_options(ObjectiveConfig, 2, fv)


def test_the_model_takes_its_defaults_from_the_architecture_config():
    import inspect

    signature = inspect.signature(MeshNet)
    for f in dataclasses.fields(ArchitectureConfig):
        assert signature.parameters[f.name].default == f.default, f.name


@pytest.mark.parametrize("script,flag,command", [
    ("train_s2", "--vertex_loss_wt: Vertex correspondence loss weight.", "--batch_size 16 \\\n"),
    ("train_s1", "--ori_reg_wt: Orientation prior weight", "--batch_size 64 \\\n"),
    ("test_iou", "--model_path: Checkpoint to evaluate", "--split test"),
])
def test_help_lists_the_scripts_flags(script, flag, command):
    result = subprocess.run([sys.executable, "-m", f"experiments.{script}", "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert flag in result.stdout, result.stdout[-2000:]
    assert command in result.stdout  # the docstring's example command keeps its line breaks
