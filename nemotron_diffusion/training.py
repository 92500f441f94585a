# Copyright 2026 The nemotron-diffusion authors. Licensed under the Apache License, Version 2.0.
"""The joint-training recipe: data, collators, losses and an HF `Trainer` for tri-mode models.

Two targets:

* **full** — the whole model learns the joint AR + diffusion objective of `config.dlm_paradigm` (`block_diff` by
  default: the doubled `[x_t | x_0]` sequence, diffusion loss on the noisy half plus `ar_loss_weight` times the AR
  loss on the clean half; docs/reference-model.md §6). `JointCollator` draws the noise (t per sequence, each target
  masked with p = (1 - eps) t + eps) so batches are reproducible, and the model's own `forward(labels=...)` computes
  the loss.
* **drafter** — a PEFT LoRA adapter is trained with the diffusion objective only, the base frozen. The loss is
  computed on exactly the forward LinearSpec drafts with: the prefix goes through the *base* model causally (adapter
  off, no gradient; that is the cache a real draft reads), then blocks `[seed, mask x (B-1)]` at their true
  positions attend bidirectionally to the cached prefix before their seed and to their own block, adapter on. Each
  mask slot is trained towards the base model's own next-token distribution at that position (self-distillation,
  KL(p_AR || q_draft)), which on the base model's greedy continuations is exactly what the verifier accepts. The AR
  verifier is the unchanged base, so self-speculation stays exactly lossless w.r.t. the base model.

Both targets report a held-out diffusion loss and the draft acceptance (mean accepted drafts per LinearSpec block
under greedy verification, measured teacher-forced on held-out sequences).

Tooling beside the model files: this module imports them, never the other way round.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import json
import math
import random
import sysconfig
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .drafting_nemotron_diffusion import adapters_for_drafting
from .modeling_nemotron_diffusion import _CACHE_FIELD
from .tooling import left_pad, progress_bar

IGNORE_INDEX = -100
TARGETS = ("full", "drafter")
_SKIPPED_STDLIB_DIRS = (
    "test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "lib2to3", "pydoc_data", "encodings",
    "turtledemo", "ensurepip", "config-3", "venv",
)


# ============================================================================================================ data
def stdlib_files(split: str = "train", heldout_every: int = 20) -> list[Path]:
    """The CPython standard-library sources of the running interpreter (every machine has them), split by a hash
    of the relative path: one file in `heldout_every` is held out."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split={split!r} is invalid; allowed: 'train', 'heldout', 'all'")
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in _SKIPPED_STDLIB_DIRS or part.startswith("config-") for part in rel.parts[:-1]):
            continue
        heldout = zlib.crc32(str(rel).encode()) % heldout_every == 0
        if split == "all" or (split == "heldout") == heldout:
            files.append(path)
    return files


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return ""


def text_windows(tokenizer, files: Sequence[Path], seq_len: int, max_windows: int | None = None) -> list[list[int]]:
    """Consecutive `seq_len`-token windows of the files' text (each file tokenized on its own)."""
    windows = []
    for path in files:
        ids = tokenizer(_read(path), add_special_tokens=False).input_ids
        for start in range(0, len(ids) - seq_len + 1, seq_len):
            windows.append(ids[start : start + seq_len])
            if max_windows is not None and len(windows) >= max_windows:
                return windows
    return windows


def _functions(source: str):
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.splitlines()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("__"):
            doc = ast.get_docstring(node)
            body = lines[node.lineno - 1 : (node.end_lineno or node.lineno)]
            if doc and 2 <= len(body) <= 40:
                found.append((node.name, doc.strip().splitlines()[0], "\n".join(body)))
    return found


