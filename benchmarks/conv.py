"""Speed and memory of GMRConv (dense, rings, auto) against torch's convolution.

Run with ``gmrpath benchmark conv``. Default shape: the paper's (2, 128, 64, 64) -> 128
channels, k = 3, 5, 7, 9, 11; forward (inference, ``no_grad``, eval mode) and
forward+backward (train mode). The official ``gmr-conv`` package joins as a column when it
is installed (``pip install gmr-path[bench]``).

Example:
    >>> from benchmarks.conv import run_conv_benchmark
    >>> result = run_conv_benchmark(kernel_sizes=(3,), shape=(1, 4, 16, 16), out_channels=4, repeats=1)
    >>> sorted(result["rows"][0]["forward_ms"])[:2]
    ['conv', 'gmr_auto']
"""

from __future__ import annotations

from typing import Sequence

import torch

from gmr_models import GMRConv, freeze_kernels

from .common import device_name, interleaved_best_ms, peak_memory_mb

__all__ = ["run_conv_benchmark", "reference_conv", "run_network_benchmark", "run_impl_benchmark", "impl_shapes"]


def reference_conv(in_channels: int, out_channels: int, kernel_size: int, spatial_dims: int = 2):
    """The authors' ``GMR_Conv2d`` from the ``gmr-conv`` package, or None when not installed."""
    if spatial_dims != 2:
        return None
    try:
        from GMR_Conv import GMR_Conv2d
    except ImportError:  # gmr-conv or its torchio/torchvision imports are missing
        return None
    return GMR_Conv2d(in_channels, out_channels, kernel_size, padding="same")


