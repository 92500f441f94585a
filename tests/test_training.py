"""The joint-training recipe: collators (masking rules, shapes), block-diffusion and drafter attention rules, a
hand-checked loss value, the drafter layout against real LinearSpec draft forwards, the frozen base (lossless
self-speculation after training), the Trainer with resumable checkpoints, and the `train` command."""

import json
import math
import os

import pytest
import torch
from conftest import MASK_ID, PAD_ID, tiny_model
from transformers import DynamicCache

from nemotron_diffusion.cli import main as cli_main
from nemotron_diffusion.drafting_nemotron_diffusion import adapters_for_drafting
from nemotron_diffusion.modeling_nemotron_diffusion import block_diff_mask_function
from nemotron_diffusion.training import (
    DrafterCollator,
    JointCollator,
    RecordDataset,
    add_drafter_adapter,
    draft_block_mask_function,
    drafter_loss,
    evaluate_model,
    stdlib_files,
    unwrap_model,
)

peft = pytest.importorskip("peft")


def _mask_matrix(fn, q_len, kv_len, q_offset=0):
    q = torch.arange(q_len)[:, None] + q_offset
    kv = torch.arange(kv_len)[None, :]
    return fn(torch.tensor(0), torch.tensor(0), q, kv).to(torch.int)


# ------------------------------------------------------------------------------------------------- collators
def test_joint_collator_masking_rules_and_shapes():
    collate = JointCollator(pad_token_id=PAD_ID, max_length=12, seed=0)
    batch = collate([
        {"input_ids": list(range(10, 20)), "prompt_length": 3},
        {"input_ids": list(range(10, 30))},  # cut to 12
        {"input_ids": [5, 6, 7, 8, 9]},
    ])
    assert set(batch) == {"input_ids", "attention_mask", "labels", "masked_indices", "p_mask"}
    for value in batch.values():
        assert value.shape == (3, 12)
    assert batch["attention_mask"].sum(1).tolist() == [10, 12, 5]
    assert batch["input_ids"][2, 5:].eq(PAD_ID).all() and batch["labels"][2, 5:].eq(-100).all()
    assert batch["labels"][0, :3].eq(-100).all() and batch["labels"][0, 3:10].tolist() == list(range(13, 20))
    masked = batch["masked_indices"]
    assert not masked[batch["labels"] == -100].any()  # prompt and padding are never masked
    p = batch["p_mask"]
    assert ((p >= 1e-3) & (p <= 1)).all() and (p == p[:, :1]).all()  # one mask rate per sequence
    again = JointCollator(pad_token_id=PAD_ID, max_length=12, seed=0)([
        {"input_ids": list(range(10, 20)), "prompt_length": 3}, {"input_ids": list(range(10, 30))},
        {"input_ids": [5, 6, 7, 8, 9]}])
    assert torch.equal(again["masked_indices"], masked)  # reproducible from the seed


def test_joint_collator_mask_rate_follows_p():
    collate = JointCollator(pad_token_id=PAD_ID, seed=1)
    batch = collate([{"input_ids": [7] * 4000} for _ in range(6)])
    rate = batch["masked_indices"].float().mean(1)
    assert torch.allclose(rate, batch["p_mask"][:, 0], atol=0.03)


def test_collators_validate_arguments():
    with pytest.raises(ValueError, match="blocks_per_sequence"):
        DrafterCollator(PAD_ID, blocks_per_sequence=0)
    with pytest.raises(TypeError, match="block_size"):
        DrafterCollator(PAD_ID, block_size=4.0)
    with pytest.raises(ValueError, match="block_size"):
        DrafterCollator(PAD_ID, block_size=1)
    with pytest.raises(ValueError, match="eps"):
        JointCollator(PAD_ID, eps=1.0)
    with pytest.raises(ValueError, match="examples"):
        JointCollator(PAD_ID)([])


def test_drafter_collator_block_starts():
    collate = DrafterCollator(PAD_ID, block_size=4, blocks_per_sequence=5, seed=0)
    batch = collate([{"input_ids": list(range(3, 23)), "prompt_length": 8}, {"input_ids": [3, 4, 5], "prompt_length": 1}])
    assert batch["input_ids"].shape == (2, 20) and batch["lengths"].tolist() == [20, 3]
    starts = batch["block_starts"]
    assert starts.shape == (2, 5)
    first = starts[0].tolist()
    assert first == sorted(set(first)) and all(7 <= c <= 18 for c in first)  # seed at P-1 .. len-2
    assert starts[1].tolist() == [0, 1, -1, -1, -1]  # only two candidates, the rest unused


