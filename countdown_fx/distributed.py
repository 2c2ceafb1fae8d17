"""Shutting down a tensor-parallel run whose collectives were captured in CUDA graphs."""

from __future__ import annotations

import gc

import torch
import torch.distributed as dist


def destroy_process_group(group=None) -> None:
    """torch.distributed.destroy_process_group, after freeing the CUDA graphs that torch.compile recorded.

    A CUDA graph that captured NCCL collectives keeps their communicator busy, and destroying the group then
    waits forever (pytorch/pytorch#115388). A sharded model compiled with mode="reduce-overhead" records
    such graphs, so call this instead of dist.destroy_process_group at the end of the run. It also drops
    every compiled function (torch._dynamo.reset()): a later call compiles again."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        from torch._inductor.cudagraph_trees import reset_cudagraph_trees

        torch.cuda.synchronize()
        torch._dynamo.reset()
        reset_cudagraph_trees()
        gc.collect()
    dist.destroy_process_group(group)
