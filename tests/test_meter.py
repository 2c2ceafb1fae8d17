import pytest
import torch

from countdown_fx.kernels import reference
from countdown_fx.meter import SparsityMeter, metered
from tiny_models import GptFastFeedForward, Stack


def test_meter_counts_exactly_what_the_selection_keeps():
    torch.manual_seed(0)
    model = Stack(GptFastFeedForward).eval()
    meter = SparsityMeter()
    prefill, step = torch.randn(2, 5, 32), torch.randn(3, 1, 32)
    with torch.no_grad():
        net = metered(model, {"sparsity": 0.75, "apply_to": "decode"}, meter)
        net(prefill)
        assert meter.sparsity == 0.0 and meter.calls["prefill"] == 2  # prefill ran dense
        net(step)
    kept = 2 * 10 * 72 + 2 * 3 * reference.keep_count(72, 0.75)
    assert meter.kept == kept and meter.total == 2 * 13 * 72
    assert meter.step_sparsity("prefill") == 0.0
    assert meter.step_sparsity("decode") == 1 - reference.keep_count(72, 0.75) / 72
    assert "decode 75.0%" in meter.report()


def test_meter_union_is_what_a_batched_step_reads():
    """The union counts a neuron once per call however many tokens keep it: three copies of one token read
    exactly one token's neurons, three different tokens read more than one token's and at most three's."""
    torch.manual_seed(1)
    model = Stack(GptFastFeedForward).eval()
    keep = reference.keep_count(72, 0.75)
    token = torch.randn(1, 1, 32)
    with torch.no_grad():
        net = metered(model, {"sparsity": 0.75, "apply_to": "decode"}, same := SparsityMeter())
        net(token.expand(3, 1, 32).contiguous())
        net = metered(model, {"sparsity": 0.75, "apply_to": "decode"}, different := SparsityMeter())
        net(torch.randn(3, 1, 32))
    assert same.step_union("decode") == keep / 72
    assert keep / 72 < different.step_union("decode") <= min(1.0, 3 * keep / 72)
    assert f"union of a call's tokens {same.step_union('decode'):.1%}" in same.report()
    assert different.step_union("prefill") != different.step_union("prefill")  # nan: no prefill call


def _docstring_example(module) -> str:
    """The indented code block under the first line of a module docstring, dedented."""
    import itertools
    import textwrap

    lines = module.__doc__.splitlines()[1:]
    block = itertools.takewhile(lambda line: not line or line.startswith("    "), lines)
    return textwrap.dedent("\n".join(block))


def test_module_docstring_example_runs_as_written(capsys):
    """The usage the meter module documents, run as written on a tiny model, measures what the ops keep."""
    import countdown_fx.meter

    torch.manual_seed(0)
    names = {"model": Stack(GptFastFeedForward).eval(), "options": {"sparsity": 0.75},
             "input_ids": torch.randn(3, 1, 32)}  # one-token decode steps: sparse under apply_to="decode"
    with torch.no_grad():
        exec(_docstring_example(countdown_fx.meter), names)
    meter = names["meter"]
    assert meter.calls["decode"] == 2 and meter.step_sparsity("decode") == 1 - reference.keep_count(72, 0.75) / 72
    assert "decode 75.0%" in capsys.readouterr().out


def test_calling_a_metered_model_inside_the_meter_is_refused():
    """Under an active dispatch mode Dynamo does not compile: the model would run dense and eager and the
    meter count nothing. Refused loudly, for a module and for a function (a model's forward), and the
    meter's report says how it is meant to be used."""
    torch.manual_seed(0)
    model = Stack(GptFastFeedForward).eval()
    x = torch.randn(3, 1, 32)
    for target in (model, model.forward):
        meter = SparsityMeter()
        net = metered(target, {"sparsity": 0.75}, meter)
        with torch.no_grad(), meter:
            with pytest.raises(RuntimeError, match=r"outside.*metered\(model, options, meter\)"):
                net(x)
        assert meter.total == 0 and "metered(model, options, meter)(inputs)" in meter.report()
        with torch.no_grad():  # the documented use still works
            out = net(x)
        assert meter.step_sparsity("decode") > 0.7 and (out - model(x)).abs().max() > 1e-3
        torch._dynamo.reset()


class _MaskedStack(torch.nn.Module):
    """A token-wise stack that takes (and ignores) an attention mask, so a padded call computes every row
    exactly as an unpadded one would: the meter's counts can be compared bit for bit."""

    def __init__(self):
        super().__init__()
        self.stack = Stack(GptFastFeedForward)

    def forward(self, x, attention_mask=None, cache_position=None):
        return self.stack(x)