# ------------------------------------------------------------------------------------------- attention rules
def test_block_diff_attention_rules():
    # [x_t | x_0] with n = 4, block 2: noisy blocks are bidirectional within themselves and see earlier clean
    # blocks; the clean half is causal and never sees the noisy half.
    expected = torch.tensor([
        # noisy 0 1 2 3 | clean 0 1 2 3
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [0, 0, 1, 1, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 0, 0, 0],
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 1, 1, 1, 1],
    ])
    assert torch.equal(_mask_matrix(block_diff_mask_function(4, 2), 8, 8), expected)


def test_draft_block_attention_rules():
    # Cache of 6 tokens, two blocks of 3 slots with seeds at positions 2 and 4: a slot sees the cache before its
    # seed and its own block. Query slots are absolute (they follow the cache).
    fn = draft_block_mask_function(6, 3, torch.tensor([[2, 4]]))
    expected = torch.tensor([
        [1, 1, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1],
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1],
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1],
    ])
    assert torch.equal(_mask_matrix(fn, 6, 12, q_offset=6), expected)


# ---------------------------------------------------------------------------------------------------- losses
def _zero_model(**overrides):
    model = tiny_model(**overrides)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model


def test_hand_checked_block_diff_loss():
    # All weights zero: every logit is 0, so every cross-entropy is ln(64). Three masked tokens at p = 0.5 and six
    # AR targets with weight 2: loss = (3 ln64 / 0.5 + 2 * 6 ln64) / (3 + 2 * 6) = 18 ln64 / 15.
    model = _zero_model(dlm_paradigm="block_diff", block_size=2, ar_loss_weight=2.0)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    labels = ids.clone()
    masked = torch.tensor([[False, True, False, True, True, False, False]])
    out = model(input_ids=ids, labels=labels, masked_indices=masked, p_mask=torch.full((1, 7), 0.5))
    ln = math.log(64)
    assert out.num_masked_tokens == 3 and out.num_ar_tokens == 6
    assert out.diffusion_loss.item() == pytest.approx(2 * ln, rel=1e-6)
    assert out.ar_loss.item() == pytest.approx(ln, rel=1e-6)
    assert out.loss.item() == pytest.approx(18 * ln / 15, rel=1e-6)


def test_joint_collator_batches_feed_every_paradigm():
    collate = JointCollator(pad_token_id=PAD_ID, max_length=16, seed=0)
    batch = collate([{"input_ids": list(range(3, 19)), "prompt_length": 4}, {"input_ids": list(range(20, 30))}])
    for paradigm in ("block_diff", "bidirectional", "autoregressive"):
        out = tiny_model(dlm_paradigm=paradigm, block_size=4)(**batch)
        assert torch.isfinite(out.loss)
        if paradigm != "autoregressive":
            assert int(out.num_masked_tokens) == int(batch["masked_indices"].sum())
        if paradigm != "bidirectional":
            assert int(out.num_ar_tokens) == int((batch["labels"][:, 1:] != -100).sum())


def _drafter(seed=0, r=4):
    model = add_drafter_adapter(tiny_model(seed=seed), r=r)
    torch.manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3)
    return model


def test_hand_checked_drafter_kl_is_zero_for_identical_teacher_and_student():
    # Zero weights: teacher and draft logits are all 0 -> KL 0, CE ln(63) (the mask id is excluded).
    model = _zero_model()
    batch = {"input_ids": torch.tensor([list(range(3, 15))]), "block_starts": torch.tensor([[0, 5, 10]])}
    out = drafter_loss(model, batch, 4, use_adapter=False)
    assert out.kl.item() == pytest.approx(0.0, abs=1e-6)
    assert out.ce.item() == pytest.approx(math.log(63), rel=1e-6)
    assert int(out.num_targets) == 3 + 3 + 1  # the block at 10 has one target left (position 11)


def _layout_case(seed, starts):
    """A drafter, its core model, random ids [2, 30] and a drafter batch with the given block starts [2, 4]."""
    model = _drafter()
    ids = torch.randint(3, MASK_ID, (2, 30), generator=torch.Generator().manual_seed(seed))
    starts = torch.tensor(starts)
    return model, unwrap_model(model), ids, starts, {"input_ids": ids, "block_starts": starts,
                                                     "lengths": torch.tensor([30, 30])}


