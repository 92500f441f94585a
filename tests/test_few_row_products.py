"""Float32 products of a few rows on a CPU as `weight @ x.T` (`few_row_linear`): the products of `F.linear` up to
float32 rounding, taken by the linear layers inside generate() only, and the same tokens in every lossless mode."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nemotron_diffusion.drafting_nemotron_diffusion as drafting_module
import nemotron_diffusion.packed_nemotron_diffusion as packed_module
from conftest import left_pad, tiny_drafter_model, tiny_model
from nemotron_diffusion.packed_nemotron_diffusion import FEW_ROW_LAYER_ROWS, few_row_linear, few_row_product_applies

pytestmark = pytest.mark.usefixtures("single_thread")

LOSSLESS_MODES = [
    ("linear_spec", dict(block_size=4)),
    ("linear_spec", dict(block_size=4, tree_width=2)),
    ("quadratic_spec", dict(block_size=2)),
]


@pytest.mark.parametrize("rows", list(FEW_ROW_LAYER_ROWS))
@pytest.mark.parametrize("bias", [False, True])
def test_few_row_linear_is_f_linear_up_to_rounding(rows, bias):
    torch.manual_seed(rows)
    weight, b = torch.randn(40, 24), torch.randn(40) if bias else None
    batch = torch.randn(3, rows + 2, 24)
    with torch.no_grad():
        for x in (batch[0, :rows], batch[:1, 2:], batch[:1, -rows:], batch[1, 1:1 + rows].unsqueeze(0)):
            assert few_row_product_applies(x, weight)
            got = few_row_linear(x, weight, b)
            assert got.shape == x.shape[:-1] + (40,) and got.is_contiguous()
            torch.testing.assert_close(got, F.linear(x, weight, b), rtol=1e-6, atol=1e-5)


def test_few_row_product_applies_only_to_float32_cpu_products_of_a_few_rows_without_autograd():
    weight = torch.randn(8, 6)
    with torch.no_grad():
        assert few_row_product_applies(torch.randn(2, 6), weight)
        assert few_row_product_applies(torch.randn(1, 4, 6), weight)
        assert not few_row_product_applies(torch.randn(1, 6), weight)  # a one-row AR step keeps `linear`
        assert not few_row_product_applies(torch.randn(3, 6), weight)  # won on one CPU, lost on another
        assert not few_row_product_applies(torch.randn(5, 6), weight)  # more rows: `linear` is as fast
        assert not few_row_product_applies(torch.randn(2, 6), weight, range(0))
        assert not few_row_product_applies(torch.randn(2, 6).bfloat16(), weight.bfloat16())
        assert not few_row_product_applies(torch.randn(2, 6).double(), weight.double())
        assert not few_row_product_applies(torch.randn(0, 6), weight)
    assert not few_row_product_applies(torch.randn(2, 6), weight)  # gradients may be needed


def _generate(model, ids, mask, mode, **kwargs):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, decode_mode=mode, max_new_tokens=14,
                              do_sample=False, eos_token_id=None, return_dict_in_generate=True, **kwargs)


def _counting_few_row_products(monkeypatch):
    calls = []
    original = packed_module.few_row_linear
    for module in (packed_module, drafting_module):  # the layers' forwards, merged draft weights
        monkeypatch.setattr(module, "few_row_linear", lambda *args: calls.append(args[:2]) or original(*args))
    return calls  # (x, weight) of each transposed product


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("merged", [False, True], ids=["peft-drafter", "merged-drafter"])
@pytest.mark.parametrize(
    "mode,extra", LOSSLESS_MODES, ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v.values()))
)
def test_layers_take_few_row_products_inside_generate_with_the_ar_tokens(monkeypatch, mode, extra, merged, batch):
    """One prompt (a block's query tokens are the few rows) and a left-padded batch of 2 (its AR steps are), a
    drafter serving every mode: the self-speculative tokens equal AR's and those of the same call with `linear`
    for every row count, and the transposed products really ran in the layers."""
    model = tiny_drafter_model(0)
    model.generation_config.drafter_adapter = "drafter"
    model.generation_config.drafter_modes = ["linear_spec", "diffusion", "quadratic_spec"]
    if merged:
        model.enable_merged_drafter()
    ids, mask = left_pad([[5, 9, 14, 3, 22, 7], [11, 4, 30], [8, 8, 19, 2, 6, 40, 13, 9]][:batch])
    ar = _generate(model, ids, mask, "ar")
    calls = _counting_few_row_products(monkeypatch)
    few_rows = _generate(model, ids, mask, mode, **extra)
    rows = [x.numel() // x.shape[-1] for x, _ in calls]
    assert all(r in FEW_ROW_LAYER_ROWS for r in rows)
    if mode == "linear_spec":  # (a QuadraticSpec chunk has more rows than that, even of one prompt)
        assert rows and (batch > 1 or any(x.shape[-2] > 1 for x, _ in calls))  # a block's query tokens
    monkeypatch.setattr(packed_module, "FEW_ROW_LAYER_ROWS", range(0))
    calls.clear()
    plain = _generate(model, ids, mask, mode, **extra)
    assert not calls
    assert torch.equal(few_rows.sequences, ar.sequences)
    assert torch.equal(few_rows.sequences, plain.sequences)
    assert torch.equal(few_rows.num_forwards, plain.num_forwards)


def test_few_row_products_stay_inside_generate_and_skip_hooked_layers(monkeypatch):
    model = tiny_model(0).eval()
    q_proj = model.encoder.layers[0].self_attn.q_proj
    seen = []
    handle = q_proj.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
    calls = _counting_few_row_products(monkeypatch)
    ids = torch.tensor([[5, 9, 14, 3]])
    _generate(model, ids, None, "diffusion", block_size=4, confidence_threshold=0.5)
    handle.remove()
    # A layer with a hook keeps its own forward (a hook may hand it a sharded or offloaded weight): layer 0's
    # q_proj computed none of the transposed products at row counts where the other q_proj layers did.
    assert any(shape[-2] in FEW_ROW_LAYER_ROWS for shape in seen)
    weights = {weight.data_ptr() for _, weight in calls}
    assert q_proj.weight.data_ptr() not in weights
    assert model.encoder.layers[1].self_attn.q_proj.weight.data_ptr() in weights
    assert not any("forward" in vars(m) for m in model.modules() if type(m) is nn.Linear)  # restored
    # Outside generate() a forward is the plain one, gradients included (training after generating).
    calls.clear()
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert not calls and q_proj.weight.grad is not None
