"""Seconds per training iteration and where they go; prints one JSON line.

Setting: 128 px images, batch 8, 8 camera hypotheses, every loss on (texture loss l1, GAN, part
and vertex losses), a bird-like template, a synthetic data set generated on the fly, data
loading in the main process.

Keys: ``s_per_iter`` (median of a train_s2 iteration), ``peak_rss_gib``; shares of the step:
``share_render`` (renderer forward + rasterizer backward), ``share_encoder`` (encoder forward +
backward), ``share_losses`` (computing the loss terms, rendering excluded), ``share_data``
(loading the batch), ``share_other`` (the rest: predictors' backward, losses' backward,
optimiser). ``s1_s_per_iter_64`` and ``s2_s_per_iter_64``: median seconds of a whole train_s1
and train_s2 iteration at 64 px, batch 16 (the quick-start's setting). ``--uv_height`` and
``--uv_channels`` size the texture-flow network as the training flags of the same names.

    python -m benchmarks.bench_train_step [--iters 6] [--img_size 128] [--batch_size 8] [--no_64]
        [--uv_height 32 --uv_channels 64] [--device cpu|cuda] [--amp] [--nochannels_last]

On CUDA every timed span waits for the device (``torch.cuda.synchronize``), so the shares are
of device time too, and the JSON adds ``peak_gpu_mem_gib``.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from umr.data import synth_birds
from umr.data.cub import CUBDataset
from umr import renderer as R
from umr.distributed import Context
from umr.category import BIRDS
from umr.nets import MeshNet
from umr.objectives import ObjectiveConfig, Stage1Objective, Stage2Objective
from umr.trainer import Trainer, TrainSettings, to_device

DEVICE = torch.device("cpu")


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


class Clock:
    """Accumulates wall time of wrapped callables by category."""

    def __init__(self):
        self.totals = {}

    def add(self, key, seconds):
        self.totals[key] = self.totals.get(key, 0.0) + seconds

    def wrap(self, key, fn):
        def timed(*args, **kwargs):
            sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync()
                self.add(key, time.perf_counter() - start)

        return timed


def make_trainer(stage: int, work: Path, img_size: int, batch_size: int, uv_height=None, uv_channels=256,
                 amp: bool = False, channels_last: bool = True) -> Trainer:
    """A trainer of ``stage`` on the synthetic set in ``work`` with every loss on (texture loss l1)."""
    dataset = CUBDataset(work / "CUB_200_2011", work / "cachedir" / "cub", img_size=img_size,
                         scops_path=work / "scops" if stage == 2 else None)
    # a bird-like template (the unit sphere would fill the whole frame at scale 1)
    from umr.mesh import symmetric_template

    half = torch.from_numpy(symmetric_template().verts[:337]).float() * torch.tensor([1.0, 0.55, 0.6])
    model = MeshNet(stage=stage, img_size=img_size, pretrained_encoder=False, mean_shape=half, uv_height=uv_height,
                    uv_channels=uv_channels)
    config = ObjectiveConfig.for_stage(stage, image_size=img_size, texture_loss="l1")
    if stage == 1:
        objective = Stage1Objective(model, config)
    else:
        labels = torch.randint(0, 5, (1280, 36), generator=torch.Generator().manual_seed(0))
        parts = {p: torch.arange(40 * i, 40 * i + 40) for i, p in enumerate(BIRDS.part_names)}
        objective = Stage2Objective(model, config, labels, parts)
    settings = TrainSettings(batch_size=batch_size, n_data_workers=0, checkpoint_dir=str(work / "snap"),
                             vis_dir=str(work / "vis"), display_freq=0, save_latest_freq=0, amp=amp,
                             channels_last=channels_last)
    return Trainer(settings, model, objective, dataset, Context(0, 1, 0, DEVICE))


def seconds_per_iteration(trainer: Trainer, iters: int) -> float:
    """Median wall seconds of a whole training iteration (data, forward, backward, update)."""
    loader = iter(trainer.loader(0))
    times = []
    for it in range(iters + 1):
        sync()
        start = time.perf_counter()
        total, _, _ = trainer.step_module(to_device(next(loader), DEVICE), 0)
        total.backward()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        sync()
        if it:  # the first is a warm-up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=6)
    parser.add_argument("--img_size", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--uv_height", type=int, default=0, help="texture-flow network size (0: UMR's 128)")
    parser.add_argument("--uv_channels", type=int, default=256, help="texture-flow decoder channels (UMR's 256)")
    parser.add_argument("--no_64", action="store_true", help="skip the 64-px stage-1 / stage-2 timings")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast for the networks (train_s1/s2 --amp)")
    parser.add_argument("--nochannels_last", action="store_true", help="convolutions in the default (NCHW) layout")
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="umr_bench_"))
    synth_birds.generate(work, seed=0, photo_size=256, workers=1, progress=False,
                         num_train=max(args.batch_size, 16) * (args.iters + 2), num_val=0, num_test=0)
    arch = {"uv_height": args.uv_height or None, "uv_channels": args.uv_channels, "amp": args.amp,
            "channels_last": not args.nochannels_last}
    quick = {}
    if not args.no_64:
        for stage in (1, 2):
            quick[f"s{stage}_s_per_iter_64"] = round(seconds_per_iteration(make_trainer(stage, work, 64, 16, **arch),
                                                                           args.iters), 3)
    trainer = make_trainer(2, work, args.img_size, args.batch_size, **arch)
    model, objective = trainer.model, trainer.objective

    clock = Clock()
    C = R._kernels()
    C.forward, C.backward = clock.wrap("render_kernel_fwd", C.forward), clock.wrap("render_bwd", C.backward)
    R.SoftRenderer.forward = clock.wrap("render_fwd", R.SoftRenderer.forward)
    encoder_forward = model.encoder.forward
    marks = {}

    def encoder_timed(img):
        sync()
        start = time.perf_counter()
        outputs = encoder_forward(img)
        sync()
        clock.add("encoder_fwd", time.perf_counter() - start)
        def backward_starts(grad):  # the encoder's backward starts once all its outputs have their gradient
            sync()
            marks["encoder_bwd_start"] = time.perf_counter()

        for t in outputs:
            t.register_hook(backward_starts)
        return outputs

    model.encoder.forward = encoder_timed
    objective_forward = objective.forward
    objective.forward = clock.wrap("objective_fwd", objective_forward)

    loader = iter(trainer.loader(0))
    step_times, records = [], []
    for it in range(args.iters + 1):
        clock.totals.clear()
        sync()
        start = time.perf_counter()
        batch = to_device(next(loader), DEVICE)
        sync()
        t_data = time.perf_counter() - start
        total, terms, out = trainer.step_module(batch, 0)
        sync()
        t_backward = time.perf_counter()
        total.backward()
        sync()
        t_backward_end = time.perf_counter()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        sync()
        elapsed = time.perf_counter() - start
        if it == 0:
            continue  # warm-up
        t = dict(clock.totals)
        if it == 1 and __import__("os").environ.get("UMR_BENCH_DEBUG"):
            print({k: round(v, 3) for k, v in t.items()}, "backward", round(t_backward_end - t_backward, 3), "total", round(elapsed, 3))
        render = t.get("render_fwd", 0) + t.get("render_bwd", 0)
        encoder = t.get("encoder_fwd", 0) + (t_backward_end - marks.get("encoder_bwd_start", t_backward_end))
        losses = t.get("objective_fwd", 0) - t.get("render_fwd", 0)
        step_times.append(elapsed)
        records.append({"render": render / elapsed, "encoder": encoder / elapsed, "losses": losses / elapsed,
                        "data": t_data / elapsed})
    shares = {k: statistics.median(r[k] for r in records) for k in records[0]}
    print(json.dumps({
        "s_per_iter": round(statistics.median(step_times), 3),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "share_render": round(shares["render"], 3),
        "share_encoder": round(shares["encoder"], 3),
        "share_losses": round(shares["losses"], 3),
        "share_data": round(shares["data"], 3),
        "share_other": round(1 - sum(shares.values()), 3),
        "img_size": args.img_size,
        "batch_size": args.batch_size,
        **quick,
        "uv_height": model.texture_predictor.uv_height,
        "uv_channels": args.uv_channels,
        "amp": args.amp,
        "channels_last": not args.nochannels_last,
        "threads": torch.get_num_threads(),
        "device": str(DEVICE) if DEVICE.type == "cpu" else torch.cuda.get_device_name(DEVICE),
        **({"peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated(DEVICE) / 2**30, 3)}
           if DEVICE.type == "cuda" else {}),
    }))


if __name__ == "__main__":
    main()
