"""Shutting down a tensor-parallel run whose collectives were captured in CUDA graphs."""

from __future__ import annotations

import gc

import torch
import torch.distributed as dist


def destroy_process_group(group=None) -> None:
    """torch.distributed.destroy_process_group, after freeing the CUDA graphs that torch.compile recorded.

    A CUDA graph that captured NCCL collectives keeps their communicator busy, and destroying the group then
    waits forever (pytorch/pytorch#115388). A sharded model compiled with mode="reduce-overhead" records
    such graphs, so call this instead of dist.destroy_process_group at the end of the run. Where CUDA is in
    use, it also drops every compiled function (torch._dynamo.reset(), which frees the graphs): a later call
    compiles again. The group is destroyed even if freeing the graphs fails."""
    try:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
            torch._dynamo.reset()  # also resets the CUDA graph trees, where the recorded graphs live
            gc.collect()
    finally:
        dist.destroy_process_group(group)