def test_drafter_layout_equals_linear_spec_draft_forwards():
    model, core, ids, starts, batch = _layout_case(0, [[3, 10, 25, -1], [0, 7, 20, 28]])
    block = 5
    captured = []
    hook = core.diffusion_head.register_forward_hook(lambda m, i, o: captured.append(o.detach()))
    with torch.no_grad():
        out = drafter_loss(model, batch, block)
    hook.remove()
    layout = captured[-1].reshape(2, 4, block - 1, -1)
    assert int(out.num_blocks) == 7

    with torch.no_grad(), adapters_for_drafting(core, None) as set_drafting:
        for b in range(2):
            for k in range(4):
                c = int(starts[b, k])
                if c < 0:
                    continue
                set_drafting(False)
                cache = DynamicCache(config=core.config)
                if c > 0:
                    core(ids[b : b + 1, :c], cache=cache, use_cache=True)
                seed_block = torch.full((1, block), MASK_ID)
                seed_block[0, 0] = ids[b, c]
                set_drafting(True)
                real = core(seed_block, cache=cache, use_cache=True, is_causal=False, update_cache=False).logits
                torch.testing.assert_close(layout[b, k], real[0, 1:], rtol=1e-4, atol=1e-4)
                # Acceptance: drafts (mask id excluded) that equal the greedy AR tokens, counted from slot 1.
                set_drafting(False)
                drafts = real[0, 1:].clone()
                drafts[:, MASK_ID] = -math.inf
                drafts = drafts.argmax(-1)
                ar = core(ids[b : b + 1]).logits[0].argmax(-1)
                run = 0
                for i in range(block - 1):
                    pos = c + 1 + i
                    if pos >= 30 or drafts[i] != ar[pos - 1] or ids[b, pos] != ar[pos - 1]:
                        break
                    run += 1
                index = int((starts[:b] >= 0).sum()) + k
                assert out.accepted[index].item() == run


def test_drafter_quadratic_layout_equals_quadratic_spec_mask_rows():
    """The "quadratic" layout computes what a QuadraticSpec chunk row's masks compute: B masks after the seed c,
    seeing the causal cache up to and including c and each other; acceptance counts from slot 1."""
    model, core, ids, starts, batch = _layout_case(1, [[3, 10, 25, -1], [0, 7, 20, 27]])
    block = 4
    captured = []
    hook = core.diffusion_head.register_forward_hook(lambda m, i, o: captured.append(o.detach()))
    with torch.no_grad():
        out = drafter_loss(model, batch, block, layouts=("linear", "quadratic"))
    hook.remove()
    layout = captured[-1].reshape(2, 4, block, -1)
    with torch.no_grad(), adapters_for_drafting(core, None) as set_drafting:
        for b in range(2):
            for k in range(4):
                c = int(starts[b, k])
                if c < 0:
                    continue
                set_drafting(False)
                cache = DynamicCache(config=core.config)
                core(ids[b : b + 1, : c + 1], cache=cache, use_cache=True)
                set_drafting(True)
                masks = torch.full((1, block), MASK_ID)
                positions = torch.arange(c + 1, c + 1 + block)[None]
                real = core(masks, position_ids=positions, cache=cache, use_cache=True, is_causal=False,
                            update_cache=False).logits
                torch.testing.assert_close(layout[b, k], real[0], rtol=1e-4, atol=1e-4)
                set_drafting(False)
                drafts = real[0].clone()
                drafts[:, MASK_ID] = -math.inf
                drafts = drafts.argmax(-1)
                ar = core(ids[b : b + 1]).logits[0].argmax(-1)
                run = 0
                for i in range(1, block):
                    pos = c + 1 + i
                    if pos >= 30 or drafts[i] != ar[pos - 1] or ids[b, pos] != ar[pos - 1]:
                        break
                    run += 1
                index = int((starts[:b] >= 0).sum()) + k
                assert out.accepted_by_layout["quadratic"][index].item() == run


