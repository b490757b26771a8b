"""The training loop shared by ``train_s1`` and ``train_s2`` (docs/method.md §13).

* Adam over the model and the discriminator (lr ``learning_rate / (1 + 5e-4·n)``, n the global
  iteration from 1), one backward per iteration, a step every ``optim_bs`` iterations.
* One CPU, one GPU, or N processes under ``torchrun`` (DistributedDataParallel, batch norm over
  the global batch): the global batch ``batch_size`` is split over the processes, and every
  random draw of a sample (augmentation, latent noise, camera sample, GAN view) is a function of
  ``(seed, epoch, index)``, so the run does not depend on the process count.
* Checkpoints ``<checkpoint_dir>/<name>/pred_net_latest.pth`` (every ``save_latest_freq``
  iterations and every epoch) and ``pred_net_<epoch>.pth`` (every ``save_epoch_freq`` epochs),
  written atomically (temporary file + rename); they hold the model, the discriminator, the
  optimiser, the position in the run and the RNG states, so ``--resume`` continues exactly.
* A progress bar, scalars in ``loss_log.jsonl`` (and TensorBoard when installed), PNG visuals
  every ``display_freq`` iterations, visdom with ``display_visuals``. A NaN or inf loss stops
  the run naming the loss term; weights or optimiser state that are not finite are never
  saved, so the last good checkpoint stays.
* The run folder is locked while a run trains in it; a folder that already holds a run is
  only continued (``resume``) or started over (``overwrite``), never silently mixed. Ctrl-C
  saves a checkpoint at the end of the current iteration and stops (a second Ctrl-C stops at
  once).
"""
from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import signal
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from tqdm import tqdm

from umr import distributed as D
from umr.config import CACHE_DIR, from_values, option, to_dict
from umr.checkpoints import (CHECKPOINT_FORMAT, CheckpointError, load_file, model_config, numpy_rng_state, save_atomic,
                             set_numpy_rng_state)

__all__ = ["TrainSettings", "Trainer", "SampleNoise", "TrainStep", "InverseDecayLR", "load_checkpoint", "to_device",
           "RunError", "Interrupted", "unwritable"]


class RunError(RuntimeError):
    """A run that cannot start or continue as asked (folder in use, not writable, changed data
    order); the message names the folder or flag and the fix."""


class Interrupted(RuntimeError):
    """Ctrl-C stopped the run; the message says where its checkpoint is."""


def unwritable(folder: Path) -> Optional[str]:
    """Make ``folder`` if needed and try writing a file in it: None if that works, else why not."""
    try:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        return err.strerror or str(err)
    return None


