"""Prepacked bfloat16 linear weights (`enable_packed_weights`): the same products and the same tokens as F.linear,
used only inside generate(), rebuilt when a weight changes, nothing added to the state dict."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import left_pad, tiny_drafter_model, tiny_model
from nemotron_diffusion.packed_nemotron_diffusion import (
    PACKED_ATTRIBUTE,
    PackedWeight,
    packed_linear,
    packing_supported,
)

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.skipif(not packing_supported(torch.zeros(2, 2, dtype=torch.bfloat16)),
                       reason="oneDNN bfloat16 kernels are not available on this CPU"),
]

MODES = [
    ("ar", {}),
    ("diffusion", dict(block_size=4, confidence_threshold=0.5)),
    ("linear_spec", dict(block_size=4)),
    ("linear_spec", dict(block_size=4, tree_width=2)),
    ("quadratic_spec", dict(block_size=3)),
]


def _bf16_drafter_model(seed=0):
    """A tiny bf16 model with a LoRA drafter (random B, so it changes the drafts) serving every mode, with merged
    draft weights kept in bf16 (they are packed too)."""
    model = tiny_drafter_model(seed).to(torch.bfloat16)
    model.generation_config.drafter_adapter = "drafter"
    model.generation_config.drafter_modes = ["linear_spec", "diffusion", "quadratic_spec"]
    model.enable_merged_drafter()
    return model


def _generate(model, ids, mask, mode, **kwargs):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, decode_mode=mode, max_new_tokens=14,
                              do_sample=False, eos_token_id=None, return_dict_in_generate=True, **kwargs)


@pytest.mark.parametrize("rows", [1, 3, 14, 33])
@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (96, 7)])
def test_packed_linear_is_bit_identical_to_f_linear(rows, shape):
    torch.manual_seed(rows)
    weight = torch.randn(*shape).bfloat16()
    bias = torch.randn(shape[0]).bfloat16()
    x = torch.randn(2, rows, shape[1]).bfloat16()
    packed = PackedWeight()
    assert torch.equal(packed_linear(x, weight, bias, packed), F.linear(x, weight, bias))
    assert torch.equal(packed_linear(x[:, 1:], weight, None, packed), F.linear(x[:, 1:], weight))  # a strided slice


def _mode_id(value):
    return value if isinstance(value, str) else "-".join(map(str, value.values()))


@pytest.mark.parametrize("mode,extra", MODES, ids=_mode_id)
def test_packed_weights_give_the_same_tokens_in_every_mode(mode, extra):
    """Left-padded batch, drafter attached: the tokens, forward counts and acceptance lengths are those of the
    same call without packing, and the packed forwards really ran."""
    model = _bf16_drafter_model()
    ids, mask = left_pad([[5, 9, 14, 3, 22, 7], [11, 4, 30], [8, 8, 19, 2, 6, 40, 13, 9]])
    plain = _generate(model, ids, mask, mode, **extra)
    assert model.enable_packed_weights() == len([m for m in model.modules() if type(m) is nn.Linear])
    calls = []
    original = torch.ops.mkldnn._linear_pointwise
    try:
        torch.ops.mkldnn._linear_pointwise = lambda *args: calls.append(1) or original(*args)
        packed = _generate(model, ids, mask, mode, **extra)
    finally:
        torch.ops.mkldnn._linear_pointwise = original
        model.disable_packed_weights()
    assert calls
    assert torch.equal(packed.sequences, plain.sequences)
    assert torch.equal(packed.num_forwards, plain.num_forwards)
    if plain.acceptance_lengths is not None:
        assert torch.equal(packed.acceptance_lengths, plain.acceptance_lengths)


def test_packed_weights_stay_inside_generate_and_out_of_the_state_dict():
    model = tiny_model(0).to(torch.bfloat16).eval()
    keys = set(model.state_dict())
    count = model.enable_packed_weights()
    assert count > 0 and set(model.state_dict()) == keys
    ids = torch.tensor([[5, 9, 14, 3]])
    _generate(model, ids, None, "ar")
    layers = [m for m in model.modules() if PACKED_ATTRIBUTE in vars(m)]
    assert len(layers) == count and not any("forward" in vars(m) for m in layers)  # restored after generate()
    # Outside generate() a forward is the plain one, gradients included (training after generating).
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert model.encoder.layers[0].self_attn.q_proj.weight.grad is not None
    model.disable_packed_weights()
    assert not any(PACKED_ATTRIBUTE in vars(m) for m in model.modules())


def test_packed_weights_follow_a_changed_weight():
    """A weight changed in place between calls (training, a loaded state dict) is repacked: the next call returns
    the tokens of the changed model."""
    model = tiny_model(0).to(torch.bfloat16).eval()
    ids = torch.tensor([[5, 9, 14, 3, 22]])
    model.enable_packed_weights()
    before = _generate(model, ids, None, "linear_spec", block_size=4).sequences
    with torch.no_grad():
        for layer in model.encoder.layers:
            layer.mlp.down_proj.weight.mul_(-1.5)
    after = _generate(model, ids, None, "linear_spec", block_size=4).sequences
    model.disable_packed_weights()
    expected = _generate(model, ids, None, "linear_spec", block_size=4).sequences
    assert torch.equal(after, expected) and not torch.equal(after, before)


def test_packing_is_a_no_op_in_float32():
    model = tiny_model(0).eval()
    assert model.enable_packed_weights() == 0
    assert not any(PACKED_ATTRIBUTE in vars(m) for m in model.modules())