def test_drafter_denoise_layout_equals_partly_revealed_diffusion_steps():
    """The "denoise" layout computes what a later diffusion denoising step computes: the seed block with some slots
    already holding their (data) tokens, the rest masked; the draws come from `generator` alone, only masked slots
    are trained, and its accuracy counts the greedy-right guesses among them."""
    model, core, ids, starts, batch = _layout_case(2, [[3, 10, 22, -1], [0, 7, 16, 24]])
    block = 5
    captured = []
    hook = core.encoder.register_forward_hook(lambda m, i, kw, o: captured.append(kw["input_ids"].clone()),
                                              with_kwargs=True)
    head = []
    head_hook = core.diffusion_head.register_forward_hook(lambda m, i, o: head.append(o.detach()))
    with torch.no_grad():
        out = drafter_loss(model, batch, block, layouts=("denoise",), generator=torch.Generator().manual_seed(5))
        again = drafter_loss(model, batch, block, layouts=("denoise",), generator=torch.Generator().manual_seed(5))
    hook.remove()
    head_hook.remove()
    blocks = captured[1].reshape(2, 4, block)  # [0] is the teacher pass
    assert torch.equal(captured[3], captured[1])  # the same generator seed draws the same reveals
    torch.testing.assert_close(again.loss, out.loss)
    draft_logits = head[1].reshape(2, 4, block - 1, -1)
    revealed = blocks[..., 1:] != MASK_ID
    assert revealed.any() and (~revealed).any()
    hits, masked = 0, 0
    with torch.no_grad(), adapters_for_drafting(core, None) as set_drafting:
        ar = core(ids).logits.argmax(-1)
        for b in range(2):
            for k in range(4):
                c = int(starts[b, k])
                if c < 0:
                    continue
                assert blocks[b, k, 0] == ids[b, c]
                for i in range(1, block):  # a revealed slot holds the data token
                    assert blocks[b, k, i] in (MASK_ID, ids[b, c + i])
                set_drafting(False)
                cache = DynamicCache(config=core.config)
                if c > 0:
                    core(ids[b : b + 1, :c], cache=cache, use_cache=True)
                set_drafting(True)
                real = core(blocks[b, k][None], cache=cache, use_cache=True, is_causal=False,
                            update_cache=False).logits
                torch.testing.assert_close(draft_logits[b, k], real[0, 1:], rtol=1e-4, atol=1e-4)
                real = real[0, 1:].clone()
                real[:, MASK_ID] = -math.inf
                for i in range(block - 1):
                    pos = c + 1 + i
                    if pos < 30 and not revealed[b, k, i]:
                        masked += 1
                        hits += int(real[i].argmax() == ar[b, pos - 1] and ids[b, pos] == ar[b, pos - 1])
    assert int(out.num_targets) == masked
    assert out.accepted_by_layout["denoise_masked"].sum().item() == masked
    assert out.accepted_by_layout["denoise"].sum().item() == hits

def test_teacher_pass_uses_base_weights():
    # The KL target is the base model's distribution: with the adapter on or off in between, it is the same.
    model = _drafter()
    core = unwrap_model(model)
    batch = DrafterCollator(PAD_ID, block_size=4, blocks_per_sequence=3, seed=0)([{"input_ids": list(range(3, 25))}])
    with torch.no_grad():
        with model.disable_adapter():
            plain = drafter_loss(core, batch, 4, use_adapter=False)
        trained = drafter_loss(model, batch, 4)
    # Same teacher, different students: the CE on the teacher's greedy tokens differs, the count does not.
    assert int(plain.num_targets) == int(trained.num_targets)
    assert not torch.isclose(plain.kl, trained.kl)


def test_drafter_adapter_freezes_base_and_keeps_spec_lossless():
    model = _drafter()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "trainable_tokens" in n for n in trainable)
    core = unwrap_model(model)
    delta = core.encoder.embed_tokens.token_adapter.trainable_tokens_delta["default"]
    base = core.encoder.embed_tokens.token_adapter.base_layer.weight
    torch.testing.assert_close(delta[0] + base[MASK_ID], base.mean(0))  # mask row starts at the mean embedding

    before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = DrafterCollator(PAD_ID, block_size=4, blocks_per_sequence=4, seed=0)(
        [{"input_ids": list(range(3, 40))}, {"input_ids": list(range(20, 50))}])
    losses = []
    for _ in range(5):
        out = drafter_loss(model, batch, 4)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0]
    for name, p in model.named_parameters():
        if name in before:
            assert torch.equal(p, before[name]), name
    ids = torch.randint(3, MASK_ID, (1, 10), generator=torch.Generator().manual_seed(2))
    ar = core.generate(ids, max_new_tokens=12, do_sample=False)
    with model.disable_adapter():
        base_ar = core.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(ar, base_ar)
    for mode in ("linear_spec", "quadratic_spec"):
        spec = core.generate(ids, max_new_tokens=12, do_sample=False, decode_mode=mode, block_size=4)
        assert torch.equal(spec, ar), mode


# ---------------------------------------------------------------------------------------------------- trainer
def _records(n=12, length=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, MASK_ID, (length,), generator=g).tolist(), "prompt_length": 4}
            for _ in range(n)]


