"""The experiments' command-line flags (absl). The training flags are generated from the
configuration dataclasses, which are their one home (name, default, help, bounds):
``umr.trainer.TrainSettings``, ``umr.objectives.ObjectiveConfig`` and
``umr.nets.ArchitectureConfig`` (see umr.config); the data, model-initialisation and evaluation
flags are defined here. Names and defaults follow the original; ``--multi_gpu`` and
``--gpu_num`` remain as aliases that explain how multi-GPU training works now.

Each experiment calls the ``define_*`` functions it needs at import time. Defining a flag again
with the same default is a no-op (several ``define_*`` functions share flags); with another
default it is an error (e.g. stage-1 and stage-2 training flags in one process).
"""
from __future__ import annotations

import os

from absl import flags

from umr.config import CACHE_DIR, field_type, option_fields, stage_default
from umr.data import DATASETS
from umr.nets import ArchitectureConfig
from umr.objectives import ObjectiveConfig
from umr.quirks import QUIRK_NAMES
from umr.trainer import TrainSettings

FLAGS = flags.FLAGS
# the flags defined below belong to the script that asks for them: its --help lists them
flags.disclaim_key_flags()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = CACHE_DIR


class FlagConflict(ValueError):
    """A flag defined twice with different defaults."""


def define(kind: str, name: str, default, help: str, flag_values=FLAGS, **kwargs) -> None:
    """``flags.DEFINE_<kind>``, or nothing if the flag exists with this default (an error if with
    another)."""
    if name in flag_values:
        existing = flag_values[name].default
        if existing != default:
            raise FlagConflict(f"--{name} is defined twice, with defaults {existing!r} and {default!r} (e.g. the "
                               "flags of two training stages in one process)")
        return
    getattr(flags, f"DEFINE_{kind}")(name, default, help=help, flag_values=flag_values, **kwargs)


def define_options(cls, stage: int | None = None, flag_values=FLAGS) -> None:
    """The flags of the option fields of the dataclass ``cls`` (those ``stage`` has), with
    ``stage``'s defaults."""
    for f in option_fields(cls, stage):
        meta, kind = f.metadata, field_type(cls, f)
        default = stage_default(f, stage)
        if kind is bool:
            define("boolean", f.name, default, meta["help"], flag_values)
        elif meta["choices"]:
            define("enum", f.name, default, meta["help"], flag_values, enum_values=list(meta["choices"]))
        elif kind in (int, float):
            bounds = {"lower_bound": meta["lower_bound"]} if meta["lower_bound"] is not None else {}
            define("integer" if kind is int else "float", f.name, default, meta["help"], flag_values, **bounds)
        elif kind is str:
            define("string", f.name, default, meta["help"], flag_values)
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no flag type for {kind}")


def _known_quirks(names) -> bool:
    return all(name in QUIRK_NAMES for name in names)


def define_data_flags():
    """Data: the crop pipeline and the CUB / CMR cache / SCOPS folders."""
    define("integer", "img_size", 256, "Image size (pixels) the loaders crop and resize to; a multiple of 64.",
           lower_bound=64)
    define("float", "padding_frac", 0.05, "Bounding box padding, as a fraction of its size.")
    define("float", "jitter_frac", 0.05, "Bounding box jitter on the train split, as a fraction of its size.")
    define("enum", "split", "train", "Data split.", enum_values=["train", "val", "test", "all"])
    define("integer", "n_data_workers", 4, "DataLoader worker processes (0 loads in the main process).",
           lower_bound=0)
    define("enum", "dataset", "cub", "Data set: " + "; ".join(f"{name}: {spec.help}" for name, spec in DATASETS.items())
           + ". Both read the CUB layout of --cub_dir and --cub_cache_dir.", enum_values=list(DATASETS))
    define("string", "cub_dir", "CUB_200_2011/", "CUB-200-2011 folder (contains images/).")
    define("string", "cub_cache_dir", "unsup-mesh/cachedir/cub/", "CMR annotation cache (contains data/ and sfm/).")
    define("string", "scops_path", "SCOPS/results/cub/ITER_60000/train/dcrf_prob", "SCOPS part probability maps.")
    define("integer", "data_seed", 0, "Seed of the data augmentation.")


