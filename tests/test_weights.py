"""A calibration knows the weights it was made on (passes.weights): deploying it on another checkpoint of the same
architecture is refused, a change of dtype is not."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from _cal_helpers import random_batches, reference_logits, tiny_llama, tiny_phi3
from countdown_fx import CountDownConfig, sparsify
from countdown_fx.backend import eager_backend
from countdown_fx.calibration import Calibration, calibrate
from countdown_fx.passes import weights


def _sample(w: torch.Tensor) -> dict:
    return weights.sample(w, w, w.t())


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 300), cols=st.integers(1, 300), seed=st.integers(0, 2**31 - 1))
@example(rows=91, cols=125, seed=2**31 - 1)  # sampled values near 2e-6: fp16 subnormals, coarser than bf16 there
def test_a_sample_survives_a_cast_and_tells_other_weights_apart(rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    r, c = weights.positions(w.shape)
    assert bool((r >= 0).all() and (r < rows).all() and (c >= 0).all() and (c < cols).all())
    calibrated = _sample(w)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):  # the same checkpoint in another dtype
        assert weights.differing(calibrated, _sample(w.to(dtype))) == 0
    # half precision both ways: a bf16 calibration and an fp16 deployment of one fp32 checkpoint
    assert weights.differing(_sample(w.to(torch.bfloat16)), _sample(w.to(torch.float16))) == 0
    fine_tuned = w + 0.02 * w.abs().mean() * torch.randn(rows, cols, generator=g)  # a small update of every weight
    assert not weights.fits(calibrated, _sample(fine_tuned))
    if rows * cols >= 64:  # in bf16 an update this small stays within one ulp for some values: needs many
        assert not weights.fits(_sample(w.to(torch.bfloat16)), _sample(fine_tuned.to(torch.bfloat16)))
    assert not weights.fits(calibrated, _sample(torch.randn(rows, cols, generator=g) * 0.02))


def test_unreadable_weights_give_no_sample():
    w = torch.randn(8, 4)
    assert weights.sample(w.to("meta"), w, w.t()) is None
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = mode.from_tensor(w)
    assert weights.sample(fake, w, w.t()) is None


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """An M-CountDown calibration of tiny_llama(seed=0), saved and loaded back."""
    path = tmp_path_factory.mktemp("cal") / "m.safetensors"
    cfg = CountDownConfig(method="m-countdown", sparsity=0.6, regime="prac")
    calibrate(tiny_llama(seed=0), random_batches(3), cfg, progress=False).save(path)
    return str(path)


def test_every_site_is_saved_with_its_sample(calibrated):
    cal = Calibration.load(calibrated)
    model = tiny_llama(seed=0)
    for i, layer in enumerate(model.model.layers):
        mlp = layer.mlp
        want = weights.sample(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
        assert cal.sites[f"model.layers.{i}.mlp"]["weight_sample"] == want


def test_another_checkpoint_is_refused_and_can_be_allowed(calibrated):
    other = tiny_llama(seed=1)  # same architecture, keys and sizes; other weights
    ids = random_batches(1, seed=9)[0]
    with pytest.raises(Exception, match=r"made on other weights than this model's: at 2 of 2 site\(s\) "
                                        r"\(first: 'model.layers.0.mlp'.*check_weights"):
        torch.compile(other, backend=eager_backend({"calibration": calibrated, "apply_to": "all"}))(ids)
    with torch.no_grad():
        got = torch.compile(other, backend=eager_backend(
            {"calibration": calibrated, "apply_to": "all", "check_weights": False}))(ids).logits
    torch.testing.assert_close(got, reference_logits(other, Calibration.load(calibrated), ids), rtol=1e-5, atol=1e-5)
    # the export way in refuses it too
    ep = torch.export.export(other, (ids,), {"use_cache": False})
    with pytest.raises(ValueError, match="other weights"):
        sparsify(ep, calibrated)


def test_the_same_checkpoint_in_bf16_fits(calibrated):
    model = tiny_llama(seed=0).to(torch.bfloat16)
    ids = random_batches(1, seed=9)[0]
    with torch.no_grad():
        got = torch.compile(model, backend=eager_backend({"calibration": calibrated, "apply_to": "all"}))(ids).logits
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()


def test_a_fused_gate_up_is_sampled_as_its_halves():
    """Phi3 stores gate and up as one [2 * d_inter, d_model] weight: calibration (observers) and the rewrite
    both sample its halves, so its own calibration fits and another checkpoint's does not."""
    cfg = CountDownConfig(method="cats", sparsity=0.6, regime="prac")
    cal = calibrate(tiny_phi3(seed=0), random_batches(3), cfg, progress=False)
    mlp = tiny_phi3(seed=0).model.layers[0].mlp
    inter = mlp.down_proj.weight.shape[1]
    fused = mlp.gate_up_proj.weight
    assert cal.sites["model.layers.0.mlp"]["weight_sample"] == weights.sample(fused[:inter], fused[inter:],
                                                                              mlp.down_proj.weight)
    ids = random_batches(1, seed=9)[0]
    torch.compile(tiny_phi3(seed=0), backend=eager_backend({"calibration": cal, "apply_to": "all"}))(ids)
    with pytest.raises(Exception, match="other weights"):
        torch.compile(tiny_phi3(seed=2), backend=eager_backend({"calibration": cal, "apply_to": "all"}))(ids)


def test_a_file_without_samples_is_not_checked(calibrated, tmp_path):
    """Files saved before samples existed carry none: they load and deploy as before (nothing to compare)."""
    cal = Calibration.load(calibrated)
    for info in cal.sites.values():
        info.pop("weight_sample")
    path = tmp_path / "old.safetensors"
    cal.save(path)
    ids = random_batches(1, seed=9)[0]
    torch.compile(tiny_llama(seed=1), backend=eager_backend({"calibration": str(path), "apply_to": "all"}))(ids)


def test_other_sizes_are_refused_for_their_sizes(calibrated):
    """A model of other sizes has other weights too; the error names the sizes, the real misfit (check_weights=False
    would not help there)."""
    ids = random_batches(1, seed=9)[0]
    with pytest.raises(Exception, match=r"d_inter=136.*d_inter=144") as refused:
        torch.compile(tiny_llama(inter=144), backend=eager_backend({"calibration": calibrated, "apply_to": "all"}))(ids)
    assert "other weights" not in str(refused.value)


def test_weights_that_cannot_be_read_are_said_to_be_unchecked(calibrated):
    """A Dynamo graph sparsified without example inputs holds its weights as placeholders with fake values: the
    check cannot run, and a warning says so; given the example inputs, it runs and refuses."""
    from countdown_fx.capture import capture_graphs

    ids = random_batches(1, seed=9)[0]
    (gm, example), = capture_graphs(tiny_llama(seed=1), ids)
    with pytest.warns(UserWarning, match=r"weights of 2 site\(s\) .* are not readable here .* could not be checked"):
        sparsify(gm, {"calibration": calibrated, "apply_to": "all"})
    (gm, example), = capture_graphs(tiny_llama(seed=1), ids)
    with pytest.raises(ValueError, match="other weights"):
        sparsify(gm, calibrated, example_inputs=example)


def test_check_weights_must_be_a_bool():
    with pytest.raises(ValueError, match=r"check_weights='no' is not allowed; it must be True or False"):
        CountDownConfig(check_weights="no")