def test_trainer_drafter_checkpoints_and_resume(tmp_path):
    from transformers import TrainingArguments

    from nemotron_diffusion.training import TriModeTrainer

    def trainer(max_steps):
        torch.manual_seed(0)
        model = add_drafter_adapter(tiny_model(), r=4)
        args = TrainingArguments(
            output_dir=str(tmp_path), per_device_train_batch_size=2, per_device_eval_batch_size=4, max_steps=max_steps,
            learning_rate=1e-2, save_strategy="steps", save_steps=2, eval_strategy="no", report_to=[],
            remove_unused_columns=False, use_cpu=True, disable_tqdm=True, logging_steps=1,
        )
        return TriModeTrainer(
            model=model, args=args, train_dataset=RecordDataset(_records()), eval_dataset=RecordDataset(_records(4, seed=1)),
            data_collator=DrafterCollator(PAD_ID, block_size=4, blocks_per_sequence=3, seed=0), target="drafter",
            block_size=4,
        )

    first = trainer(2)
    first.train()
    checkpoint = tmp_path / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").exists() and (checkpoint / "optimizer.pt").exists()
    resumed = trainer(4)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 4
    metrics = resumed.evaluate()
    assert {"eval_loss", "eval_acceptance", "eval_tokens_per_cycle"} <= set(metrics)
    assert metrics["eval_tokens_per_cycle"] == pytest.approx(metrics["eval_acceptance"] + 1)


def test_evaluate_full_target_reports_diffusion_loss():
    model = tiny_model(dlm_paradigm="block_diff", block_size=4)
    metrics = evaluate_model(model, RecordDataset(_records(4)), target="full", block_size=4, batch_size=2)
    assert metrics["loss"] > 0 and 0 <= metrics["acceptance"] <= 3


def test_stdlib_split_is_disjoint():
    train, heldout = stdlib_files("train"), stdlib_files("heldout")
    assert train and heldout and not set(train) & set(heldout)
    assert all(p.suffix == ".py" for p in heldout)
    with pytest.raises(ValueError, match="split"):
        stdlib_files("dev")


# -------------------------------------------------------------------------------------------------- the command
def _tiny_folder(tmp_path):
    from test_convert import _tokenizer

    folder = tmp_path / "model"
    tiny_model().save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("target", ["drafter", "full"])
def test_train_command(tmp_path, target, capsys):
    folder = _tiny_folder(tmp_path)
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in _records(8)) + "\n")
    out = tmp_path / "run"
    argv = ["train", "--model", str(folder), "--target", target, "-o", str(out), "--data", str(data),
            "--eval-data", str(data), "--eval-sequences", "4", "--batch-size", "2", "--max-steps", "2",
            "--save-steps", "1", "--eval-steps", "2", "--block-size", "4", "--blocks-per-sequence", "3",
            "--seq-len", "24", "--lora-r", "4", "--device", "cpu"]
    assert cli_main(argv) == 0
    final = out / "final"
    if target == "drafter":
        metrics = json.loads((final / "training_metrics.json").read_text())
        assert metrics["tokens_seen"] == 2 * 2 * 3 * 4
        assert {"eval_acceptance", "eval_loss"} <= set(metrics["metrics"]["after"])
        from safetensors.torch import load_file

        assert all(v.dtype == torch.float16 for v in load_file(str(final / "adapter_model.safetensors")).values())
    else:
        assert (final / "config.json").exists()
        assert json.loads((final / "config.json").read_text())["dlm_paradigm"] == "block_diff"
    # Resuming from the last checkpoint continues the step count.
    resume = [a if a != "2" or argv[i - 1] != "--max-steps" else "3" for i, a in enumerate(argv)] + ["--resume"]
    assert cli_main(resume) == 0
    assert os.path.isdir(out / "checkpoint-3")
    if target == "drafter":  # a new run continuing the trained adapter, with extra data
        again = ["train", "--model", str(folder), "-o", str(tmp_path / "more"), "--data", str(data), "--extra-data",
                 str(data), "--init-adapter", str(final), "--eval-data", str(data), "--eval-sequences", "2",
                 "--batch-size", "2", "--max-steps", "1", "--block-size", "4", "--blocks-per-sequence", "3",
                 "--seq-len", "24", "--device", "cpu"]
        assert cli_main(again) == 0
        assert "trainable params" in capsys.readouterr().out
        assert cli_main(again[:-2] + ["--init-adapter", str(tmp_path)]) == 2


def test_train_command_rejects_bad_arguments(tmp_path, capsys):
    assert cli_main(["train", "-o", str(tmp_path / "x"), "--model", str(tmp_path), "--block-size", "1"]) == 2
    assert "--block-size" in capsys.readouterr().err
    assert cli_main(["train", "-o", str(tmp_path / "x"), "--model", str(tmp_path)]) == 2
    assert "not a model folder" in capsys.readouterr().err
