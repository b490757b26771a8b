"""umr: a modern, tested reimplementation of UMR (Li et al., ECCV 2020)."""
__version__ = "0.1.0"


def available_kernels() -> list[str]:
    """Devices the compiled soft-rasterizer extension ``umr._C`` supports (empty if not built)."""
    import torch  # noqa: F401  (loads libc10, which umr._C links against)

    try:
        from umr import _C
    except ImportError:
        return []
    return list(_C.available_devices())
