"""The GPU tier (``pytest -m cuda``): the CUDA kernel against the CPU kernel on the same scenes,
at the batch sizes of training, and a stage-2 training step on the GPU. Every test here is
skipped without a CUDA device; the kernel-vs-reference tests of test_rasterizer.py also run on
CUDA through the ``device`` fixture."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import cuda_ready, stage2_batch
from test_rasterizer import UMR, random_faces, random_textures
from umr.category import BIRDS
from umr.renderer import RasterSettings, soft_rasterize

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not cuda_ready(), reason="no CUDA device or CUDA kernel")]
REPO = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda")


def both(fv, tex, settings, grad_out=None):
    """Forward (and backward of ``(image * grad_out).sum()``) on the CPU's per-pixel path and on CUDA."""
    results = []
    for device, vectorize in ((torch.device("cpu"), False), (CUDA, True)):
        fv_ = fv.to(device).requires_grad_()
        tex_ = tex.to(device).requires_grad_()
        out = soft_rasterize(fv_, tex_, RasterSettings(**{**settings, "vectorize": vectorize}))
        if grad_out is not None:
            (out.image * grad_out.to(device)).sum().backward()
        results.append((out, fv_.grad, tex_.grad))
    return results


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_cuda_equals_cpu_on_the_same_scene(dtype, atol):
    fv = random_faces(4, 300, seed=31, dtype=dtype)
    tex = random_textures(fv, "surface", seed=32, res=6)
    grad_out = torch.randn(4, 4, 96, 96, dtype=dtype, generator=torch.Generator().manual_seed(33))
    (cpu, cpu_fv, cpu_tex), (gpu, gpu_fv, gpu_tex) = both(
        fv, tex, dict(image_size=96, return_p2f=True, **UMR), grad_out)
    assert torch.equal(cpu.face_index, gpu.face_index.cpu())
    # one math header; nvcc may contract a multiply-add, so depth agrees to rounding, not bits
    torch.testing.assert_close(gpu.depth.cpu(), cpu.depth, atol=atol, rtol=atol)
    torch.testing.assert_close(gpu.image.cpu(), cpu.image, atol=atol, rtol=0)
    torch.testing.assert_close(gpu.p2f.cpu(), cpu.p2f, atol=atol, rtol=0)
    # gradients are sums over pixels (atomics on CUDA, per-tile sums on the CPU): relative to size
    for a, b in ((gpu_fv, cpu_fv), (gpu_tex, cpu_tex)):
        scale = b.abs().max()
        assert scale > 0
        torch.testing.assert_close(a.cpu() / scale, b / scale, atol=10 * atol, rtol=0)


def test_cuda_binned_equals_unbinned_at_a_training_batch():
    """B·K = 128 renders of 256 px, as a stage-2 batch of 16 with 8 hypotheses makes."""
    fv = random_faces(128, 1280, seed=34, dtype=torch.float32, special=False).to(CUDA)
    tex = random_textures(fv, "surface", seed=35, res=6).to(CUDA)
    grad_out = torch.randn(128, 4, 256, 256, device=CUDA)
    results = []
    for binning in (True, False):
        fv_, tex_ = fv.clone().requires_grad_(), tex.clone().requires_grad_()
        out = soft_rasterize(fv_, tex_, RasterSettings(image_size=256, binning=binning, **UMR))
        (out.image * grad_out).sum().backward()
        results.append((out, fv_.grad, tex_.grad))
    (binned, b_fv, b_tex), (dense, d_fv, d_tex) = results
    assert torch.equal(binned.face_index, dense.face_index)
    torch.testing.assert_close(binned.image, dense.image, atol=1e-6, rtol=0)
    for a, b in ((b_fv, d_fv), (b_tex, d_tex)):
        torch.testing.assert_close(a / b.abs().max(), b / b.abs().max(), atol=1e-5, rtol=0)


def test_a_stage2_training_step_on_cuda_matches_the_cpu():
    from umr.nets import MeshNet
    from umr.objectives import ObjectiveConfig, Stage2Objective

    size, batch = 64, 4
    torch.manual_seed(0)
    model = MeshNet(stage=2, img_size=size, pretrained_encoder=False, uv_height=16, uv_channels=32)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    data = stage2_batch(size, batch)
    g = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 5, (1280, 36), generator=g)
    parts = {p: torch.arange(i * 10, i * 10 + 10) for i, p in enumerate(BIRDS.part_names)}
    totals, grads = [], []
    for device in (torch.device("cpu"), CUDA):
        model.load_state_dict(state)
        model.to(device).train()
        config = ObjectiveConfig.for_stage(2, image_size=size, texture_loss="l1", use_gan=False)
        objective = Stage2Objective(model, config, labels, parts).to(device)
        batch_on = {k: v.to(device) for k, v in data.items()}
        out = model(batch_on["img"], batch_on["eps_z"], batch_on["u_cam"])
        total, terms = objective(out, batch_on, 0)
        assert all(torch.isfinite(v) for v in terms.values())
        model.zero_grad()
        total.backward()
        totals.append(float(total))
        grads.append(torch.cat([p.grad.flatten().cpu() for p in model.parameters() if p.grad is not None]))
    assert totals[1] == pytest.approx(totals[0], rel=1e-4)
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0) > 0.999


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_torchrun_on_two_gpus_with_nccl(synth_set, tmp_path):
    root = synth_set(seed=11, num_train=8, num_val=0, num_test=0)
    flags = ["--dataset=synth_birds", f"--cub_dir={root / 'CUB_200_2011'}", f"--cub_cache_dir={root / 'cachedir' / 'cub'}", "--img_size=64",
             "--image_size=64", "--n_data_workers=0", "--name=ddp", f"--checkpoint_dir={tmp_path}",
             f"--vis_dir={tmp_path / 'vis'}", "--batch_size=4", "--nopretrained_encoder", "--texture_loss=l1",
             "--val_freq=0", "--display_freq=0", "--num_iter=2", "--device=cuda"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "experiments.train_s1", *flags]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "ddp" / "pred_net_latest.pth").is_file()