def _candidates(cin: int, cout: int, k: int, d: int, device: torch.device) -> dict[str, torch.nn.Module]:
    conv_cls = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[d]
    mods: dict[str, torch.nn.Module] = {"conv": conv_cls(cin, cout, k, padding=k // 2)}
    for impl in ("dense", "rings", "auto"):
        mods[f"gmr_{impl}"] = GMRConv(d, cin, cout, k, impl=impl)
    ref = reference_conv(cin, cout, k, d)
    if ref is not None:
        mods["gmr_conv_pkg"] = ref
    return {name: m.to(device) for name, m in mods.items()}


def run_conv_benchmark(
    kernel_sizes: Sequence[int] = (3, 5, 7, 9, 11),
    shape: Sequence[int] = (2, 128, 64, 64),
    out_channels: int = 128,
    device: str | torch.device = "cpu",
    repeats: int = 7,
    memory: bool = True,
    progress=None,
) -> dict:
    """Time every candidate at every kernel size; return a JSON-ready dict.

    Args:
        kernel_sizes: odd kernel sizes to test.
        shape: input shape ``(N, C, *spatial)``; its length sets ``spatial_dims``.
        out_channels: output channels.
        device: where to run.
        repeats: timed rounds per measurement (the best is reported).
        memory: also record peak memory of one forward+backward per candidate.
        progress: optional callable ``progress(k)`` called after each kernel size.

    Returns:
        ``{"device", "shape", "out_channels", "rows": [{"k", "forward_ms", "train_ms",
        "train_peak_mb", "auto_choice_forward", "auto_choice_train"}, ...]}``.
    """
    device = torch.device(device)
    shape = tuple(int(s) for s in shape)
    d = len(shape) - 2
    x = torch.randn(shape, device=device)
    rows = []
    for k in kernel_sizes:
        mods = _candidates(shape[1], out_channels, k, d, device)

        def infer(m):
            def run():
                with torch.no_grad():
                    m(x)
            return run

        def train(m):
            def run():
                m.zero_grad(set_to_none=True)
                m(x).sum().backward()
            return run

        for m in mods.values():
            freeze_kernels(m.eval())
        fwd = interleaved_best_ms({n: infer(m) for n, m in mods.items()}, device, repeats)
        for m in mods.values():
            m.train()
        bwd = interleaved_best_ms({n: train(m) for n, m in mods.items()}, device, repeats)
        peak = {n: peak_memory_mb(train(m), device) for n, m in mods.items()} if memory else {}
        auto = mods["gmr_auto"]
        with torch.no_grad():
            choice_fwd = auto.choose_impl(x)
        choice_train = auto.choose_impl(x)
        rows.append(
            {
                "k": k,
                "forward_ms": fwd,
                "train_ms": bwd,
                "train_peak_mb": peak,
                "auto_choice_forward": choice_fwd,
                "auto_choice_train": choice_train,
            }
        )
        if progress is not None:
            progress(k)
    return {
        "benchmark": "conv",
        "device": device_name(device),
        "torch": torch.__version__,
        "shape": list(shape),
        "out_channels": out_channels,
        "repeats": repeats,
        "rows": rows,
    }


def summary_rows(result: dict) -> list[dict]:
    """Ratios for the report: speed-ups over torch's conv and auto against the best GMR path."""
    out = []
    for row in result["rows"]:
        entry = {"k": row["k"]}
        for phase in ("forward_ms", "train_ms"):
            times = row[phase]
            tag = "fwd" if phase == "forward_ms" else "train"
            entry[f"{tag}_conv_ms"] = times["conv"]
            for name in ("gmr_dense", "gmr_rings", "gmr_auto", "gmr_conv_pkg"):
                if name in times:
                    entry[f"{tag}_speedup_{name}"] = times["conv"] / times[name]
            best = min(times["gmr_dense"], times["gmr_rings"])
            entry[f"{tag}_auto_vs_best"] = times["gmr_auto"] / best
        out.append(entry)
    return out


def run_network_benchmark(model: str = "gmr_resnet18", shape=(16, 3, 224, 224), device: str | torch.device = "cpu",
                          repeats: int = 3, **model_kwargs) -> dict:
    """Inference time of a whole registered network with every GMRConv forced to ``auto``,
    ``rings`` or ``dense`` (interleaved rounds, best of ``repeats``): checks the cost model where
    it matters, on real layer shapes.

    Returns:
        ``{"model", "shape", "device", "ms": {impl: ms}, "auto_choices": {"Cin->Cout kK": impl}}``.
    """
    from gmr_models import create_model

    device = torch.device(device)
    x = torch.randn(tuple(shape), device=device)
    if x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    nets = {}
    for impl in ("auto", "rings", "dense"):
        torch.manual_seed(0)
        net = create_model(model, spatial_dims=len(shape) - 2, in_channels=shape[1], **model_kwargs).to(device).eval()
        freeze_kernels(net)
        if x.dim() == 4:
            net = net.to(memory_format=torch.channels_last)
        for m in net.modules():
            if isinstance(m, GMRConv):
                m.impl = impl
        nets[impl] = net
    choices: dict[str, str] = {}

    def record(module, inputs, output):
        choices[f"{module.in_channels}->{module.out_channels} k{module.kernel_size}"] = module.choose_impl(inputs[0])

    hooks = [m.register_forward_hook(record) for m in nets["auto"].modules() if isinstance(m, GMRConv)]
    with torch.no_grad():
        nets["auto"](x)
    for h in hooks:
        h.remove()

    def run(net):
        def f():
            with torch.no_grad():
                net(x)
        return f

    ms = interleaved_best_ms({k: run(n) for k, n in nets.items()}, device, repeats, warmup=1)
    return {"benchmark": "network", "model": model, "model_kwargs": model_kwargs, "shape": list(shape),
            "device": device_name(device), "ms": ms, "auto_choices": choices}


def impl_shapes(channels=(16, 32, 64, 128), kernels=((3, 2), (3, 3), (5, 5), (9, 5)),
                sides=(64, 146, 291, 582), max_elements: int = 2 * 64 * 291 * 291) -> list[tuple[int, int, int, int, int]]:
    """The layer shapes ``(C_in, C_out, k, rings, side)`` the inference cost model is checked on:
    every width pair (equal, doubled), kernel and side, up to ``max_elements`` input values."""
    pairs = sorted({(c, o) for c in channels for o in (c, 2 * c) if o in channels})
    return [(c, o, k, n, s) for c, o in pairs for k, n in kernels for s in sides if c * s * s <= max_elements]


def run_impl_benchmark(shapes=None, device: str | torch.device = "cpu", repeats: int = 3) -> dict:
    """Inference time of one frozen :class:`GMRConv` (``sigma="channel"``) on the dense and the
    ring path for each layer shape (interleaved rounds, best of ``repeats``), and whether
    ``impl="auto"`` picked a path within 5% of the faster one.

    Returns:
        ``{"device", "rows": [{"shape", "dense_ms", "rings_ms", "auto", "auto_vs_best"}], "within_5pct", "n"}``.

    Example:
        >>> r = run_impl_benchmark([(4, 4, 3, 2, 16)], repeats=1)
        >>> r["n"], r["rows"][0]["auto"] in ("dense", "rings")
        (1, True)
    """
    device = torch.device(device)
    rows = []
    for cin, cout, k, n, side in shapes if shapes is not None else impl_shapes():
        torch.manual_seed(0)
        conv = GMRConv(2, cin, cout, k, num_rings=n, sigma="channel").to(device).eval().freeze()
        x = torch.randn(1, cin, side, side, device=device)
        with torch.no_grad():
            auto = conv.choose_impl(x)

        def run(impl):
            def f():
                conv.impl = impl
                with torch.no_grad():
                    conv(x)
            return f

        ms = interleaved_best_ms({"dense": run("dense"), "rings": run("rings")}, device, repeats, warmup=1)
        rows.append({"shape": [cin, cout, k, n, side], "dense_ms": ms["dense"], "rings_ms": ms["rings"], "auto": auto,
                     "auto_vs_best": ms[auto] / min(ms.values())})
    return {"benchmark": "impl", "device": device_name(device), "rows": rows, "n": len(rows),
            "within_5pct": sum(r["auto_vs_best"] <= 1.05 for r in rows)}