@dataclass
class TrainSettings:
    """The training loop's settings; field names are the original's flags. The flags of
    ``train_s1`` / ``train_s2`` are generated from these fields (umr.config)."""

    name: str = option("exp_name", "Experiment name: outputs go to <checkpoint_dir>/<name> and <vis_dir>/<name>.")
    num_epochs: int = option(500, "Epochs to train.", lower_bound=1)
    num_pretrain_epochs: int = option(0, "First epoch index (the original's way to continue a run).")
    learning_rate: float = option(1e-4, "Adam learning rate (decays as lr / (1 + 5e-4 · iteration)).",
                                  lower_bound=0.0)
    prob_lr_mult: float = option(1.0, "Learning-rate multiplier of the camera hypotheses' probability layers (1: "
                                 "the learning rate of every other weight).", stages=(2,), lower_bound=0.0)
    beta1: float = option(0.9, "Adam beta1 (SGD momentum with --use_sgd).")
    use_sgd: bool = option(False, "SGD instead of Adam.")
    optim_bs: int = option(1, "Optimiser step every this many iterations (gradients accumulate).", lower_bound=1)
    num_iter: int = option(0, "Stop after this many iterations (0: no cap).", lower_bound=0)
    batch_size: int = option(64, "Global batch size, split over the processes of a torchrun job.", lower_bound=1)
    checkpoint_dir: str = option(os.path.join(CACHE_DIR, "snapshots"), "Checkpoints root.")
    vis_dir: str = option(os.path.join(CACHE_DIR, "visualization"), "Training visuals root.")
    print_freq: int = option(20, "Log scalars every this many iterations.", lower_bound=0)
    save_latest_freq: int = option(3000, "Save pred_net_latest.pth every this many iterations (0: only at the end "
                                   "of each epoch).", lower_bound=0)
    save_epoch_freq: int = option(301, "Also save pred_net_<epoch>.pth every this many epochs.", lower_bound=1)
    display_freq: int = option(100, "Write PNG visuals every this many iterations (0: never).", lower_bound=0)
    display_visuals: bool = option(False, "Also show visuals and losses live in visdom (optional: pip install visdom, "
                                   "then start a server with python -m visdom.server, which needs internet the first "
                                   "time). TensorBoard needs nothing more: tensorboard --logdir <checkpoint_dir>.")
    visdom_server: str = option("http://localhost", "visdom server address.")
    visdom_port: int = option(8097, "visdom server port.")
    device: str = option("auto", "Device: CUDA if available (auto), or forced.", choices=("auto", "cpu", "cuda"))
    resume: bool = option(False, "Continue the run <checkpoint_dir>/<name> from its latest checkpoint.")
    overwrite: bool = option(False, "Start the run <checkpoint_dir>/<name> over, deleting the checkpoints and logs of "
                             "the run already there (without it, or --resume, a folder that holds a run is refused).")
    seed: int = option(0, "Seed of torch, numpy and python random (the original used 0).")
    n_data_workers: int = option(4, "DataLoader worker processes (0 loads in the main process).", lower_bound=0)
    val_freq: int = option(1000, "Validate every this many iterations and at the end of the run (0: never): mask "
                           "IoU, PCK@0.1 by flow and by camera on --val_split, and with the synthetic set's 3-D truth "
                           "the rotation error, Chamfer-L2 and F-score; logged to loss_log.jsonl, TensorBoard and "
                           "<checkpoint_dir>/<name>/curves.png.", lower_bound=0)
    val_split: str = option("val", "Held-out split for validation.", choices=("train", "val", "test", "all"))
    val_images: int = option(100, "Validation images (the first ones of --val_split).", lower_bound=1)
    val_pairs: int = option(100, "Keypoint-transfer pairs among the validation images.", lower_bound=1)
    dtype: str = option("float32", "Training precision. float64 (about 2x slower) for gradient checks and debugging: "
                        "it takes float32 rounding, which batch norm over a few samples amplifies, out of "
                        "comparisons.", choices=("float32", "float64"))
    channels_last: bool = option(True, "Convolution weights in channels-last (NHWC) memory layout, which the "
                                 "CPU's and cuDNN's convolutions run faster; the same function up to float rounding.")
    amp: bool = option(False, "Mixed precision: the networks' forward in bfloat16 autocast, rendering and losses in "
                       "float32. For CUDA and CPUs with bf16 instructions (AVX-512 BF16, AMX); "
                       "benchmarks/bench_train_step.py --amp measures what it gains on yours.")

    @classmethod
    def from_flags(cls, flags, stage: Optional[int] = None) -> "TrainSettings":
        return from_values(cls, flags, stage)


class SampleNoise(Dataset):
    """Adds each sample's random draws to it: ``eps_z`` (z_dim,) standard normal (latent
    sample), ``u_cam`` uniform (camera hypothesis sample) and ``gan_angle`` (integer degrees in
    [0, 180), the GAN's novel view), all functions of ``(seed, epoch, index)``."""

    def __init__(self, dataset: Dataset, z_dim: int, seed: int = 0):
        self.dataset, self.z_dim, self.seed, self.epoch = dataset, z_dim, seed, 0

    def __len__(self):
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __getitem__(self, key):
        """``key``: an index (of the epoch set last) or an ``(epoch, index)`` pair."""
        if isinstance(key, (tuple, list)):
            epoch, index = (int(k) for k in key)
            if epoch != self.epoch:
                self.set_epoch(epoch)
        else:
            index = key
        item = self.dataset[index]
        rng = np.random.default_rng([self.seed, self.epoch, index, 7])
        item["eps_z"] = rng.standard_normal(self.z_dim).astype(np.float32)
        item["u_cam"] = np.float32(rng.random())
        item["gan_angle"] = np.float32(rng.integers(0, 180))
        return item


