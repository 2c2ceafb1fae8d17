"""Tensor-parallel FFNs on 2 CPU processes (gloo): gate/up column-parallel, down row-parallel, all-reduce.

CountDown is shard-local: each rank selects among its own neurons, the all-reduce stays where it was.
"""

import os
import socket
import sys
import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from countdown_fx.distributed import destroy_process_group

WORLD = 2
D_MODEL, D_INTER = 32, 96


class ShardedFeedForward(nn.Module):
    """One rank's shard of w2(silu(w1 x) * w3 x): rows of w1/w3 and columns of w2, then an all-reduce."""

    def __init__(self, w1, w3, w2, rank, world):
        super().__init__()
        part = slice(rank * w1.shape[0] // world, (rank + 1) * w1.shape[0] // world)
        self.w1 = nn.Linear(D_MODEL, w1.shape[0] // world, bias=False)
        self.w3 = nn.Linear(D_MODEL, w1.shape[0] // world, bias=False)
        self.w2 = nn.Linear(w1.shape[0] // world, D_MODEL, bias=False)
        with torch.no_grad():
            self.w1.weight.copy_(w1[part])
            self.w3.weight.copy_(w3[part])
            self.w2.weight.copy_(w2[:, part])

    def forward(self, x):
        return funcol.all_reduce(self.w2(F.silu(self.w1(x)) * self.w3(x)), "sum", dist.group.WORLD)


def _spawn(worker, *args, timeout_s: float = 600) -> None:
    """mp.spawn of WORLD processes with a deadline: a hung collective fails the test, not the whole CI job."""
    ctx = mp.spawn(worker, args=args, nprocs=WORLD, join=False)
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for process in ctx.processes:
                process.kill()
                process.join()
            pytest.fail(f"{worker.__name__} did not finish within {timeout_s:.0f} s (a hung collective?)")


def _weights():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*shape, generator=g) / shape[1] ** 0.5
            for shape in ((D_INTER, D_MODEL), (D_INTER, D_MODEL), (D_MODEL, D_INTER))]


def _shard_local_topk(x, w1, w3, w2, sparsity):
    """Independent reference: each shard keeps its own top (1 - s) of |up| per token; shards are summed."""
    out = 0
    n = D_INTER // WORLD
    keep = n - round(sparsity * n)
    for r in range(WORLD):
        part = slice(r * n, (r + 1) * n)
        g, u = F.silu(x @ w1[part].t()), x @ w3[part].t()
        idx = u.abs().topk(keep, dim=-1).indices
        mask = torch.zeros_like(u).scatter_(-1, idx, 1.0)
        out = out + (g * u * mask) @ w2[:, part].t()
    return out


def _countdown(model, **options):
    """A fresh countdown compile of `model` (Dynamo reset: no graph of an earlier option set is reused)."""
    torch._dynamo.reset()
    return torch.compile(model, backend="countdown", options=options)


def _as_torch_211_graph(gm, mesh):
    """gm with DTensor's calls written as torch 2.11's Dynamo writes them: from_local, redistribute and
    to_local become call_functions of closures (placements bound inside, the mesh no graph input), named as
    2.11 names them. Torch >= 2.12 writes DTensor.from_local and methods; the GPU machine runs 2.11, where the
    matcher once found no site. A 2.11 graph comes back unchanged."""
    from torch.distributed.tensor import DTensor

    def handle_from_local(placements, kwargs):
        def fn_with_prim_types(x):
            return DTensor.from_local(x, mesh, placements, **kwargs)
        return fn_with_prim_types

    def make_redistribute(kwargs):
        def redistribute_fn_with_prim_types(t):
            return t.redistribute(**kwargs)
        return redistribute_fn_with_prim_types

    def to_local_fn_with_prim_types(t):
        return t.to_local()

    for node in list(gm.graph.nodes):
        if node.op == "call_function" and getattr(node.target, "__name__", "") == "from_local":
            target, args = handle_from_local(node.args[2], dict(node.kwargs)), node.args[:1]
        elif node.op == "call_method" and node.target == "redistribute":
            target, args = make_redistribute(dict(node.kwargs)), node.args[:1]
        elif node.op == "call_method" and node.target == "to_local":
            target, args = to_local_fn_with_prim_types, node.args
        else:
            continue
        with gm.graph.inserting_after(node):
            new = gm.graph.call_function(target, args)
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.recompile()
    assert not any(n.op == "call_method" for n in gm.graph.nodes), gm.graph
    return gm


def _worker(rank, port, tmp):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        sys.path.insert(0, os.path.dirname(__file__))
        import countdown_fx

        w1, w3, w2 = _weights()
        model = ShardedFeedForward(w1, w3, w2, rank, WORLD).eval()
        x = torch.randn(3, 1, D_MODEL, generator=torch.Generator().manual_seed(1))
        sites = countdown_fx.find_sites(model, x)
        assert [(s.key, s.shard, s.d_inter) for s in sites] == [(f"<root>@tp{rank}of{WORLD}", f"tp{rank}of{WORLD}",
                                                                  D_INTER // WORLD)]
        with torch.no_grad():
            dense = F.linear(F.silu(x @ w1.t()) * (x @ w3.t()), w2)
            out = _countdown(model, sparsity=0.0)(x)
            torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)
            out = _countdown(model, sparsity=0.6)(x)
            torch.testing.assert_close(out, _shard_local_topk(x, w1, w3, w2, 0.6), rtol=1e-5, atol=1e-5)
            # per-shard calibration: keyed by rank, and refused by an unsharded model
            batches = [torch.randn(4, 16, D_MODEL, generator=torch.Generator().manual_seed(i)) for i in range(3)]
            cal = countdown_fx.calibrate(model, batches, countdown_fx.CountDownConfig(sparsity=0.7, regime="prac"),
                                         progress=False)
            assert list(cal.state) == [f"<root>@tp{rank}of{WORLD}"]
            cal.save(os.path.join(tmp, f"rank{rank}.safetensors"))
            out = _countdown(model, calibration=cal)(x)
            assert (out - dense).abs().max() > 1e-4
    finally:
        destroy_process_group()


def _dtensor_worker(rank, port):
    """The same FFN sharded by torch.distributed.tensor.parallel (DTensor column/row-parallel linears)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        sys.path.insert(0, os.path.dirname(__file__))
        import countdown_fx
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
        from tiny_models import GptFastFeedForward

        w1, w3, w2 = _weights()
        model = GptFastFeedForward(D_MODEL, D_INTER).eval()
        with torch.no_grad():
            for lin, w in ((model.w1, w1), (model.w3, w3), (model.w2, w2)):
                lin.weight.copy_(w)
        mesh = init_device_mesh("cpu", (WORLD,))
        parallelize_module(model, mesh, {"w1": ColwiseParallel(), "w3": ColwiseParallel(), "w2": RowwiseParallel()})
        x = torch.randn(3, 1, D_MODEL, generator=torch.Generator().manual_seed(1))
        sites = countdown_fx.find_sites(model, x)
        assert [(s.key, s.d_inter) for s in sites] == [(f"<root>@tp{rank}of{WORLD}", D_INTER // WORLD)]
        with torch.no_grad():
            dense = F.linear(F.silu(x @ w1.t()) * (x @ w3.t()), w2)
            for sparsity, want in ((0.0, dense), (0.6, _shard_local_topk(x, w1, w3, w2, 0.6))):
                out = _countdown(model, sparsity=sparsity)(x)
                torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
            # the same graph in torch 2.11's form is matched and rewritten the same way
            from countdown_fx.backend import eager_backend
            from countdown_fx.passes.rewrite import counters

            rewrite = eager_backend({"sparsity": 0.6})
            before = counters["sites_rewritten"]
            torch._dynamo.reset()
            out = torch.compile(model, backend=lambda gm, ex: rewrite(_as_torch_211_graph(gm, mesh), ex))(x)
            assert counters["sites_rewritten"] - before == 1
            torch.testing.assert_close(out, _shard_local_topk(x, w1, w3, w2, 0.6), rtol=1e-5, atol=1e-5)
            # sequence parallel (down's output reduce-scattered over tokens) is not the all-reduce the rewrite
            # inserts: the FFN is left dense, with the right output
            from torch.distributed.tensor import Shard

            seq = GptFastFeedForward(D_MODEL, D_INTER).eval()
            for lin, w in ((seq.w1, w1), (seq.w3, w3), (seq.w2, w2)):
                lin.weight.copy_(w)
            parallelize_module(seq, mesh, {"w1": ColwiseParallel(), "w3": ColwiseParallel(),
                                           "w2": RowwiseParallel(output_layouts=Shard(1))})
            xs = torch.randn(2, 2 * WORLD, D_MODEL, generator=torch.Generator().manual_seed(2))
            before = counters["sites_rewritten"]
            with pytest.warns(UserWarning, match="no gated FFN"):
                out = _countdown(seq, sparsity=0.6)(xs)
            assert counters["sites_rewritten"] == before
            dense_seq = F.linear(F.silu(xs @ w1.t()) * (xs @ w3.t()), w2)
            torch.testing.assert_close(out, dense_seq[:, 2 * rank:2 * rank + 2], rtol=1e-5, atol=1e-5)
            # calibration on the DTensor model: one threshold per shard, applied shard-locally
            batches = [torch.randn(4, 16, D_MODEL, generator=torch.Generator().manual_seed(i)) for i in range(3)]
            cal = countdown_fx.calibrate(model, batches, countdown_fx.CountDownConfig(sparsity=0.7, regime="prac"),
                                         progress=False)
            assert list(cal.state) == [f"<root>@tp{rank}of{WORLD}"]
            thresholds = [None] * WORLD
            dist.all_gather_object(thresholds, float(cal.state[f"<root>@tp{rank}of{WORLD}"]["threshold"]))
            out = _countdown(model, calibration=cal, apply_to="all")(x)
            n = D_INTER // WORLD
            want = 0
            for r, t in enumerate(thresholds):
                part = slice(r * n, (r + 1) * n)
                u = x @ w3[part].t()
                want = want + (F.silu(x @ w1[part].t()) * u * (u.abs() > t)) @ w2[:, part].t()
            torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    finally:
        destroy_process_group()


def test_dtensor_parallelized_ffn_on_two_gloo_processes():
    _spawn(_dtensor_worker, _free_port())


class BiasedFeedForward(nn.Module):
    """w2(silu(w1 x + b1) * (w3 x + b3)) + b2: under DTensor TP, b1/b3 are sharded with their rows and b2 is
    replicated (added once, after the all-reduce)."""

    def __init__(self):
        super().__init__()
        self.w1, self.w3 = nn.Linear(D_MODEL, D_INTER), nn.Linear(D_MODEL, D_INTER)
        self.w2 = nn.Linear(D_INTER, D_MODEL)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def _dtensor_bias_worker(rank, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        import countdown_fx
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        torch.manual_seed(0)  # same weights on both ranks
        model = BiasedFeedForward().eval()
        with torch.no_grad():
            for lin in (model.w1, model.w3, model.w2):
                lin.bias.normal_()
        full = {name: p.detach().clone() for name, p in model.named_parameters()}
        parallelize_module(model, init_device_mesh("cpu", (WORLD,)),
                           {"w1": ColwiseParallel(), "w3": ColwiseParallel(), "w2": RowwiseParallel()})
        x = torch.randn(3, 1, D_MODEL, generator=torch.Generator().manual_seed(1))
        assert [s.key for s in countdown_fx.find_sites(model, x)] == [f"<root>@tp{rank}of{WORLD}"]
        n = D_INTER // WORLD
        keep = n - round(0.6 * n)
        want = full["w2.bias"].clone()
        for r in range(WORLD):  # shard-local top-k of |up|, each shard's partial sum, the bias once
            part = slice(r * n, (r + 1) * n)
            u = x @ full["w3.weight"][part].t() + full["w3.bias"][part]
            g = F.silu(x @ full["w1.weight"][part].t() + full["w1.bias"][part])
            mask = torch.zeros_like(u).scatter_(-1, u.abs().topk(keep, dim=-1).indices, 1.0)
            want = want + (g * u * mask) @ full["w2.weight"][:, part].t()
        with torch.no_grad():
            dense = model(x)
            for sparsity, expected in ((0.0, dense), (0.6, want)):
                out = _countdown(model, sparsity=sparsity)(x)
                torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
            batches = [torch.randn(4, 16, D_MODEL, generator=torch.Generator().manual_seed(i)) for i in range(3)]
            cal = countdown_fx.calibrate(model, batches, countdown_fx.CountDownConfig(sparsity=0.5, regime="prac"),
                                         progress=False)
            out = _countdown(model, calibration=cal, apply_to="all")(x)
            assert torch.isfinite(out).all() and 1e-4 < (out - dense).abs().max() < dense.abs().max()

            # a gate bias replicated instead of sharded with its rows: not this layout, so not rewritten
            # (each rank would otherwise read the first half of the full bias)
            from torch.distributed.tensor import Replicate, distribute_tensor

            model.w1.bias = nn.Parameter(distribute_tensor(full["w1.bias"], model.w1.weight.device_mesh, [Replicate()]))
            assert countdown_fx.find_sites(model, x) == []
            out = _countdown(model, sparsity=0.6)(x)
            torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)
    finally:
        destroy_process_group()


def test_dtensor_ffn_with_biases_on_two_gloo_processes():
    _spawn(_dtensor_bias_worker, _free_port())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sharded_ffn_on_two_gloo_processes(tmp_path):
    _spawn(_worker, _free_port(), str(tmp_path))
    # a calibration made on shard 0 of 2 does not load on the unsharded FFN
    import countdown_fx
    from tiny_models import GptFastFeedForward

    cal = countdown_fx.Calibration.load(tmp_path / "rank0.safetensors")
    unsharded = GptFastFeedForward(D_MODEL, D_INTER).eval()
    compiled = torch.compile(unsharded, backend="countdown", options={"calibration": cal})
    with pytest.raises(Exception, match=r"no state for site '<root>'.*'<root>@tp0of2'"):
        compiled(torch.randn(1, 1, D_MODEL))


def _bf16_worker(rank, port, device_type):
    """DTensor tensor parallelism in bf16 at a larger shape; on 2 GPUs (NCCL) the decode steps run the Triton
    kernels under CUDA graphs. s=0 equals the unsharded FFN; a calibrated M-CountDown equals the per-shard
    reference op summed over shards."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NCCL_NVLS_ENABLE="0")
    cuda = device_type == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=WORLD)
    try:
        sys.path.insert(0, os.path.dirname(__file__))
        import countdown_fx
        from countdown_fx.kernels import reference
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
        from tiny_models import GptFastFeedForward

        d_model, d_inter, bf16 = 512, 1408, torch.bfloat16
        dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
        g = torch.Generator().manual_seed(0)
        w1, w3 = (torch.randn(d_inter, d_model, generator=g) / d_model ** 0.5 for _ in range(2))
        w2 = torch.randn(d_model, d_inter, generator=g) / d_inter ** 0.5
        w1, w3, w2 = (w.to(dev, bf16) for w in (w1, w3, w2))
        model = GptFastFeedForward(d_model, d_inter).eval().to(dev, bf16)
        with torch.no_grad():
            for lin, w in ((model.w1, w1), (model.w3, w3), (model.w2, w2)):
                lin.weight.copy_(w)
        parallelize_module(model, init_device_mesh(device_type, (WORLD,)),
                           {"w1": ColwiseParallel(), "w3": ColwiseParallel(), "w2": RowwiseParallel()})
        x = torch.randn(3, 1, d_model, generator=torch.Generator().manual_seed(1)).to(dev, bf16)
        with torch.no_grad():
            dense = F.linear(F.silu(x.float() @ w1.float().t()) * (x.float() @ w3.float().t()), w2.float())
            out = _countdown(model, sparsity=0.0)(x)
            torch.testing.assert_close(out.float(), dense, rtol=2e-2, atol=2e-2)

            batches = [torch.randn(4, 16, d_model, generator=torch.Generator().manual_seed(i)).to(dev, bf16)
                       for i in range(3)]
            cal = countdown_fx.calibrate(model, batches, countdown_fx.CountDownConfig(sparsity=0.7, regime="prac"),
                                         progress=False)
            thresholds = [None] * WORLD
            dist.all_gather_object(thresholds, float(cal.state[f"<root>@tp{rank}of{WORLD}"]["threshold"]))
            from countdown_fx.passes.rewrite import counters

            stored_before = counters["w_down_t_bytes"]
            step = _countdown(model, calibration=cal, mode="reduce-overhead" if cuda else None)
            with warnings.catch_warnings():  # the kernels announce a weight they must copy on every call
                warnings.filterwarnings("error", message=".*no contiguous rows")
                for _ in range(3):  # warm-up, record, replay
                    out = step(x).clone()
            # on CUDA this shard's W_down^T (not the whole W_down) is stored once, at compile time
            stored = counters["w_down_t_bytes"] - stored_before
            assert stored == (d_model * d_inter // WORLD * 2 if cuda else 0), stored
            n = d_inter // WORLD
            want = 0
            for r, t in enumerate(thresholds):
                part = slice(r * n, (r + 1) * n)
                want = want + reference.threshold_ffn(x, w1[part], w3[part], w2[:, part].t(), None, None, None,
                                                      "silu", "up", torch.tensor(t, device=dev)).float()
            torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-2)
            assert (out.float() - dense).abs().max() > 0.05  # really sparse
    finally:
        destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < WORLD, reason="needs 2 GPUs (device kind nvidia-h200-x2)")
def test_dtensor_parallelized_ffn_on_two_gpus_nccl():
    _spawn(_bf16_worker, _free_port(), "cuda", timeout_s=240)  # inside the device tool's 600 s per command


def test_dtensor_parallelized_bf16_ffn_on_two_gloo_processes():
    """The 2-GPU test's body on CPU, so CI checks what the GPU run will check (the reference path here)."""
    _spawn(_bf16_worker, _free_port(), "cpu")


def test_destroy_process_group_frees_cuda_graphs_first_and_always_destroys(monkeypatch):
    """The CUDA graphs go first (a captured NCCL collective would hang the destroy), and the group is destroyed
    even when freeing them fails (a CUDA fault at the end of a run), the failure still raised."""
    import countdown_fx.distributed as cdist

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: calls.append("synchronize"))
    monkeypatch.setattr(torch._dynamo, "reset", lambda: calls.append("reset"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda group=None: calls.append(("destroy", group)))
    cdist.destroy_process_group("g")
    assert calls == ["synchronize", "reset", ("destroy", "g")]

    calls.clear()

    def fault():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch.cuda, "synchronize", fault)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        cdist.destroy_process_group()
    assert calls == [("destroy", None)]
