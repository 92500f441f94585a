"""Shared fixtures: tiny random tri-mode models (fp32, CPU) and helpers every test file uses."""

import os

import pytest
import torch

from nemotron_diffusion import NemotronDiffusionConfig, NemotronDiffusionForCausalLM, tooling


# torch 2.13's inductor fails to generate C++ for CPU FlexAttention once a shape turns dynamic (after a second
# shape is seen): "cur_kvSplitSize0 was not declared". Static recompiles per shape avoid that code path; every test
# starts with a fresh compile cache so no test inherits another's compiled shapes. (GPU kernels are unaffected.)
if not torch.cuda.is_available():
    torch._dynamo.config.automatic_dynamic_shapes = False


@pytest.fixture(scope="session")
def torch_cpu_flex_attention_works():
    """Skips the requesting test where torch's own compiled CPU FlexAttention kernel is wrong on this machine.

    Seen with torch 2.13 on an AVX2-only AMD EPYC (no AVX-512): `flex_attention` of a causal 8-token case with head
    dim 8 differs from `scaled_dot_product_attention` by ~1.6, or gives NaN with head dim 16, while 12 or 16 tokens
    agree to 1e-7; on AVX-512 machines it agrees everywhere. The probe compares torch's kernel with torch's sdpa on
    random tensors, no code of ours, so a skip here says the platform is broken, never that our model is."""
    if torch.cuda.is_available():
        return
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    generator = torch.Generator().manual_seed(0)
    compiled = torch.compile(flex_attention, dynamic=False)
    for length, head_dim in ((8, 8), (8, 16)):
        query, key, value = (torch.randn(1, 4, length, head_dim, generator=generator) for _ in range(3))
        block_mask = create_block_mask(lambda b, h, q, k: k <= q, 1, 1, length, length, device="cpu")
        error = (compiled(query, key, value, block_mask=block_mask)
                 - torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True)).abs().max()
        if not bool(error < 1e-4):
            pytest.skip(f"torch {torch.__version__}'s compiled CPU flex_attention is wrong on this CPU: a causal "
                        f"{length}-token case with head dim {head_dim} differs from sdpa by {error.item():.3g}")


@pytest.fixture(autouse=True)
def _fresh_compile_cache():
    torch._dynamo.reset()
    yield


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a module's tests: tiny models are dominated by per-op overhead, so one thread is
    several times faster on 2 cores, and a served model runs that way (OMP_NUM_THREADS=1). Modules opt in with
    `pytestmark = pytest.mark.usefixtures("single_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Tests never reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

MASK_ID = 63
PAD_ID = 0
BOS_ID = 1
EOS_ID = 2


def tiny_config(**overrides) -> NemotronDiffusionConfig:
    """A 2-layer model with NVIDIA's structure (GQA, explicit head_dim, YaRN + Llama-4 query scaling).

    `original_max_position_embeddings` is 16 so that the Llama-4 query scale already changes at position 16: tests
    with longer sequences notice wrong absolute positions.
    """
    values = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=1024,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 64.0,  # = max_position_embeddings / original_max_position_embeddings
            "original_max_position_embeddings": 16,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "llama_4_scaling_beta": 0.1,
        },
        mask_token_id=MASK_ID,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        attn_implementation="sdpa",
    )
    values.update(overrides)
    return NemotronDiffusionConfig(**values)


def tiny_model(seed: int = 0, std: float = 0.2, **overrides) -> NemotronDiffusionForCausalLM:
    """A random fp32 model in eval mode. `std` is larger than the usual 0.02 so that logits are not all near-ties."""
    torch.manual_seed(seed)
    config = tiny_config(initializer_range=std, **overrides)
    return NemotronDiffusionForCausalLM(config).eval()


def tiny_drafter_model(seed: int = 0) -> NemotronDiffusionForCausalLM:
    """A tiny model with a drafter of the training recipe's kind attached as adapter "drafter": LoRA plus the mask
    token's embedding row (PEFT trainable tokens), all with random values so that they change the drafts."""
    from nemotron_diffusion.training import add_drafter_adapter

    wrapped = add_drafter_adapter(tiny_model(seed), r=4, adapter_name="drafter")
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in wrapped.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                parameter.normal_(0.0, 0.3)
    return wrapped.base_model.model.eval()


def random_prompt(seed: int, length: int, batch: int = 1, low: int = 3, high: int = MASK_ID) -> torch.LongTensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (batch, length), generator=generator)


def left_pad(prompts: list[list[int]], pad_id: int = PAD_ID) -> tuple[torch.LongTensor, torch.LongTensor]:
    """The package's left padding (`nemotron_diffusion.tooling.left_pad`), with the tiny models' pad id."""
    return tooling.left_pad(prompts, pad_id)


def new_tokens(sequences: torch.LongTensor, prompt_width: int) -> list[list[int]]:
    return [row[prompt_width:].tolist() for row in sequences]


def strip_after(tokens: list[int], stop_ids, pad_id: int = PAD_ID) -> list[int]:
    """Tokens up to and including the first stop id; trailing padding of finished rows removed."""
    out = []
    for t in tokens:
        out.append(t)
        if t in stop_ids:
            return out
    while out and out[-1] == pad_id:
        out.pop()
    return out


@pytest.fixture
def model():
    return tiny_model()