class _EpochSampler(Sampler):
    """One epoch of a distributed sampler's order as ``(epoch, index)`` keys, without the first
    ``skip`` indices (to resume inside an epoch). Set with :meth:`start` before each pass: the
    loader's workers stay alive across epochs and learn the epoch from the keys."""

    def __init__(self, sampler: DistributedSampler):
        self.sampler, self.epoch, self.skip = sampler, 0, 0

    def start(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __iter__(self):
        self.sampler.set_epoch(self.epoch)
        return iter([(self.epoch, index) for index in list(self.sampler)[self.skip :]])

    def __len__(self):
        return max(0, len(self.sampler) - self.skip)


class TrainStep(nn.Module):
    """Model + objective as one module (what DistributedDataParallel wraps).

    ``amp``: the model's forward runs under bfloat16 autocast (matrix products and convolutions
    in bf16, weights and gradients float32); its outputs return to float32 before the objective,
    so rendering, the rasterizer and the losses stay float32. bf16 keeps float32's range, so no
    loss scaling is needed.
    """

    def __init__(self, model: nn.Module, objective: nn.Module, amp: bool = False):
        super().__init__()
        self.model, self.objective, self.amp = model, objective, amp

    def forward(self, batch: dict, epoch: int):
        img = batch["img"]
        with torch.autocast(img.device.type, dtype=torch.bfloat16, enabled=self.amp):
            out = self.model(img, batch.get("eps_z"), batch.get("u_cam"))
        if self.amp:
            out = {k: v.to(img.dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in out.items()}
        total, terms = self.objective(out, batch, epoch)
        return total, terms, out


class InverseDecayLR(torch.optim.lr_scheduler.LRScheduler):
    """UMR's learning-rate rule: ``lr = base / (1 + rate · n)`` at iteration n = 1, 2, ...
    Step it after every iteration; its state (the iteration count) is saved in checkpoints."""

    def __init__(self, optimizer, rate: float = 5e-4, last_epoch: int = -1):
        self.rate = rate
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list:
        return [base / (1 + self.rate * (self.last_epoch + 1)) for base in self.base_lrs]


def load_checkpoint(path: Path) -> dict:
    """A training checkpoint to resume from (read safely, :func:`umr.checkpoints.load_file`)."""
    state = load_file(path, "--resume")
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"--resume {path} is not a umr training checkpoint (it cannot be resumed from)")
    return state


def to_device(batch: dict, device: torch.device, dtype: torch.dtype = torch.float32) -> dict:
    """Tensors to ``device``; floating-point ones to ``dtype`` too."""
    return {k: (v.to(device, dtype if v.is_floating_point() else None, non_blocking=True)
                if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


class Trainer:
    """Runs ``TrainStep`` over a dataset with the settings above.

    What it needs of the model and the objective (nothing UMR-specific):

    * ``model(img, eps_z, u_cam) -> out`` (a dict), ``model.latent_size`` (the size of
      ``eps_z``) and ``model.trainable_parameters()``;
    * ``objective(out, batch, epoch) -> (total, terms)``, and optionally
      ``objective.trainable_parameters()`` (trained by the same optimiser, e.g. a
      discriminator); ``objective.state_dict()`` goes into every checkpoint.

    Args:
        settings: :class:`TrainSettings`.
        model, objective: as above (:class:`umr.nets.MeshNet` and :mod:`umr.objectives`).
        dataset: the training set (with ``set_epoch``); wrapped in :class:`SampleNoise` here.
        ctx: from :func:`umr.distributed.setup`.
        extra_state: a dict saved into every checkpoint (e.g. the flags).
        end_of_epoch: called as ``fn(trainer, epoch)`` after each epoch, before checkpointing
            (stage 1's :class:`umr.objectives.TemplateUpdate`).
        validate: called as ``fn(model) -> {name: value}`` on the main process every
            ``val_freq`` iterations and at the end of the run (e.g. a
            :class:`umr.evaluation.Validator`); the numbers go to ``loss_log.jsonl`` (as
            ``val/<name>``), TensorBoard and ``curves.png``.
    """

    def __init__(self, settings: TrainSettings, model, objective, dataset, ctx: D.Context,
                 extra_state: Optional[dict] = None, end_of_epoch: Optional[Callable] = None,
                 validate: Optional[Callable] = None):
        self.s, self.ctx = settings, ctx
        if settings.batch_size % ctx.world_size:
            raise ValueError(f"--batch_size {settings.batch_size} must be divisible by the {ctx.world_size} processes")
        self.local_batch = settings.batch_size // ctx.world_size
        if settings.dtype not in ("float32", "float64"):
            raise ValueError(f"--dtype must be float32 or float64, got {settings.dtype!r}")
        if settings.amp and settings.dtype != "float32":
            raise ValueError(f"--amp trains the networks in bfloat16 and the rest in float32; it cannot be combined "
                             f"with --dtype {settings.dtype}")
        self.dtype = getattr(torch, settings.dtype)
        self.model, self.objective = model.to(ctx.device, self.dtype), objective.to(ctx.device, self.dtype)
        if settings.channels_last:  # a convolution with channels-last weights gives channels-last outputs
            self.model.to(memory_format=torch.channels_last)
        self.step_module = TrainStep(self.model, self.objective, amp=settings.amp)
        if ctx.distributed:
            D.convert_batchnorm(self.step_module)
            self.step_module = nn.parallel.DistributedDataParallel(
                self.step_module, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None
            )
        self.dataset = SampleNoise(dataset, model.latent_size, settings.seed)
        params = list(self.model.trainable_parameters())
        faster = {id(p) for n, p in self.model.named_parameters() if ".prob_predictor." in n}
        if settings.prob_lr_mult != 1.0 and faster:  # the camera probabilities (stage 2) get their own rate
            params = [{"params": [p for p in params if id(p) not in faster]},
                      {"params": [p for p in params if id(p) in faster],
                       "lr": settings.learning_rate * settings.prob_lr_mult}]
        else:
            params = [{"params": params}]
        # fused implementations: on CPU the default Adam step over the 85M parameters takes ~1 s
        if settings.use_sgd:  # SGD trains the model's parameters only
            self.optimizer = torch.optim.SGD(params, lr=settings.learning_rate, momentum=settings.beta1, foreach=True)
        else:
            params[0]["params"] += list(getattr(objective, "trainable_parameters", list)())
            self.optimizer = torch.optim.Adam(params, lr=settings.learning_rate, betas=(settings.beta1, 0.999),
                                              fused=True)
        self.scheduler = InverseDecayLR(self.optimizer)
        self.run_dir = Path(settings.checkpoint_dir) / settings.name
        self.vis_dir = Path(settings.vis_dir) / settings.name
        self.extra_state = extra_state or {}
        self.end_of_epoch = end_of_epoch
        self.validate = validate
        self.validated_step = None
        self.epoch, self.iteration, self.step = settings.num_pretrain_epochs, 0, 0
        self.finished = False  # the run reached num_iter or num_epochs (saved: a finished run is not resumed)
        self._tensorboard = self._visdom = None
        self._loader = None
        self._lock = None
        self._interrupted = False

    # ---------------------------------------------------------------- checkpoints
    @property
    def latest_path(self) -> Path:
        return self.run_dir / "pred_net_latest.pth"

    def state(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "model": {k: v.cpu() for k, v in self.model.state_dict().items()},
            "model_config": model_config(self.model),
            "objective": {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in self.objective.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "iteration": self.iteration,
            "step": self.step,
            "finished": self.finished,
            "data_order": self.data_order(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "numpy": numpy_rng_state(),
                "python": random.getstate(),
            },
            **self.extra_state,
        }

    def data_order(self) -> dict:
        """What fixes the order of the training samples: a resume must see the same."""
        return {"batch_size": self.s.batch_size, "seed": self.s.seed, "num_images": len(self.dataset),
                "data_seed": getattr(self.dataset.dataset, "seed", None)}

    def _state_is_finite(self) -> bool:
        tensors = list(self.model.state_dict().values())
        tensors += [v for v in self.objective.state_dict().values() if isinstance(v, torch.Tensor)]
        for state in self.optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
        return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())

    def save(self, path: Path) -> None:
        """Save a checkpoint, after checking that the weights and the optimiser state are finite
        (a diverged update is never written over the last good checkpoint)."""
        if not self._state_is_finite():  # identical on every process
            kept = self.latest_path if self.latest_path.exists() else "none yet"
            raise FloatingPointError(f"the weights or optimiser state are not finite after step {self.step} (epoch "
                                     f"{self.epoch}); not saved. Last good checkpoint: {kept}")
        if self.ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_atomic(self.state(), path)

    def restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        if "objective" in state:
            self.objective.load_state_dict(state["objective"])
        else:  # checkpoints written before objectives kept their own state
            _restore_objective_v1(self.objective, state)
        self.optimizer.load_state_dict(state["optimizer"])
        self._check_data_order(state.get("data_order"))
        self.epoch, self.iteration, self.step = state["epoch"], state["iteration"], state["step"]
        if "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])
        else:  # the rule was applied from the step count alone
            self.scheduler.last_epoch = self.step
            for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_lr()):
                group["lr"] = lr
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        set_numpy_rng_state(rng["numpy"])
        random.setstate(rng["python"])

    def _check_data_order(self, saved) -> None:
        if not saved:
            return
        now = self.data_order()
        names = {"batch_size": "--batch_size", "seed": "--seed", "data_seed": "--data_seed",
                 "num_images": "the training split's size"}
        for key, flag in names.items():
            if key in saved and saved[key] != now[key]:
                raise RunError(f"--resume: {self.latest_path} was trained with {flag} {saved[key]}, this run has "
                               f"{now[key]}; the remaining samples of the epoch would differ. Resume with the same "
                               f"{flag}, or start a new run (another --name, or --overwrite)")

    # ---------------------------------------------------------------- run folder
    def _take_run_dir(self) -> None:
        """Main process: make the run folder (and the visuals folder), check that they are
        writable, lock the run folder, and refuse one that holds a run unless resuming or
        overwriting."""
        for folder, flag in ((self.run_dir, "--checkpoint_dir"), (self.vis_dir, "--vis_dir")):
            why = None if folder == self.vis_dir and not self.s.display_freq else unwritable(folder)
            if why:
                raise RunError(f"cannot write to {folder} ({why}); set {flag} to a writable folder")
        self._lock = open(self.run_dir / ".lock", "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.seek(0)
            holder = self._lock.read().strip() or "another process"
            self._lock.close()
            self._lock = None
            raise RunError(f"{self.run_dir} is in use by a training run ({holder}); wait for it to end, or train "
                           "under another --name") from None
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(f"pid {os.getpid()}\n")
        self._lock.flush()
        outputs = [self.latest_path, self.run_dir / "loss_log.jsonl", *self.run_dir.glob("pred_net_*.pth")]
        existing = [p for p in outputs if p.exists()]
        if existing and not self.s.resume:
            if not self.s.overwrite:
                raise RunError(f"{self.run_dir} already holds a run ({', '.join(sorted({p.name for p in existing}))}); "
                               "pass --resume to continue it, or --overwrite to start it over")
            for path in existing + [self.run_dir / "curves.png"]:
                path.unlink(missing_ok=True)
            shutil.rmtree(self.run_dir / "tensorboard", ignore_errors=True)

    def _write_config(self) -> None:
        """``<run>/config.json``: the resolved configuration of this start of the run (training
        settings, loss weights, model, and the command line's flags where given)."""
        config = {"train": to_dict(self.s), "model": {"stage": getattr(self.model, "stage", None),
                                                       **model_config(self.model)}}
        objective_config = getattr(self.objective, "config", None)
        if objective_config is not None:
            config["objective"] = to_dict(objective_config)
        if "flags" in self.extra_state:
            config["flags"] = self.extra_state["flags"]
        tmp = self.run_dir / f".config.json.{os.getpid()}"
        tmp.write_text(json.dumps(config, indent=1, sort_keys=True, default=str) + "\n")
        os.replace(tmp, self.run_dir / "config.json")

    def _release_run_dir(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def _on_sigint(self, signum, frame) -> None:
        self._interrupted = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once
        if self.ctx.is_main:
            tqdm.write(f"{self.s.name}: stopping after this iteration to save a checkpoint (Ctrl-C again to stop now)")

    def _stop_if_interrupted(self) -> None:
        flag = D.all_reduce_sum(torch.tensor([float(self._interrupted)], device=self.ctx.device))
        if flag.item() > 0:
            self.save(self.latest_path)
            raise Interrupted(f"interrupted at step {self.step} (epoch {self.epoch}); checkpoint saved to "
                              f"{self.latest_path}; continue with the same command and --resume")

    # ---------------------------------------------------------------- logging
    def _log(self, record: dict) -> None:
        """Append a record to ``loss_log.jsonl`` and send its numbers to TensorBoard (tags
        ``train/<name>``, or ``val/<name>`` for names that already carry the prefix)."""
        if not self.ctx.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "loss_log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tensorboard is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tensorboard = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError:
                self._tensorboard = False
        numbers = {k: v for k, v in record.items() if isinstance(v, float) and k not in ("time", "val_seconds")}
        if self._tensorboard:
            for key, value in numbers.items():
                self._tensorboard.add_scalar(key if "/" in key else f"train/{key}", value, record["step"])
            self._tensorboard.flush()
        if self._visdom:
            for key, value in numbers.items():
                if key != "lr":
                    self._visdom.line(X=[record["step"]], Y=[value], win=f"loss_{key}", update="append",
                                      opts={"title": key})

    def _run_validation(self) -> None:
        """Validate (main process), log the numbers and redraw ``curves.png``."""
        if self.validate is None or self.validated_step == self.step:
            return
        self.validated_step = self.step
        if not self.ctx.is_main:
            return
        start = time.time()
        results = self.validate(self.model)
        record = {"epoch": self.epoch, "iteration": self.iteration, "step": self.step,
                  **{f"val/{k}": float(v) for k, v in results.items()}, "val_seconds": time.time() - start}
        self._log(record)
        summary = ", ".join(f"{k} {v:.3f}" for k, v in results.items())
        tqdm.write(f"{self.s.name} step {self.step} validation: {summary}")
        from umr.visuals import plot_curves

        plot_curves(self.run_dir / "loss_log.jsonl", self.run_dir / "curves.png", title=self.s.name)

    def _connect_visdom(self) -> None:
        if not (self.s.display_visuals and self.ctx.is_main):
            return
        try:
            import visdom
        except ImportError as err:
            raise RuntimeError("--display_visuals needs visdom, which is optional: pip install --no-build-isolation "
                               "visdom==0.2.4 (its server downloads scripts from the internet when it first starts); "
                               "TensorBoard needs nothing more: tensorboard --logdir <checkpoint_dir>") from err
        self._visdom = visdom.Visdom(server=self.s.visdom_server, port=self.s.visdom_port, env=self.s.name,
                                     raise_exceptions=True)
        if not self._visdom.check_connection(timeout_seconds=5):
            raise RuntimeError(
                f"no visdom server at {self.s.visdom_server}:{self.s.visdom_port}; start one with "
                f"`python -m visdom.server -port {self.s.visdom_port}` or drop --display_visuals"
            )

    def _visuals(self, out: dict, batch: dict) -> None:
        if not self.ctx.is_main:
            return
        from PIL import Image

        from umr.renderer import make_renderer
        from umr.visuals import training_grid

        renderer = make_renderer(batch["img"].shape[-1], "picture")
        grid = training_grid(out, batch, self.model.faces, renderer)
        self.vis_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid).save(self.vis_dir / f"iter_{self.step:07d}.png")
        if self._visdom:
            self._visdom.image(grid.transpose(2, 0, 1), win="visuals", opts={"title": f"iteration {self.step}"})

    # ---------------------------------------------------------------- loop
    def loader(self, epoch: int, skip_batches: int = 0) -> DataLoader:
        """The training batches of ``epoch`` (shuffled by ``(seed, epoch)``), without the first
        ``skip_batches``. One DataLoader serves the whole run, so its worker processes start once."""
        if self._loader is None:
            sampler = DistributedSampler(self.dataset, num_replicas=self.ctx.world_size, rank=self.ctx.rank,
                                         shuffle=True, seed=self.s.seed, drop_last=True)
            workers = self.s.n_data_workers
            self._loader = DataLoader(
                self.dataset, batch_size=self.local_batch, sampler=_EpochSampler(sampler), drop_last=True,
                num_workers=workers, persistent_workers=workers > 0, timeout=600 if workers else 0,
            )
        self.dataset.set_epoch(epoch)
        self._loader.sampler.start(epoch, skip_batches * self.local_batch)
        return self._loader

    def _check_finite(self, terms: dict) -> None:
        bad = [name for name, value in terms.items() if not torch.isfinite(value.detach()).all()]
        flag = torch.tensor([float(len(bad))], device=self.ctx.device)
        flag = D.all_reduce_sum(flag)  # all processes stop together
        if flag.item() > 0:
            where = f"epoch {self.epoch}, iteration {self.iteration}, step {self.step}"
            kept = self.latest_path if self.latest_path.exists() else "none yet"
            names = ", ".join(bad) if bad else "(on another process)"
            raise FloatingPointError(f"non-finite loss term(s) {names} at {where}; stopped before the update. "
                                     f"Last good checkpoint: {kept}")

    def run(self) -> None:
        """Train (see the class docstring); the run folder is locked meanwhile, and Ctrl-C stops
        at the end of the iteration with a checkpoint (:class:`Interrupted`)."""
        handler = None
        if threading.current_thread() is threading.main_thread():
            handler = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            if self.ctx.is_main:
                self._take_run_dir()
                self._write_config()
            self._run()
        finally:
            if handler is not None:
                signal.signal(signal.SIGINT, handler)
            self._release_run_dir()

    def _run(self) -> None:
        s = self.s
        if s.resume:
            if not self.latest_path.exists():
                raise FileNotFoundError(f"--resume: no checkpoint at {self.latest_path} (check --name and --checkpoint_dir)")
            self.restore(load_checkpoint(self.latest_path))
        self._connect_visdom()
        start = time.time()
        for epoch in range(self.epoch, s.num_epochs):
            self.epoch = epoch
            skip = self.iteration
            loader = self.loader(epoch, skip)
            total_batches = skip + len(loader)
            bar = tqdm(total=total_batches, initial=skip, desc=f"{s.name} epoch {epoch}", disable=not self.ctx.is_main,
                       dynamic_ncols=True)
            self.step_module.train()
            try:  # the bar is closed on any error, so that its message starts a line
                for batch in loader:
                    batch = to_device(batch, self.ctx.device, self.dtype)
                    self.step += 1
                    lr = self.optimizer.param_groups[0]["lr"]
                    total, terms, out = self.step_module(batch, epoch)
                    self._check_finite(terms)
                    (total / s.optim_bs).backward()
                    if self.step % s.optim_bs == 0:
                        self.optimizer.step()
                        self.optimizer.zero_grad(set_to_none=True)
                    with warnings.catch_warnings():  # between optimiser steps (optim_bs > 1) by design
                        warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step\\(\\)` before")
                        warnings.filterwarnings("ignore", "Seems like `optimizer.step\\(\\)` has been overridden")
                        self.scheduler.step()
                    self.iteration += 1
                    bar.update()
                    if self.step % max(1, s.print_freq) == 0 or self.iteration == total_batches:
                        scalars = {k: float(v.detach()) for k, v in terms.items()}
                        bar.set_postfix(total=f"{float(total.detach()):.3f}", **{k: f"{scalars[k]:.3f}" for k in ("mask", "texture") if k in scalars})
                        self._log({"epoch": epoch, "iteration": self.iteration, "step": self.step, "lr": lr,
                                   "total": float(total.detach()), **scalars, "time": time.time() - start})
                    if s.display_freq and self.step % s.display_freq == 0:
                        self._visuals(out, batch)
                    if s.val_freq and self.step % s.val_freq == 0:
                        self._run_validation()
                    if s.save_latest_freq and self.step % s.save_latest_freq == 0:
                        self.save(self.latest_path)
                    if self._interrupted or self.ctx.distributed:
                        self._stop_if_interrupted()
                    if s.num_iter and self.step >= s.num_iter:
                        bar.close()
                        self.finished = True
                        self.save(self.latest_path)
                        self._run_validation()
                        return
            finally:
                bar.close()
            if self.end_of_epoch is not None:
                self.end_of_epoch(self, epoch)
            self.epoch, self.iteration = epoch + 1, 0
            self.finished = self.epoch >= s.num_epochs
            self.save(self.latest_path)
            if (epoch + 1) % s.save_epoch_freq == 0:
                self.save(self.run_dir / f"pred_net_{epoch + 1}.pth")
        if not self.finished:  # resumed at the end of a run saved before it was marked finished
            self.finished = True
            self.save(self.latest_path)
        self._run_validation()


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _restore_objective_v1(objective: nn.Module, state: dict) -> None:
    """Objective state of checkpoints that stored the discriminator and stage 2's previous real
    batch under keys of their own."""
    disc = getattr(objective, "discriminator", None)
    if disc is not None and state.get("discriminator") is not None:
        disc.load_state_dict(state["discriminator"])
    if state.get("previous_real") is not None and hasattr(objective, "set_extra_state"):
        objective.set_extra_state({"previous_real": state["previous_real"]})
