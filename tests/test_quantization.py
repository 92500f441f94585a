"""Weights quantized through transformers' own quantization configs: torchao int8 weight-only (`TorchAoConfig`),
which runs on a CPU. Every mode runs on the quantized model, and at temperature 0 self-speculation returns exactly
the AR tokens of the *same quantized* model (float32 activations), with and without a LoRA drafter attached."""

import pytest
import torch

torchao = pytest.importorskip("torchao")

from torchao.quantization import Int8WeightOnlyConfig  # noqa: E402
from transformers import AutoModelForCausalLM, TorchAoConfig  # noqa: E402

from conftest import left_pad, random_prompt, tiny_model  # noqa: E402
from tiny_tokenizer import save_tiny_folder  # noqa: E402


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: one torch thread for this module


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_folder(tmp_path_factory.mktemp("quant") / "tiny", model=tiny_model(seed=5))


def load_int8(folder):
    return AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, device_map="cpu", quantization_config=TorchAoConfig(Int8WeightOnlyConfig())
    ).eval()


@pytest.fixture(scope="module")
def quantized(folder):
    return load_int8(folder)


def test_weights_are_int8(folder, quantized):
    for layer in quantized.encoder.layers:
        for linear in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.down_proj):
            assert type(linear.weight).__module__.startswith("torchao")
            assert linear.weight.qdata.dtype == torch.int8
    # quantization changes the numbers: the logits are close to the float model's, not equal
    prompt = random_prompt(0, 12)
    float_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        q, f = quantized(prompt).logits, float_model(prompt).logits
    assert not torch.equal(q, f)
    assert torch.allclose(q, f, atol=0.1 * f.abs().max().item())


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("mode,block_size", [("linear_spec", 2), ("linear_spec", 5), ("quadratic_spec", 3),
                                             ("quadratic_spec", 4)])
def test_self_speculation_equals_ar_of_the_quantized_model(quantized, mode, block_size, seed):
    prompt = random_prompt(seed, 6 + seed)
    with torch.no_grad():
        ar = quantized.generate(prompt, max_new_tokens=20, decode_mode="ar")
        spec = quantized.generate(prompt, max_new_tokens=20, decode_mode=mode, block_size=block_size)
    assert spec.tolist() == ar.tolist()


def test_every_mode_runs_batched(quantized):
    ids, mask = left_pad([random_prompt(1, 5)[0].tolist(), random_prompt(2, 9)[0].tolist()])
    with torch.no_grad():
        ar = quantized.generate(ids, attention_mask=mask, max_new_tokens=12)
        for mode, kwargs in [
            ("diffusion", dict(block_size=4, confidence_threshold=0.5)),
            ("linear_spec", dict(block_size=4)),
            ("quadratic_spec", dict(block_size=4)),
        ]:
            out = quantized.generate(
                ids, attention_mask=mask, max_new_tokens=12, decode_mode=mode, return_dict_in_generate=True, **kwargs
            )
            assert out.sequences.shape[0] == 2 and (out.num_forwards > 0).all()
            if mode != "diffusion":
                assert out.sequences.tolist() == ar.tolist()


def test_lora_drafter_on_quantized_weights(folder, tmp_path):
    """The drafter attached with PEFT to the int8 model: LinearSpec still returns the quantized model's AR tokens,
    and the drafter does take part (its drafts differ from the base model's)."""
    peft = pytest.importorskip("peft")
    from nemotron_diffusion.demo import attach_drafter

    torch.manual_seed(6)
    config = peft.LoraConfig(r=4, lora_alpha=64, target_modules=["o_proj"], init_lora_weights=False)
    peft.get_peft_model(tiny_model(seed=5), config).save_pretrained(tmp_path / "drafter")
    with_drafter = attach_drafter(load_int8(folder), tmp_path / "drafter")
    lora_calls = []
    lora_a = next(m for name, m in with_drafter.named_modules() if name.endswith("o_proj.lora_A.drafter"))
    lora_a.register_forward_hook(lambda *args: lora_calls.append(1))
    prompt = random_prompt(3, 8)
    with torch.no_grad():
        ar = load_int8(folder).generate(prompt, max_new_tokens=20)
        assert with_drafter.generate(prompt, max_new_tokens=20).tolist() == ar.tolist()
        assert lora_calls == []  # AR runs the quantized base weights only
        drafted = with_drafter.generate(prompt, max_new_tokens=20, decode_mode="linear_spec", block_size=4)
    assert drafted.tolist() == ar.tolist()
    assert lora_calls  # the drafter took part in the drafts