def test_meter_leaves_padding_out_as_calibration_does():
    """Padded positions are not text: with an attention_mask the meter counts the real tokens only. The counts
    of the real rows and of the padded rows (the same call with the mask inverted) add up to the unmasked
    count, and padding unlike the text (here: constant rows, which the norm sends to zero) would have moved the
    figure."""
    from countdown_fx import CountDownConfig, calibrate

    torch.manual_seed(3)
    model = _MaskedStack().eval()
    cal = calibrate(model, [torch.randn(4, 32, 32)], CountDownConfig(method="m-countdown", sparsity=0.7,
                                                                     regime="prac", apply_to="all"), progress=False)
    x = torch.randn(2, 12, 32)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 5:] = 0  # the second sequence has 5 real tokens, then padding
    x[1, 5:] = 1.0
    meters = {}
    with torch.no_grad():
        # the [batch, 1, queries, keys] forms transformers hands a model with a static cache: causal, with the
        # padded keys masked for every query (a padded query row still attends the real keys before it), bool
        # or additive, over a cache longer than the call (keys at cache_position), or in a dict of masks
        attends = torch.ones(12, 12, dtype=torch.bool).tril() & mask.bool()[:, None, None, :]
        additive = torch.zeros(attends.shape).masked_fill(~attends, torch.finfo(torch.float32).min)
        cache = torch.zeros(2, 1, 12, 16, dtype=torch.bool)
        cache[..., 4:] = attends  # the call's tokens sit at positions 4..15 of the cache, nothing before
        forms = {"4-D bool": {"attention_mask": attends}, "4-D additive": {"attention_mask": additive},
                 "4-D cache": {"attention_mask": cache, "cache_position": torch.arange(4, 16)},
                 "4-D cache, no positions": {"attention_mask": cache},  # the offset read off the mask
                 "dict": {"attention_mask": {"full_attention": attends}}}
        for name, kwargs in {"real": {"attention_mask": mask}, "pad": {"attention_mask": 1 - mask},
                             "all": {}, **forms}.items():
            torch._dynamo.reset()
            metered(model, {"calibration": cal}, meter := SparsityMeter())(x, **kwargs)
            meters[name] = meter
    real, pad, every = meters["real"], meters["pad"], meters["all"]
    for form in forms:
        assert (meters[form].kept, meters[form].total) == (real.kept, real.total), form
    assert real.total == 17 * 72 * 2 and pad.total == 7 * 72 * 2 and every.total == 24 * 72 * 2
    assert real.kept + pad.kept == every.kept
    assert pad.kept == 0 and pad.union_by_step["prefill"] == 0  # the constant rows keep no neuron
    assert abs(real.sparsity - every.sparsity) > 0.05  # the padding would have been counted


def test_a_decode_step_of_a_left_padded_batch_is_real():
    """[batch, 1, 1, keys] at a decode step: the new token attends the real keys up to its own (the last);
    the padding before it does not make it padding. A mask that is not causal is not read (None)."""
    from countdown_fx.passes.observe import real_token_rows

    keys = torch.tensor([[False, False, True, True, True, True], [True, True, True, True, True, True]])
    rows = torch.zeros(2, 8)
    assert real_token_rows(keys[:, None, None, :], rows).tolist() == [True, True]
    bidirectional = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    assert real_token_rows(bidirectional, torch.zeros(3, 8)) is None


def test_a_sequence_first_input_lines_its_rows_up_with_the_mask():
    """[seq, batch, d_model] rows are seq-major, a [batch, seq] mask batch-major: the mask is transposed to the
    rows' order (counting by element count alone took real rows for padding and padding for text)."""
    from countdown_fx.passes.observe import real_token_rows

    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])  # batch 2, seq 4: the first sequence has one pad
    rows = real_token_rows(mask, torch.randn(4, 2, 8))  # sequence-first
    assert rows.tolist() == mask.t().reshape(-1).bool().tolist()
    assert real_token_rows(mask, torch.randn(2, 4, 8)).tolist() == mask.reshape(-1).bool().tolist()
    assert real_token_rows(mask, torch.randn(8, 8)).tolist() == mask.reshape(-1).bool().tolist()  # flat: batch-major
    assert real_token_rows(mask, torch.randn(1, 8, 8)) is None  # another layout: every row counts


def test_metering_needs_a_meter():
    with pytest.raises(TypeError, match="needs a countdown_fx.SparsityMeter"):
        metered(Stack(GptFastFeedForward).eval(), {"sparsity": 0.5}, None)
