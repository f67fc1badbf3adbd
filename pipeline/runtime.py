"""Run-time choices shared by the CLI and the pipeline stages: the compute device."""

from __future__ import annotations

import functools

import torch

__all__ = ["resolve_device", "code_digest", "bound_heap_growth"]


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; otherwise the named device.

    Raises:
        ValueError: for a device torch does not know, or CUDA asked for on a machine without it.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA GPU on this machine (use --device cpu)")
    return dev


_HEAP_BOUNDED = False


def bound_heap_growth(threshold_bytes: int = 1 << 20) -> bool:
    """Serve allocations above ``threshold_bytes`` from mmap, returned to the OS when freed.

    glibc raises its mmap threshold as large buffers are freed, after which tile batches and
    activations come from the heap, which fragments: measured here, peak memory of a 16x larger
    slide grew by 220 MiB without this and stayed flat with it (`gmrpath benchmark pipeline`).
    Linux/glibc only; elsewhere it does nothing and returns False.
    """
    global _HEAP_BOUNDED
    if _HEAP_BOUNDED:
        return True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        _HEAP_BOUNDED = bool(libc.mallopt(-3, int(threshold_bytes)))  # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False
    return _HEAP_BOUNDED


@functools.cache
def code_digest() -> str:
    """The package version and a digest of the code that computes results (``gmr_models`` and
    ``pipeline``): part of every resume fingerprint, so results computed by other code are
    recomputed, not reused.

    Example:
        >>> code_digest() == code_digest()
        True
    """
    import hashlib
    from importlib.metadata import PackageNotFoundError, version
    from pathlib import Path

    try:
        v = version("gmr-path")
    except PackageNotFoundError:
        v = "unknown"
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for f in sorted([*root.joinpath("gmr_models").rglob("*.py"), *root.joinpath("pipeline").rglob("*.py")]):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    return f"{v}+{h.hexdigest()[:12]}"
