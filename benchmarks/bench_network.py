"""Seconds of the networks alone (MeshNet forward, backward of a smooth loss of its outputs, fused
Adam update: no rendering, no UMR loss) in each layout and precision, and with ``torch.compile``;
prints one JSON line.

    python -m benchmarks.bench_network [--img_size 64] [--batch_size 16] [--iters 5]
        [--uv_height 0 --uv_channels 256] [--no_compile] [--device cpu|cuda]

Keys: ``<variant>_s`` (median seconds per step) for the variants ``nchw``, ``channels_last``,
``amp`` (channels-last and bfloat16 autocast) and ``compiled`` (channels-last under
``torch.compile``), and ``compile_first_step_s`` (the first compiled step, compilation included);
on CUDA also ``peak_gpu_mem_gib``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from umr.nets import MeshNet


def seconds_per_step(model, img, optimizer, iters: int, amp: bool = False, forward=None) -> tuple:
    """(first step's seconds, median seconds of the next ``iters``)."""
    forward = model if forward is None else forward

    def step():
        with torch.autocast(img.device.type, dtype=torch.bfloat16, enabled=amp):
            out = forward(img)
        loss = sum(v.float().square().mean() for v in out.values()
                   if torch.is_tensor(v) and v.is_floating_point() and v.requires_grad)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if img.device.type == "cuda":
            torch.cuda.synchronize(img.device)

    times = []
    for _ in range(iters + 1):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times[0], statistics.median(times[1:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--img_size", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--uv_height", type=int, default=0, help="texture-flow network size (0: UMR's 128)")
    parser.add_argument("--uv_channels", type=int, default=256, help="texture-flow decoder channels (UMR's 256)")
    parser.add_argument("--no_compile", action="store_true", help="skip torch.compile (it compiles for a minute or more)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    torch.manual_seed(0)
    model = MeshNet(stage=2, img_size=args.img_size, pretrained_encoder=False, uv_height=args.uv_height or None,
                    uv_channels=args.uv_channels).to(device).train()
    img = torch.rand(args.batch_size, 3, args.img_size, args.img_size, device=device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
    result = {}
    result["nchw_s"] = seconds_per_step(model, img, optimizer, args.iters)[1]
    model.to(memory_format=torch.channels_last)
    result["channels_last_s"] = seconds_per_step(model, img, optimizer, args.iters)[1]
    result["amp_s"] = seconds_per_step(model, img, optimizer, args.iters, amp=True)[1]
    if not args.no_compile:
        first, result["compiled_s"] = seconds_per_step(model, img, optimizer, args.iters, forward=torch.compile(model))
        result["compile_first_step_s"] = first
    print(json.dumps({**{k: round(v, 3) for k, v in result.items()}, "img_size": args.img_size,
                      "batch_size": args.batch_size, "uv_height": model.texture_predictor.uv_height,
                      "uv_channels": args.uv_channels, "threads": torch.get_num_threads(),
                      "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
                      **({"peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3)}
                         if device.type == "cuda" else {})}))


if __name__ == "__main__":
    main()
