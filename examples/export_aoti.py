"""torch.export -> countdown_fx.sparsify -> save / load -> AOTInductor package, on the embedded tiny Llama.

    python examples/export_aoti.py            # CPU: the package calls the reference ops
    python examples/export_aoti.py --device cuda   # GPU: the package runs the Triton decode kernels
"""

import argparse
import collections
import tempfile
from pathlib import Path

import torch
from torch.export import Dim

import countdown_fx
import countdown_fx.aoti
from countdown_fx.data import load_default_model, stdlib_corpus, token_batches, token_stream
from countdown_fx.kernels.ops import COUNTDOWN_OPS
from countdown_fx.passes.rewrite import STATE_PREFIX


class DecodeStep(torch.nn.Module):
    """Logits of one decode-shaped call (no KV cache), so the exported program is a plain tensor function."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids, use_cache=False).logits


def countdown_contents(ep: torch.export.ExportedProgram) -> tuple[collections.Counter, collections.Counter]:
    """(countdown op calls by op name, countdown state buffers by state name) of a sparsified program.
    Counted apart: the state buffers (thresholds, predictors) are graph inputs whose names contain
    "countdown" too, so counting every node that mentions it counts each site more than once."""
    op_calls = collections.Counter(n.target.name() for n in ep.graph.nodes
                                   if n.op == "call_function" and n.target in COUNTDOWN_OPS)
    # a state buffer is named STATE_PREFIX + site + "__" + state name (countdown_fx.passes.rewrite.state_attr)
    state = collections.Counter(name.rsplit("__", 1)[-1] for name in ep.graph_signature.buffers
                                if name.startswith(STATE_PREFIX))
    return op_calls, state


def describe_countdown(ep: torch.export.ExportedProgram) -> str:
    """One line: how many countdown ops (one per rewritten FFN site) and state buffers the program holds."""
    op_calls, state = countdown_contents(ep)
    return (f"{sum(op_calls.values())} countdown ops ({_itemised(op_calls)}) and {sum(state.values())} countdown "
            f"state buffers ({_itemised(state)}) in the exported program")


def _itemised(counter: collections.Counter) -> str:
    return ", ".join(f"{n} {name}" for name, n in sorted(counter.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sparsity", type=float, default=0.7)
    args = parser.parse_args()

    model, tokenizer = load_default_model()
    model.to(args.device)
    text = token_stream(stdlib_corpus(max_bytes=500_000).split("train"), tokenizer)
    batches = [b.to(args.device) for b in token_batches(text, batch_size=4, seq_len=128, seed=0, num_batches=4)]
    step = DecodeStep(model).eval()  # calibrate what is exported: its site keys are "model.model.layers.N.mlp"
    cal = countdown_fx.calibrate(step, batches, countdown_fx.CountDownConfig(sparsity=args.sparsity, regime="prac",
                                                                              apply_to="all"))
    # a contiguous example: exporting with a strided view (batches[0][:2, :1]) leaves stride symbols that
    # torch 2.13 cannot AOT-compile once the program is saved and loaded ("vr must not be None for symbol")
    ids = batches[0][:2, :1].contiguous()
    ep = torch.export.export(step, (ids,), dynamic_shapes=({0: Dim.DYNAMIC},))
    ep = countdown_fx.sparsify(ep, cal)
    print(describe_countdown(ep))

    with tempfile.TemporaryDirectory() as tmp:
        torch.export.save(ep, Path(tmp) / "model.pt2")
        loaded = torch.export.load(Path(tmp) / "model.pt2")
        # AOTI-compile the program as loaded from disk, as a packaging job in another process would
        # checks the C++ compiler first (a clear error instead of a segfault at package load)
        package = countdown_fx.aoti.compile_and_package(loaded, package_path=str(Path(tmp) / "aoti.pt2"))
        runner = torch._inductor.aoti_load_package(package)
        # another batch size (the batch dim stayed dynamic), contiguous: an AOTI package assumes the strides
        # it was exported with and does not check them (a strided view of a [4, 128] batch reads wrong rows)
        other = batches[1][:3, :1].contiguous()
        with torch.no_grad():
            got, want = runner(other), loaded.module()(other)
        print(f"AOTInductor package vs exported program, batch {other.shape[0]}: max |diff| = "
              f"{(got.float() - want.float()).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