def define_model_flags():
    """The network: its architecture (umr.nets.ArchitectureConfig), initialisation and quirks."""
    define_options(ArchitectureConfig)
    define("boolean", "pretrained_encoder", True,
           "Start the ResNet-18 encoder from ImageNet weights (torchvision's, from the local torch hub cache); "
           "--nopretrained_encoder trains it from scratch.")
    define("boolean", "compat", False,
           "Reproduce the original code wherever it departs from the paper: turns every quirk of --quirks on (see "
           "README: 'The original's quirks'). By default the paper's intent is followed. A checkpoint's own model "
           "quirks win when a model is rebuilt from it.")
    if "quirks" not in FLAGS:
        flags.DEFINE_list("quirks", [], "Quirks of the original code to reproduce, one by one (comma-separated): "
                          + ", ".join(QUIRK_NAMES) + ". See README: 'The original's quirks'.")
        flags.register_validator("quirks", _known_quirks,
                                 message="unknown quirk name; the quirks are: " + ", ".join(QUIRK_NAMES))


def define_train_flags(stage: int):
    """Training of stage 1 or 2: the loop (TrainSettings), the losses (ObjectiveConfig, with the
    stage's defaults) and the stage's own inputs."""
    define_data_flags()
    define_model_flags()
    define_options(TrainSettings, stage)
    define_options(ObjectiveConfig, stage)
    define("float", "logvar_init", None,
           "Initial bias of the latent code's log-variance head (default: PyTorch's init, as the original: the "
           "injected noise then starts with unit variance and hides the image's code from the shape predictor until "
           "training shrinks it; e.g. -6 starts nearly noise-free).")
    define("boolean", "multi_gpu", False,
           "Kept for the original's commands: several GPUs are now used by launching with torchrun, e.g. torchrun "
           "--nproc_per_node 4 -m experiments.train_s1 ...; this flag alone changes nothing.")
    define("integer", "gpu_num", 1, "Kept for the original's commands; the process count comes from torchrun.")
    if stage == 1:
        define("boolean", "side_view_init", False,
               "Start the stage-1 camera at the side view of the first stage-2 camera hypothesis for every image "
               "(default: PyTorch's init, as the original, a random rotation), so the template is learnt in the "
               "frame that stage 2's hypotheses assume.")
    else:
        define("string", "stemp_path", "unsup-mesh/cachedir/cub/scops/",
               "Semantic template written by avg_uv (mean_v.pth, semantic_seg.png, vertices_idx/).")
        define_min_part_share()
        define("string", "init_from", "",
               "Start the encoder and the texture-flow predictor from this checkpoint (e.g. the stage-1 model's "
               "pred_net_latest.pth) instead of ImageNet weights or scratch; the camera hypotheses and the shape "
               "predictor start as usual.")


def define_min_part_share():
    define("float", "min_part_share", 0.02,
           "Smallest share of the template's vertices a part of the semantic template may have; a template with a "
           "smaller (or empty) part is refused by avg_uv and train_s2.", lower_bound=0.0)


def define_test_flags():
    """Evaluation and demo."""
    define_data_flags()
    define_model_flags()
    define("string", "name", "exp_name", "Experiment name (outputs under <results_eval_dir>/<name>).")
    define("integer", "batch_size", 2, "Batch size.", lower_bound=1)
    define("string", "results_vis_dir", os.path.join(CACHE, "results_vis"), "Visual results root.")
    define("string", "results_eval_dir", os.path.join(CACHE, "evaluation"),
           "Where --oracle evaluations write their JSON (under <results_eval_dir>/<name>).")
    define("string", "results_dir", "",
           "Folder for the evaluation's JSON (default: the checkpoint's folder; needed when that is not writable).")
    define("string", "model_path", os.path.join(CACHE, "snapshots", "cub_net", "pred_net_latest.pth"),
           "Checkpoint to evaluate (ours or the original's released model).")
    define("enum", "device", "auto", "Device: CUDA if available (auto), or forced.", enum_values=["auto", "cpu", "cuda"])
    define("integer", "image_size", 256, "Render size; must equal --img_size.")
    define("integer", "max_eval_iter", 0, "Stop after this many batches (0: all).", lower_bound=0)
    define("boolean", "oracle", False,
           "Synthetic data only: evaluate the true meshes and cameras instead of a model (checks the evaluation "
           "code).")
    define("string", "gt_dir", "", "Synthetic data's 3-D truth (default: <cub_cache_dir>/../../gt).")
