"""A small sample of a site's weights, kept with its calibration, to tell whether a model being compiled has the
weights the calibration was made on.

Why: keys, sizes and activation all match between two checkpoints of one architecture (a base model and its
fine-tune, or a model with fewer layers named the same way), yet thresholds and predictors fit only the weights
they were calibrated on; deployed on others they miss the target sparsity and quality, with no error. Sixteen
values of each of W_gate, W_up and W_down at fixed positions tell two checkpoints apart, cost nothing to store
(JSON in the file's metadata), and survive a change of dtype: two values count as the same within one unit in
the last place of the coarser dtype, so a calibration made in fp32 fits the same model cast to bf16.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensor

from .match import Site, is_dtensor, weight_value

PER_MATRIX = 16
# More than this fraction of sampled values differing means other weights (a margin for values near zero).
MAX_DIFFERING = 1 / 8


def positions(shape: Sequence[int], n: int = PER_MATRIX) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of n fixed positions spread over a 2-D matrix by a multiplicative hash of 0..n-1: a function
    of the shape only, so calibration and deployment read the same elements."""
    rows, cols = int(shape[0]), int(shape[1])
    flat = torch.tensor([(i * 2654435761 + 97) % (rows * cols) for i in range(n)], dtype=torch.long)
    return flat // cols, flat % cols


def readable(tensor) -> bool:
    """Whether a weight's values can be read here: a real tensor, not a fake, meta or distributed one."""
    return (isinstance(tensor, torch.Tensor) and not isinstance(tensor, FakeTensor) and not is_dtensor(tensor)
            and tensor.device.type != "meta")


def sample(w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> dict | None:
    """{"dtype", "values"}: PER_MATRIX values of each matrix (as stored: gate and up [d_inter, d_model], down
    [d_model, d_inter]) as Python floats, or None when a weight cannot be read."""
    matrices = (w_gate, w_up, w_down)
    if not all(readable(w) and w.dim() == 2 for w in matrices):
        return None
    values = []
    with torch.no_grad():
        for w in matrices:
            rows, cols = positions(w.shape)
            values.append(w.detach()[rows.to(w.device), cols.to(w.device)].float())
    return {"dtype": str(w_gate.dtype).replace("torch.", ""), "values": torch.cat(values).cpu().tolist()}


def differing(stored: dict, now: dict) -> int:
    """How many sampled values differ by more than one unit in the last place of the coarser of the two dtypes
    at that value (NaN equals NaN): a cast of the same weights moves a value by at most that (half of it, or
    two roundings from fp32 to bf16 and to fp16), a weight update of a few per cent by more."""
    a, b = (torch.tensor(s["values"], dtype=torch.float64) for s in (stored, now))
    if a.shape != b.shape:
        return max(a.numel(), b.numel())
    magnitude = torch.maximum(a.abs(), b.abs())
    # the spacing of a dtype at v: eps * |v| for normal numbers, eps * smallest_normal below them (fp16's
    # subnormals are coarse: 6e-8 apart, where bf16 still spaces values 1.5e-8 apart at 2e-6)
    ulp = torch.stack([torch.finfo(d).eps * magnitude.clamp(min=torch.finfo(d).smallest_normal)
                       for d in (getattr(torch, stored["dtype"]), getattr(torch, now["dtype"]))]).amax(0)
    same = ((a - b).abs() <= ulp) | (a.isnan() & b.isnan())
    return int((~same).sum())


def few_enough(n_differing: int, stored: dict) -> bool:
    """Whether n_differing of a stored sample's values is few enough to call the weights the same."""
    return n_differing <= MAX_DIFFERING * len(stored["values"])


def fits(stored: dict, now: dict) -> bool:
    return few_enough(differing(stored, now), stored)


def site_sample(gm: fx.GraphModule, site: Site, example_inputs: Sequence | None) -> dict | None:
    """The sample of a site's weights in a graph, read the way the observers see them (a fused gate_up split into
    its halves), or None where they cannot be read (fake or meta weights, placeholders without example
    inputs). Not for sharded sites: a shard is not the matrix a calibration sampled."""
    gate = weight_value(gm, site.gate_weight, example_inputs)
    up = weight_value(gm, site.up_weight, example_inputs)
    down = weight_value(gm, site.down_weight, example_inputs)
    if site.fused is not None and readable(gate):
        first, second = gate[: site.d_inter], gate[site.d_inter: 2 * site.d_inter]
        gate, up = (first, second) if site.fused == "gate-up" else (second, first)
    return sample(gate, up, down)
