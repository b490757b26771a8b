"""Shared fixtures."""
import pytest
import torch

from umr.data import synth_birds


def cuda_ready() -> bool:
    """A CUDA device that torch sees, and a build of the rasterizer with the CUDA kernel."""
    import umr

    return torch.cuda.is_available() and "cuda" in umr.available_kernels()


CUDA = pytest.param("cuda", marks=[pytest.mark.cuda,
                                   pytest.mark.skipif(not cuda_ready(), reason="no CUDA device or CUDA kernel")])


def to_device(tree, device):
    """The tensors of a (nested) dict, list or tuple moved to device; other leaves unchanged."""
    if isinstance(tree, torch.Tensor):
        return tree.to(device)
    if isinstance(tree, dict):
        return {k: to_device(v, device) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_device(v, device) for v in tree)
    return tree


@pytest.fixture(params=["cpu", CUDA])
def device(request) -> torch.device:
    """Each available device: the CPU, and CUDA where there is one (marked ``cuda``)."""
    return torch.device(request.param)


@pytest.fixture(scope="session")
def synth_set(tmp_path_factory):
    """``synth_set(seed, num_train, num_val, num_test, photo_size=160)``: the folder of a small
    synthetic bird set, generated once per session for each set of arguments."""
    made = {}

    def make(seed: int, num_train: int, num_val: int, num_test: int, photo_size: int = 160):
        key = (seed, num_train, num_val, num_test, photo_size)
        if key not in made:
            root = tmp_path_factory.mktemp(f"synth_{seed}")
            synth_birds.generate(root, seed=seed, photo_size=photo_size, workers=1, progress=False,
                                 num_train=num_train, num_val=num_val, num_test=num_test)
            made[key] = root
        return made[key]

    return make


def stage2_batch(size: int, batch: int, seed: int = 1) -> dict:
    """A random stage-2 training batch of the bird category (every key the objective and the
    trainer's noise read), with a box-shaped mask, drawn from ``seed``."""
    from umr.category import BIRDS

    g = torch.Generator().manual_seed(seed)
    data = {"img": torch.rand(batch, 3, size, size, generator=g), "mask": torch.zeros(batch, size, size),
            "mask_dt": torch.rand(batch, size, size, generator=g),
            "part_prob": torch.rand(batch, 5, size, size, generator=g),
            "eps_z": torch.randn(batch, 350, generator=g), "u_cam": torch.rand(batch, generator=g),
            "gan_angle": torch.randint(0, 180, (batch,), generator=g).float(),
            **{f"{p}_points": torch.rand(batch, 10, 2, generator=g) - 0.5 for p in BIRDS.part_names}}
    data["mask"][:, size // 4 : 3 * size // 4, size // 6 : size - size // 6] = 1
    return data