def stdlib_prompts(tokenizer, files: Sequence[Path], seed: int = 0, raw_share: float = 0.25,
                   raw_tokens: int = 96, limit: int | None = None, max_prompt_tokens: int = 512) -> list[list[int]]:
    """Prompts built from the standard library for self-distillation: chat requests (write / explain / complete a
    function of the stdlib, through the tokenizer's chat template) and, for `raw_share` of them, plain code windows
    to continue. Returns token id lists, shuffled with `seed`."""
    rng = random.Random(seed)
    chat = bool(getattr(tokenizer, "chat_template", None))
    prompts = []
    for path in files:
        source = _read(path)
        for name, summary, body in _functions(source):
            kind = rng.choice(("write", "explain", "complete", "write"))
            if kind == "write":
                text = f"Write a Python function `{name}` that does the following: {summary}"
            elif kind == "explain":
                text = f"Explain what this Python function does:\n```python\n{body}\n```"
            else:
                head = "\n".join(body.splitlines()[: max(2, len(body.splitlines()) // 2)])
                text = f"Complete this Python code:\n```python\n{head}\n```"
            if chat:
                rendered = tokenizer.apply_chat_template(
                    [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
                )
                prompts.append(tokenizer(rendered, add_special_tokens=False).input_ids)
            else:
                prompts.append(tokenizer(text, add_special_tokens=False).input_ids)
    n_raw = int(len(prompts) * raw_share / max(1e-9, 1 - raw_share))
    windows = text_windows(tokenizer, files, raw_tokens)
    rng.shuffle(windows)
    raw = windows[:n_raw]
    prompts = [p for p in prompts if len(p) <= max_prompt_tokens] + raw
    rng.shuffle(prompts)
    return prompts[:limit] if limit is not None else prompts


@torch.no_grad()
def distill_sequences(model, prompts: Sequence[Sequence[int]], max_new_tokens: int = 192, batch_size: int = 16,
                      pad_token_id: int = 0, progress: bool = True, deadline: float | None = None) -> list[dict]:
    """The base model's own greedy continuations of `prompts` (AR mode, adapters off), cut after the first EOS.

    Returns `{"input_ids": prompt + continuation, "prompt_length": len(prompt)}` records. On these sequences every
    continuation token is the greedy AR token given its prefix, so any block in the continuation is exactly what a
    greedy verifier accepts. With `deadline` (a `time.time()` value), generation stops after the batch that passes
    it and only the prompts done so far are returned."""
    import time

    core = unwrap_model(model)
    eos = core.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    device = next(core.parameters()).device
    # Batches of similar lengths (little padding), in the prompts' own order at a coarse grain, so a deadline keeps
    # an unbiased subset.
    group = batch_size * 8
    order = [i for g in range(0, len(prompts), group)
             for i in sorted(range(g, min(g + group, len(prompts))), key=lambda i: len(prompts[i]))]
    records = [None] * len(prompts)
    bar = progress_bar(total=len(prompts), desc="self-distillation", enabled=progress)
    for start in range(0, len(order), batch_size):
        if deadline is not None and time.time() > deadline:
            break
        chunk = order[start : start + batch_size]
        ids, mask = left_pad([prompts[i] for i in chunk], pad_token_id)
        width = ids.shape[1]
        out = core.generate(
            ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens, do_sample=False,
            decode_mode="ar", pad_token_id=pad_token_id,
        )
        for row, i in enumerate(chunk):
            new = out[row, width:].tolist()
            for j, token in enumerate(new):
                if token in eos_ids:
                    new = new[: j + 1]
                    break
            records[i] = {"input_ids": list(prompts[i]) + new, "prompt_length": len(prompts[i])}
        bar.update(len(chunk))
    bar.close()
    return [r for r in records if r is not None]


def save_records(records, path):
    with open(path, "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)


def load_records(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class RecordDataset(torch.utils.data.Dataset):
    """A list of `{"input_ids": [...], ...}` records as a map-style dataset."""

    def __init__(self, records):
        self.records = [r if isinstance(r, dict) else {"input_ids": list(r)} for r in records]

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        return self.records[index]


# ====================================================================================================== collators
def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _pad_right(sequences, pad_id, width=None):
    width = width or max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    for row, seq in enumerate(sequences):
        seq = list(seq)[:width]
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return ids


class JointCollator:
    """HF-Trainer-compatible collator for the `full` target (any `dlm_paradigm`).

    Each example is `{"input_ids": [...]}` (optionally `"labels"`, or `"prompt_length"`: prompt tokens get label
    -100 and are never masked). Sequences are right-padded (or cut) to `max_length`; padding gets label -100 and
    attention 0. The diffusion noise is drawn here, from this collator's own generator: per sequence t ~ U(0, 1),
    p = (1 - eps) t + eps, and each target position (label != -100) is masked with probability p. The batch holds
    `input_ids`, `attention_mask`, `labels`, `masked_indices` and `p_mask`, which the model's `forward` takes as they
    are (`block_diff`: the masked positions of the noisy half; `autoregressive` ignores the noise)."""

    def __init__(self, pad_token_id: int, max_length: int | None = None, eps: float = 1e-3, seed: int | None = None,
                 mask_prompt: bool = True):
        _check_int("pad_token_id", pad_token_id, 0)
        if max_length is not None:
            _check_int("max_length", max_length, 2)
        if not 0 <= eps < 1:
            raise ValueError(f"eps must be in [0, 1), got {eps}")
        self.pad_token_id, self.max_length, self.eps, self.mask_prompt = pad_token_id, max_length, eps, mask_prompt
        self.generator = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**63)

    def __call__(self, examples):
        if not examples:
            raise ValueError("examples must be a non-empty list")
        sequences = [list(e["input_ids"]) for e in examples]
        width = self.max_length or max(len(s) for s in sequences)
        input_ids = _pad_right(sequences, self.pad_token_id, width)
        lengths = torch.tensor([min(len(s), width) for s in sequences])
        attention_mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        if "labels" in examples[0]:
            labels = _pad_right([e["labels"] for e in examples], IGNORE_INDEX, width)
            labels = torch.where(attention_mask.bool(), labels, IGNORE_INDEX)
        else:
            labels = torch.where(attention_mask.bool(), input_ids, IGNORE_INDEX)
            if self.mask_prompt:
                for row, e in enumerate(examples):
                    labels[row, : int(e.get("prompt_length", 0))] = IGNORE_INDEX
        t = torch.rand(len(examples), 1, generator=self.generator)
        p_mask = ((1 - self.eps) * t + self.eps).expand(-1, width).contiguous()
        masked = (torch.rand(input_ids.shape, generator=self.generator) < p_mask) & (labels != IGNORE_INDEX)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "masked_indices": masked,
            "p_mask": p_mask,
        }


class DrafterCollator:
    """HF-Trainer-compatible collator for the `drafter` target (and the acceptance metric).

    Each example is `{"input_ids": [...], "prompt_length": P}` (P defaults to 0). Per sequence it draws up to
    `blocks_per_sequence` distinct draft positions c with P - 1 <= c <= len - 2: the block `[x_c, mask x (B-1)]`
    drafts the tokens c+1 .. c+B-1 that follow the seed x_c (slots past the end of the sequence are ignored).
    Returns right-padded `input_ids`, `lengths` and `block_starts` [batch, K] (-1 = no block)."""

    def __init__(self, pad_token_id: int, block_size: int = 16, blocks_per_sequence: int = 8,
                 max_length: int | None = None, seed: int | None = None):
        _check_int("pad_token_id", pad_token_id, 0)
        _check_int("block_size", block_size, 2)
        _check_int("blocks_per_sequence", blocks_per_sequence, 1)
        if max_length is not None:
            _check_int("max_length", max_length, 2)
        self.pad_token_id, self.block_size, self.blocks = pad_token_id, block_size, blocks_per_sequence
        self.max_length = max_length
        self.rng = random.Random(seed)

    def __call__(self, examples):
        if not examples:
            raise ValueError("examples must be a non-empty list")
        sequences = [list(e["input_ids"])[: self.max_length] if self.max_length else list(e["input_ids"]) for e in examples]
        input_ids = _pad_right(sequences, self.pad_token_id)
        starts = torch.full((len(examples), self.blocks), -1, dtype=torch.long)
        for row, (e, seq) in enumerate(zip(examples, sequences)):
            low = max(int(e.get("prompt_length", 0)) - 1, 0)
            candidates = list(range(low, len(seq) - 1))
            chosen = sorted(self.rng.sample(candidates, min(self.blocks, len(candidates))))
            starts[row, : len(chosen)] = torch.tensor(chosen, dtype=torch.long)
        return {"input_ids": input_ids, "lengths": torch.tensor([len(s) for s in sequences]), "block_starts": starts}


# ========================================================================================================= losses
def unwrap_model(model):
    """The `NemotronDiffusionForCausalLM` inside a PeftModel (its LoRA layers stay in place) or the model itself."""
    from .modeling_nemotron_diffusion import NemotronDiffusionForCausalLM

    current = model.get_base_model() if hasattr(model, "get_base_model") else model
    current = getattr(current, "module", current)  # DataParallel / DDP
    if isinstance(current, NemotronDiffusionForCausalLM):
        return current
    raise TypeError(f"model must be a NemotronDiffusionForCausalLM or a PeftModel around one, got {type(model).__name__}")


def draft_block_mask_function(cache_length: int, block_size: int, block_starts: torch.Tensor):
    """Attention rules of the drafter layout `[cache of the sequence (0..T-1) | K blocks of B slots (T..)]`.

    A slot of block k (seed position c_k) sees the cached keys before its seed (kv < c_k) and every slot of its own
    block: what a LinearSpec draft forward over `[seed, masks]` on top of a prefix cache of length c_k sees."""
    starts = block_starts.clamp(min=0)

    def mask(batch_idx, head_idx, q_idx, kv_idx):
        block = (q_idx - cache_length) // block_size  # query slots are absolute: the blocks start at T
        in_cache = kv_idx < cache_length
        sees_prefix = in_cache & (kv_idx < starts[batch_idx, block])
        same_block = ~in_cache & ((kv_idx - cache_length) // block_size == block)
        return sees_prefix | same_block

    return mask


DRAFT_LAYOUTS = ("linear", "denoise", "quadratic")


@dataclass
class DrafterOutput:
    loss: torch.Tensor
    kl: torch.Tensor
    ce: torch.Tensor
    num_targets: torch.Tensor
    accepted: torch.Tensor  # [num_blocks] accepted drafts per valid block (greedy, teacher-forced), first layout
    slot_hits: torch.Tensor  # [B-1] correct drafts per slot (among valid blocks), first layout
    num_blocks: torch.Tensor
    # layout -> [num_blocks]; for "denoise" the right guesses per block, with "denoise_masked" its masked slots
    accepted_by_layout: dict | None = None
    # [num_blocks, B-1] linear layout: rank of the verifier's greedy token among each slot's draft logits (0 = the
    # draft itself); a large value where the slot is past the data or the data leaves the greedy path.
    greedy_ranks: torch.Tensor | None = None


def drafter_loss(model, batch, block_size: int, use_adapter: bool = True, temperature: float = 1.0,
                 hard_weight: float = 0.0, layouts=("linear",), generator: torch.Generator | None = None
                 ) -> DrafterOutput:
    """Self-distillation loss of the drafter on the draft layouts of the decoding loops (see the module docstring).

    Layouts, for a block drawn at seed position c of a sequence whose causal cache is the base model's:

    * `"linear"` (LinearSpec drafts, diffusion's first denoising step): `[x_c, mask x (B-1)]` at positions c..,
      seeing the cache before c and its own block; slots 1..B-1 are drafted.
    * `"denoise"` (diffusion's later denoising steps, where part of the block is already committed): the linear
      layout with each of slots 1..B-1 revealed (its data token) with probability r, r ~ U(0, 1) drawn per block
      from `generator`, as block diffusion's noise schedule does; only the slots left masked are trained.
    * `"quadratic"` (a QuadraticSpec chunk row): `mask x B` at positions c+1.., seeing the cache up to and
      including c (the seed is a verified, causal entry there) and its own row; QuadraticSpec keeps the guesses of
      slots 1..B-1 (slot 0's token is the verifier's own), so acceptance counts from slot 1.

    `use_adapter=True`: the teacher pass runs with every adapter off, the draft passes with the adapters on (the
    drafter target); `False`: both run with the model as it is (the full target, or the base as its own drafter).
    loss = mean over `layouts` of KL(p_teacher || q_draft) per target slot (teacher at temperature `temperature`),
    averaged over target slots, plus `hard_weight` times the cross-entropy on the teacher's greedy token."""
    # Each layout is a name, or (name, block size) to train it at its own block size.
    layouts = [(item, block_size) if isinstance(item, str) else tuple(item) for item in layouts]
    for layout, size in layouts:
        if layout not in DRAFT_LAYOUTS:
            raise ValueError(f"layouts: {layout!r} is invalid; allowed: {DRAFT_LAYOUTS}")
        _check_int("block size", size, 2)
    core = unwrap_model(model)
    mask_id = core.config.mask_token_id
    input_ids, starts = batch["input_ids"], batch["block_starts"]
    lengths = batch.get("lengths")
    device = next(core.parameters()).device
    input_ids, starts = input_ids.to(device), starts.to(device)
    batch_size, length = input_ids.shape
    if lengths is None:
        lengths = torch.full((batch_size,), length, dtype=torch.long)
    lengths = lengths.to(device)
    num_blocks = starts.shape[1]
    block_valid = starts >= 0

    toggles = adapters_for_drafting(core, None) if use_adapter else contextlib.nullcontext(lambda on: None)
    losses, kls, ces, counts, accepted, slot_hits, greedy_ranks = [], [], [], [], {}, None, None
    with toggles as set_drafting:
        set_drafting(False)
        with torch.no_grad():
            teacher = core.encoder(input_ids=input_ids, use_cache=True, is_causal=True)
            cache = getattr(teacher, _CACHE_FIELD)
            hidden = teacher.last_hidden_state
        for layout, block_size in layouts:
            slots = torch.arange(block_size, device=device)
            seeded = layout != "quadratic"  # slot 0 holds the seed
            first = 0 if seeded else 1  # position of slot 0 after the seed
            drafted = slots[1:] if seeded else slots  # slots whose logits are trained
            with torch.no_grad():
                # Drafted slot i of a block at c predicts position c+first+i; the causal logit before it teaches it.
                target_pos = starts[:, :, None] + first + drafted[None, None, :]  # [b, K, D]
                valid = block_valid[:, :, None] & (target_pos < lengths[:, None, None])
                gather = (target_pos - 1).clamp(min=0, max=length - 1)
                teacher_hidden = hidden.gather(1, gather.reshape(batch_size, -1, 1).expand(-1, -1, hidden.shape[-1]))
                teacher_logits = core.diffusion_head(teacher_hidden).float().reshape(
                    batch_size, num_blocks, len(drafted), -1)
                teacher_logits[..., mask_id] = -math.inf
                greedy = teacher_logits.argmax(-1)
                data_next = input_ids.gather(1, target_pos.clamp(max=length - 1).reshape(batch_size, -1)).reshape(
                    greedy.shape)

            block_ids = torch.full((batch_size, num_blocks, block_size), mask_id, dtype=torch.long, device=device)
            if seeded:
                block_ids[:, :, 0] = input_ids.gather(1, starts.clamp(min=0))
            if layout == "denoise":
                rate = torch.rand(batch_size, num_blocks, 1, generator=generator, device=generator_device(generator))
                revealed = (torch.rand(batch_size, num_blocks, len(drafted), generator=generator,
                                       device=generator_device(generator)) < rate).to(device)
                block_ids[:, :, 1:] = torch.where(revealed, data_next, mask_id)
                valid = valid & ~revealed  # a committed slot has nothing to learn
            positions = starts.clamp(min=0)[:, :, None] + first + slots[None, None, :]
            set_drafting(True)
            draft = core.encoder(
                input_ids=block_ids.reshape(batch_size, -1),
                position_ids=positions.reshape(batch_size, -1),
                cache=cache,
                use_cache=True,
                update_cache=False,
                is_causal=False,
                mask_function=draft_block_mask_function(length, block_size, starts + first),
            )
            set_drafting(False)
            draft_hidden = draft.last_hidden_state.reshape(batch_size, num_blocks, block_size, -1)[:, :, drafted]
            draft_logits = core.diffusion_head(draft_hidden).float()
            draft_logits = draft_logits.masked_fill(
                torch.arange(draft_logits.shape[-1], device=device) == mask_id, torch.finfo(torch.float32).min
            )
            log_q = F.log_softmax(draft_logits[valid], dim=-1)
            log_p = F.log_softmax(teacher_logits[valid] / temperature, dim=-1)
            p = log_p.exp()
            kl_per = (p * (log_p.masked_fill(p == 0, 0) - log_q)).sum(-1)
            ce_per = F.nll_loss(log_q, greedy[valid], reduction="none")
            count = valid.sum()
            kl = kl_per.sum() / count.clamp(min=1)
            ce = ce_per.sum() / count.clamp(min=1)
            losses.append(kl + hard_weight * ce)
            kls.append(kl.detach())
            ces.append(ce.detach())
            counts.append(count)
            with torch.no_grad():
                # A draft is accepted by a greedy verifier iff it equals the greedy token; the run continues only
                # while the data also follows the greedy path (always, on self-distilled sequences).
                hit = (draft_logits.argmax(-1) == greedy) & (data_next == greedy) & valid
                if layout == "linear":
                    ranks = (draft_logits > draft_logits.gather(-1, greedy[..., None])).sum(-1)
                    ranks = torch.where((data_next == greedy) & valid, ranks, torch.iinfo(torch.long).max)
                    greedy_ranks = ranks[block_valid]
                if layout == "quadratic":
                    hit = hit[..., 1:]  # QuadraticSpec replaces slot 0's guess by the verified token
                if layout == "denoise":  # no chain to accept: the right guesses among the masked slots
                    accepted[layout] = hit.sum(-1)[block_valid].float()
                    accepted["denoise_masked"] = valid.sum(-1)[block_valid].float()
                    continue
                run = torch.cumprod(hit.long(), dim=-1)
                accepted[layout] = run.sum(-1)[block_valid].float()
                if slot_hits is None:
                    full = block_valid[:, :, None] & (valid if layout == "linear" else valid[..., 1:])
                    slot_hits = (run * full).sum((0, 1)).float()
    loss = sum(losses) / len(losses)
    return DrafterOutput(loss, sum(kls) / len(kls), sum(ces) / len(ces), sum(counts), accepted[layouts[0][0]],
                         slot_hits, block_valid.sum(), accepted, greedy_ranks)


def generator_device(generator: torch.Generator | None):
    """The device random numbers of `generator` are drawn on (the default generator's: the CPU)."""
    return "cpu" if generator is None else generator.device


def tree_accepted(ranks: torch.Tensor, width: int, slots: int) -> torch.Tensor:
    """Accepted drafts per block [num_blocks] of a greedy verify tree (`verify_tree_nemotron_diffusion`),
    teacher-forced, from `greedy_ranks` [num_blocks, D]: the chain while the rank is 0; where it stops at slot
    f <= `slots` with the verifier's token among the drafter's top `width` there (rank < width), that sibling, and
    the next slot's chain draft after it when its rank is 0 (a diffusion draft of slot f+1 does not depend on slot
    f's token, and teacher forcing continues on the verifier's path). width 1 is the chain."""
    hits = (ranks == 0).long()
    chain = hits.cumprod(dim=1).sum(dim=1)
    if width <= 1:
        return chain
    d = ranks.shape[1]
    rows = torch.arange(ranks.shape[0], device=ranks.device)
    at = chain.clamp(max=d - 1)
    sibling = (chain < min(slots, d)) & (ranks[rows, at] < width)
    after = (chain + 1).clamp(max=d - 1)
    continuation = sibling & (chain + 1 < d) & (ranks[rows, after] == 0)
    return chain + sibling.long() + continuation.long()


# ======================================================================================================== trainer
@functools.cache
def _trainer_class():
    from transformers import Trainer

    class TriModeTrainer(Trainer):
        """`transformers.Trainer` for both targets.

        `target="full"`: the model's own joint loss on `JointCollator` batches. `target="drafter"`: `drafter_loss`
        on `DrafterCollator` batches (the model should be a PeftModel; only its adapter is trained and saved).
        `evaluate()` reports `eval_loss` (held-out diffusion loss: the model's diffusion loss for `full`, the draft
        KL for `drafter`), `eval_acceptance` (mean accepted drafts per LinearSpec block, greedy) and
        `eval_tokens_per_cycle` (= acceptance + 1), measured with `acceptance_block_size` blocks on
        `acceptance_dataset` (records with `prompt_length`; default: the eval dataset)."""

        def __init__(self, *args, target="drafter", block_size=16, acceptance_dataset=None,
                     acceptance_block_size=None, kl_temperature=1.0, hard_weight=0.0, layouts=("linear",),
                     **kwargs):
            if target not in TARGETS:
                raise ValueError(f"target={target!r} is invalid; allowed: {TARGETS}")
            super().__init__(*args, **kwargs)
            self.target, self.block_size = target, block_size
            self.acceptance_dataset = acceptance_dataset
            self.acceptance_block_size = acceptance_block_size or block_size
            self.kl_temperature, self.hard_weight = kl_temperature, hard_weight
            self.layouts = tuple(layouts)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.target == "drafter":
                out = drafter_loss(model, inputs, self.block_size, use_adapter=True, temperature=self.kl_temperature,
                                   hard_weight=self.hard_weight, layouts=self.layouts)
                return (out.loss, out) if return_outputs else out.loss
            outputs = model(**inputs)
            return (outputs.loss, outputs) if return_outputs else outputs.loss

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
            metrics = evaluate_model(
                self.model, dataset, target=self.target, block_size=self.block_size,
                batch_size=self.args.per_device_eval_batch_size, collator=self.data_collator,
                acceptance_dataset=self.acceptance_dataset, acceptance_block_size=self.acceptance_block_size,
                layouts=self.layouts,
            )
            metrics = {f"{metric_key_prefix}_{k}": v for k, v in metrics.items()}
            metrics["epoch"] = self.state.epoch
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

    return TriModeTrainer


def __getattr__(name):
    if name == "TriModeTrainer":  # built lazily: importing this module does not import the Trainer stack
        return _trainer_class()
    raise AttributeError(name)


@torch.no_grad()
def evaluate_model(model, dataset, target="drafter", block_size=16, batch_size=4, collator=None,
                   acceptance_dataset=None, acceptance_block_size=None, max_batches=None, seed=1234,
                   layouts=("linear",), tree_shapes=((3, 3),)) -> dict:
    """Held-out metrics: `loss` (diffusion loss: the model's for `full`, draft KL for `drafter`), `acceptance` and
    `tokens_per_cycle` (greedy LinearSpec, teacher-forced, on `acceptance_dataset` or `dataset`); with the
    `"quadratic"` layout also `quadratic_acceptance` and `quadratic_tokens_per_forward` (QuadraticSpec emits the
    accepted guesses plus one verified token per forward); with `"denoise"` also `denoise_accuracy` (greedy-right
    guesses per masked slot of partly revealed blocks); `treeWxS_tokens_per_cycle` for each (width, slots) of
    `tree_shapes`: LinearSpec's tokens per cycle with a verify tree of that shape (`tree_accepted`)."""
    core = unwrap_model(model)
    was_training = model.training
    model.eval()
    metrics = {}
    losses, weights = 0.0, 0
    if target == "full":
        collate = collator or JointCollator(core.config.pad_token_id or 0, seed=seed)
        for i, start in enumerate(range(0, len(dataset), batch_size)):
            if max_batches is not None and i >= max_batches:
                break
            batch = collate([dataset[j] for j in range(start, min(start + batch_size, len(dataset)))])
            batch = {k: v.to(next(core.parameters()).device) for k, v in batch.items()}
            out = model(**batch)
            n = int(out.num_masked_tokens) if out.num_masked_tokens is not None else 1
            value = out.diffusion_loss if out.diffusion_loss is not None else out.loss
            losses += float(value) * n
            weights += n
        metrics["loss"] = losses / max(weights, 1)
    accept_data = acceptance_dataset if acceptance_dataset is not None else dataset
    b = acceptance_block_size or block_size
    draft_collate = DrafterCollator(core.config.pad_token_id or 0, block_size=b, blocks_per_sequence=8, seed=seed)
    accepted, kl_sum, kl_count, ranks = [], 0.0, 0, []
    accepted_quadratic = []
    quadratic = [item for item in layouts if (item if isinstance(item, str) else item[0]) == "quadratic"]
    denoise = (("denoise", b),) if any((item if isinstance(item, str) else item[0]) == "denoise"
                                       for item in layouts) else ()
    layouts = (("linear", b),) + tuple(quadratic)
    generator = torch.Generator().manual_seed(seed)  # the denoise layout's reveals: the same on every evaluation
    denoise_hits, denoise_masked = 0.0, 0.0
    slot_hits = torch.zeros(b - 1)
    for i, start in enumerate(range(0, len(accept_data), batch_size)):
        if max_batches is not None and i >= max_batches:
            break
        records = [accept_data[j] for j in range(start, min(start + batch_size, len(accept_data)))]
        batch = draft_collate(records)
        out = drafter_loss(model, batch, b, use_adapter=(target == "drafter"), layouts=layouts)
        if denoise:  # a pass of its own, so that draft_kl keeps its meaning across runs with and without it
            hits = drafter_loss(model, batch, b, use_adapter=(target == "drafter"), layouts=denoise,
                                generator=generator).accepted_by_layout
            denoise_hits += float(hits["denoise"].sum())
            denoise_masked += float(hits["denoise_masked"].sum())
        accepted.append(out.accepted_by_layout["linear"].cpu())
        ranks.append(out.greedy_ranks.cpu())
        if "quadratic" in out.accepted_by_layout:
            accepted_quadratic.append(out.accepted_by_layout["quadratic"].cpu())
        kl_sum += float(out.kl) * int(out.num_targets)
        kl_count += int(out.num_targets)
        slot_hits += out.slot_hits.cpu()
    if accepted:
        accepted = torch.cat(accepted)
        metrics["acceptance"] = float(accepted.mean())
        metrics["tokens_per_cycle"] = float(accepted.mean()) + 1.0
        metrics["draft_kl"] = kl_sum / max(kl_count, 1)
        if target == "drafter":
            metrics["loss"] = metrics["draft_kl"]
        metrics["slot1_accept_rate"] = float(slot_hits[0] / max(len(accepted), 1))
        ranks = torch.cat(ranks)
        for width, slots in tree_shapes:
            tree = tree_accepted(ranks, width, slots).float()
            metrics[f"tree{width}x{slots}_tokens_per_cycle"] = float(tree.mean()) + 1
    if denoise:
        metrics["denoise_accuracy"] = denoise_hits / max(denoise_masked, 1.0)
    if accepted_quadratic:
        mean = float(torch.cat(accepted_quadratic).mean())
        metrics["quadratic_acceptance"] = mean
        metrics["quadratic_tokens_per_forward"] = mean + 1.0
    if was_training:
        model.train()
    return metrics


# ================================================================================================ model preparation
def add_drafter_adapter(model, r: int = 16, alpha: int | None = None, target_modules=("q_proj", "k_proj", "v_proj",
                        "o_proj", "gate_proj", "up_proj", "down_proj"), train_mask_embedding: bool = True,
                        adapter_name: str = "default"):
    """Wraps `model` in a PeftModel with a LoRA drafter (base frozen). With `train_mask_embedding`, the mask
    token's embedding row is trained too (PEFT trainable tokens, part of the adapter and switched with it)."""
    from peft import LoraConfig, get_peft_model

    _check_int("r", r, 1)
    if not target_modules:
        raise ValueError("target_modules must name at least one module (e.g. 'o_proj')")
    config = LoraConfig(
        r=r,
        lora_alpha=alpha if alpha is not None else 2 * r,
        lora_dropout=0.0,
        target_modules=list(target_modules),
        bias="none",
        trainable_token_indices={"embed_tokens": [model.config.mask_token_id]} if train_mask_embedding else None,
    )
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    if train_mask_embedding:
        # Start the mask row at the mean token embedding: a converted model's added mask row is zero, and RMSNorm of
        # a (near-)zero input has huge, badly scaled gradients. The base row is untouched (the delta is the adapter's).
        embeddings = model.get_input_embeddings()
        layer = getattr(embeddings, "token_adapter", None)
        delta = getattr(layer, "trainable_tokens_delta", {}).get(adapter_name) if layer is not None else None
        if delta is not None:
            with torch.no_grad():
                base = layer.base_layer.weight
                mask_id = model.config.mask_token_id
                delta.copy_((base.mean(0) - base[mask_id]).to(delta.dtype).expand_as(delta))
    return peft_model


__all__ = [
    "TARGETS",
    "DrafterCollator",
    "DrafterOutput",
    "JointCollator",
    "RecordDataset",
    "add_drafter_adapter",
    "distill_sequences",
    "draft_block_mask_function",
    "drafter_loss",
    "evaluate_model",
    "load_records",
    "save_records",
    "stdlib_files",
    "stdlib_prompts",
    "text_windows",
    "unwrap_model",
]
