"""Training forward: the loss of each dlm_paradigm against hand computations."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import MASK_ID, tiny_model
from nemotron_diffusion.modeling_nemotron_diffusion import block_diff_mask_function
from reference_forward import bidirectional_allowed, positions_from_mask, reference_logits


IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [20, 21, 22, 23, 24, 25, 26, 27]])
LABELS = IDS.clone()
LABELS[0, :2] = -100  # a prompt that is not trained on


def zero_head_model(paradigm, **overrides):
    model = tiny_model(dlm_paradigm=paradigm, **overrides)
    with torch.no_grad():
        model.diffusion_head.weight.zero_()
    return model


def test_hand_checked_values_with_uniform_logits():
    """With a zero head every logit is 0, so each CE term is ln V exactly."""
    ln_v = math.log(64)
    masked = torch.zeros_like(IDS, dtype=torch.bool)
    masked[0, 3], masked[1, 0], masked[1, 5] = True, True, True
    p_mask = torch.full(IDS.shape, 0.25)

    out = zero_head_model("autoregressive")(input_ids=IDS, labels=LABELS)
    assert out.num_ar_tokens.item() == 13  # 7 + 7 shifted targets, minus the ignored one of row 0
    torch.testing.assert_close(out.loss, torch.tensor(ln_v))

    out = zero_head_model("bidirectional")(input_ids=IDS, labels=LABELS, masked_indices=masked, p_mask=p_mask)
    assert out.num_masked_tokens.item() == 3
    torch.testing.assert_close(out.loss, torch.tensor(ln_v / 0.25))  # sum(ln V / t) / #masked

    out = zero_head_model("bidirectional", dlm_loss_weight=0.5)(input_ids=IDS, labels=LABELS, masked_indices=masked, p_mask=p_mask)
    torch.testing.assert_close(out.loss, torch.tensor(0.5 * ln_v / 0.25))

    w = 0.3
    out = zero_head_model("block_diff", block_size=4, ar_loss_weight=w)(input_ids=IDS, labels=LABELS, masked_indices=masked, p_mask=p_mask)
    expected = (3 * ln_v / 0.25 + w * 13 * ln_v) / (3 + w * 13)
    torch.testing.assert_close(out.loss, torch.tensor(expected))
    torch.testing.assert_close(out.diffusion_loss, torch.tensor(ln_v / 0.25))
    torch.testing.assert_close(out.ar_loss, torch.tensor(ln_v))


def test_autoregressive_loss_is_shifted_cross_entropy():
    model = tiny_model(dlm_paradigm="autoregressive")
    out = model(input_ids=IDS, labels=LABELS)
    logits = model(input_ids=IDS).logits
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 64), LABELS[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


def test_bidirectional_loss_against_explicit_computation():
    model = tiny_model(dlm_paradigm="bidirectional")
    masked = torch.tensor([[0, 0, 1, 0, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    p_mask = torch.tensor([[0.6], [0.3]]).expand(IDS.shape)
    out = model(input_ids=IDS, labels=LABELS, masked_indices=masked, p_mask=p_mask)
    noisy = torch.where(masked, MASK_ID, IDS)
    ones = torch.ones_like(IDS)
    with torch.no_grad():
        logits = reference_logits(model, noisy, positions_from_mask(ones), bidirectional_allowed(ones))
    ce = F.cross_entropy(logits[masked], IDS[masked], reduction="none")
    expected = (ce / p_mask[masked]).sum() / masked.sum()
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)


def _block_diff_table(n, block_size):
    """The rules of docs/reference-model.md §6.3 written as loops."""
    allowed = torch.zeros(2 * n, 2 * n, dtype=torch.bool)
    for q in range(2 * n):
        for k in range(2 * n):
            q_clean, k_clean = q >= n, k >= n
            qb, kb = (q % n) // block_size, (k % n) // block_size
            rule_a = not q_clean and not k_clean and qb == kb
            rule_b = not q_clean and k_clean and qb > kb
            rule_c = q_clean and k_clean and q >= k
            allowed[q, k] = rule_a or rule_b or rule_c
    return allowed


@pytest.mark.parametrize("n,block_size", [(8, 4), (8, 3), (6, 8)])
def test_block_diff_mask_function_equals_the_rules(n, block_size):
    fn = block_diff_mask_function(n, block_size)
    q = torch.arange(2 * n)[:, None]
    k = torch.arange(2 * n)[None, :]
    assert torch.equal(fn(0, 0, q, k), _block_diff_table(n, block_size))


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_block_diff_loss_against_explicit_computation(impl):
    model = tiny_model(dlm_paradigm="block_diff", block_size=4, ar_loss_weight=0.7, attn_implementation=impl)
    masked = torch.tensor([[0, 0, 1, 0, 1, 1, 0, 0], [1, 0, 0, 1, 0, 0, 0, 1]], dtype=torch.bool)
    p_mask = torch.tensor([[0.6], [0.3]]).expand(IDS.shape)
    out = model(input_ids=IDS, labels=LABELS, masked_indices=masked, p_mask=p_mask)
    n = IDS.shape[1]
    noisy = torch.where(masked, MASK_ID, IDS)
    doubled = torch.cat([noisy, IDS], dim=1)
    positions = torch.arange(n).repeat(2)[None].expand(2, -1)
    with torch.no_grad():
        logits = reference_logits(model, doubled, positions, _block_diff_table(n, 4)[None].expand(2, -1, -1))
    diff = (F.cross_entropy(logits[:, :n][masked], IDS[masked], reduction="none") / p_mask[masked]).sum()
    ar_targets = LABELS[:, 1:]
    ar = F.cross_entropy(logits[:, n:-1].reshape(-1, 64), ar_targets.reshape(-1), ignore_index=-100, reduction="sum")
    count = (ar_targets != -100).sum()
    expected = (diff + 0.7 * ar) / (masked.sum() + 0.7 * count)
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.causal_logits, logits[:, n:], atol=1e-4, rtol=0)


def test_random_noising_masks_only_trained_positions():
    model = tiny_model(dlm_paradigm="bidirectional")
    torch.manual_seed(0)
    seen = torch.zeros_like(IDS, dtype=torch.bool)
    for _ in range(30):
        masked, p_mask = model._noise(LABELS, None, None, 1e-3)
        assert not masked[LABELS == -100].any()
        assert torch.all((p_mask >= 1e-3) & (p_mask <= 1))
        assert torch.all(p_mask == p_mask[:, :1])  # one t per sequence
        seen |= masked
    assert seen[LABELS != -100].all()
    out = model(input_ids=IDS, labels=LABELS)
    assert torch.isfinite(out.loss) and out.num_masked_tokens.item() >= 0


def test_padding_is_never_attended_in_bidirectional_training():
    model = tiny_model(dlm_paradigm="bidirectional")
    ids = torch.tensor([[0, 0, 5, 6, 7, 8]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
    labels = torch.where(mask.bool(), ids, -100)
    masked = torch.tensor([[0, 0, 0, 1, 0, 1]], dtype=torch.bool)
    p_mask = torch.full(ids.shape, 0.5)
    a = model(input_ids=ids, attention_mask=mask, labels=labels, masked_indices=masked, p_mask=p_mask).loss
    other_pads = ids.clone()
    other_pads[0, :2] = torch.tensor([40, 41])
    b = model(input_ids=other_pads, attention_mask=mask, labels=labels, masked_indices=masked, p_mask=p_mask).loss
    torch.testing.assert_close(a, b)


def test_training_forward_refuses_inference_arguments():
    model = tiny_model()
    with pytest.raises(ValueError, match="dlm_paradigm"):
        model(input_ids=IDS, labels=LABELS, is_causal=False)


@pytest.mark.parametrize("paradigm", ["autoregressive", "bidirectional", "block_diff"])
def test_hf_trainer_runs_and_learns(paradigm, tmp_path):
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    class Repeat(Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            ids = torch.arange(3, 19) if i % 2 else torch.arange(30, 46)
            return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}

    model = tiny_model(dlm_paradigm=paradigm, block_size=4).train()
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=12,
        learning_rate=5e-3, report_to=[], logging_steps=1, save_strategy="no", use_cpu=True, seed=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Repeat())
    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert all(math.isfinite(x) for x in losses) and math.isfinite(result.training_loss)
    assert sum(losses[-3:]) < sum(losses[:3])
