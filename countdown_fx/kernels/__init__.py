"""Compute for the CountDown ops: PyTorch reference semantics, custom-op registration, Triton kernels."""

from . import ops, reference  # noqa: F401  (importing ops registers torch.ops.countdown.*)
