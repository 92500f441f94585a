"""CUDA checks (skipped without a GPU): losslessness in fp32, backend parity, bf16 sanity.

Run by scripts/gpu_check.sh on a lent GPU machine; CI has no GPU and skips this file.
"""

import pytest
import torch

from conftest import left_pad
from nemotron_diffusion import NemotronDiffusionConfig, NemotronDiffusionForCausalLM


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

MODES = ("ar", "diffusion", "linear_spec", "quadratic_spec")
MASK_ID = 1023


def gpu_model(impl="sdpa", dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    config = NemotronDiffusionConfig(
        vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, head_dim=32, mask_token_id=MASK_ID, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        initializer_range=0.1, max_position_embeddings=4096,
        rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0, "original_max_position_embeddings": 256,
                         "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "llama_4_scaling_beta": 0.1},
        attn_implementation=impl,
    )
    return NemotronDiffusionForCausalLM(config).to("cuda", dtype).eval()


def batch():
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, MASK_ID, (n,), generator=g).tolist() for n in (40, 17, 29, 33)]
    ids, mask = left_pad(prompts)
    return ids.cuda(), mask.cuda()


def run(model, mode, ids, mask, **kwargs):
    settings = dict(max_new_tokens=48, do_sample=False, decode_mode=mode, block_size=8)
    if mode == "diffusion":
        settings["confidence_threshold"] = 0.3
    settings.update(kwargs)
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, **settings)


@pytest.mark.parametrize("block_size", [4, 16])
def test_spec_equals_ar_fp32(block_size):
    model = gpu_model()
    ids, mask = batch()
    ar = run(model, "ar", ids, mask)
    for mode in ("linear_spec", "quadratic_spec"):
        assert torch.equal(run(model, mode, ids, mask, block_size=block_size), ar), mode
    assert torch.equal(run(model, "linear_spec", ids, mask, block_size=block_size, confidence_threshold=0.5), ar)


SDPA_KERNELS = {
    "sdpa-math": torch.nn.attention.SDPBackend.MATH,
    "sdpa-efficient": torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION,
}


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_same_tokens_across_backends_fp32(mode):
    ids, mask = batch()
    reference = run(gpu_model("sdpa"), mode, ids, mask)
    assert torch.equal(run(gpu_model("eager"), mode, ids, mask), reference)
    for name, kernel in SDPA_KERNELS.items():
        with torch.nn.attention.sdpa_kernel([kernel]):
            assert torch.equal(run(gpu_model("sdpa"), mode, ids, mask), reference), name



@pytest.mark.xfail(
    raises=torch._inductor.exc.InductorError, strict=False,
    reason="torch 2.11 (the lent H100's image) fails to lower FlexAttention for this padded batch: NoValidChoicesError",
)
@pytest.mark.parametrize("mode", MODES)
def test_each_mode_on_flex_attention_bf16(mode):
    """flex_attention on CUDA. Different kernels than sdpa, so near-ties may flip: most tokens must agree."""
    ids, mask = batch()
    reference = run(gpu_model("sdpa", torch.bfloat16), mode, ids, mask, max_new_tokens=16)
    flex = run(gpu_model("flex_attention", torch.bfloat16), mode, ids, mask, max_new_tokens=16)
    rate, prefix = _agreement(flex, reference, ids.shape[1])
    print(f"bf16 flex_attention vs sdpa, {mode}: {rate:.2%} tokens equal, agreeing prefix lengths {prefix}")
    assert rate >= 0.75, (rate, prefix)


def _agreement(a, b, width):
    same = (a[:, width:] == b[:, width:]).float()
    return same.mean().item(), (same.cumprod(1).sum(1)).tolist()


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_bf16_every_mode_runs_without_nans_and_agrees(impl):
    model = gpu_model(impl, torch.bfloat16)
    ids, mask = batch()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    assert torch.isfinite(logits[mask.bool()]).all()
    outputs = {mode: run(model, mode, ids, mask) for mode in MODES}
    for mode, out in outputs.items():
        assert out.shape[1] == ids.shape[1] + 48, mode
        assert not (out[:, ids.shape[1]:] == MASK_ID).any() or mode != "diffusion"
    # An L-token verify and a 1-token AR step use different kernels: bf16 near-ties may flip and sequences then
    # diverge; most tokens must still agree.
    for mode in ("linear_spec", "quadratic_spec"):
        rate, prefix = _agreement(outputs[mode], outputs["ar"], ids.shape[1])
        print(f"bf16 {impl} {mode}: {rate:.2%} tokens equal to AR, agreeing prefix lengths {prefix}")
        assert rate >= 0.5, (mode, rate, prefix)


def test_bf16_ar_runs_on_the_sdpa_flash_kernel():
    """AR prefill (no padding) and 1-token steps need no mask, so sdpa's own flash kernel can serve them. (Calls
    with a causal block over a prefix cache need a materialised mask, which that kernel does not take.)"""
    model = gpu_model("sdpa", torch.bfloat16)
    ids = torch.randint(3, MASK_ID, (1, 64), device="cuda")
    default = run(model, "ar", ids, None)
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.FLASH_ATTENTION]):
        flash = run(model, "ar", ids, None)
    assert flash.shape == (1, 64 + 48)
    assert (flash == default).float().mean() > 0.5
