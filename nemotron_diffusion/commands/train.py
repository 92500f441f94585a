"""`nemotron-diffusion train`: the joint-training recipe (full model) or a LoRA drafter (base frozen)."""

import json
import os
import time

from ..cli import UserError

HELP = "train a tri-mode model: joint AR + diffusion (full) or a LoRA drafter with the base frozen"

RUN_START = [time.time()]
DEFAULT_LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def add_arguments(parser):
    parser.add_argument("--model", "-m", default=None, help="tri-mode model folder (default: the SmolLM2 demo model)")
    parser.add_argument("--target", choices=("drafter", "full"), default="drafter",
                        help="drafter: PEFT LoRA trained with the diffusion objective only, base frozen (self-"
                             "speculation stays lossless w.r.t. the base); full: the whole model, joint objective")
    parser.add_argument("--output-dir", "-o", required=True, help="checkpoints, data cache, final model / adapter")
    parser.add_argument("--data", default="stdlib",
                        help="'stdlib' (the CPython standard-library sources, with a held-out split) or a JSONL file "
                             "of records {input_ids[, prompt_length]} or {text}")
    parser.add_argument("--extra-data", action="append", default=[],
                        help="more training records (JSONL, e.g. the distill-train-*.jsonl of an earlier run); repeatable")
    parser.add_argument("--init-adapter", default=None,
                        help="drafter: continue training this PEFT adapter folder instead of a new adapter")
    parser.add_argument("--eval-data", default=None, help="held-out JSONL (default: the held-out stdlib split)")
    parser.add_argument("--distill", type=int, default=2000,
                        help="drafter with --data stdlib: number of prompts whose greedy base continuations are the "
                             "training sequences (self-distillation; cached in the output folder)")
    parser.add_argument("--eval-sequences", type=int, default=48, help="held-out sequences for loss and acceptance")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="length of the self-distilled continuations")
    parser.add_argument("--max-prompt-tokens", type=int, default=192, help="self-distillation: longest prompt kept")
    parser.add_argument("--distill-batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per training sequence (cut / window size)")
    parser.add_argument("--block-size", type=int, default=16, help="diffusion / draft block size")
    parser.add_argument("--blocks-per-sequence", type=int, default=12, help="drafter: draft blocks per sequence")
    parser.add_argument("--layouts", default="linear",
                        help="drafter: comma-separated draft layouts trained together, each NAME[:BLOCK_SIZE]: linear "
                             "(LinearSpec drafts, diffusion's first step), denoise (diffusion's later steps: "
                             "blocks partly revealed) and/or quadratic (QuadraticSpec's mask rows)")
    parser.add_argument("--paradigm", choices=("block_diff", "bidirectional", "autoregressive"), default="block_diff",
                        help="full target: the objective (config.dlm_paradigm)")
    parser.add_argument("--ar-loss-weight", type=float, default=1.0, help="full target, block_diff: AR loss weight")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-alpha", type=int, default=None, help="default 2 * r")
    parser.add_argument("--lora-targets", default=DEFAULT_LORA_TARGETS, help="comma-separated module names")
    parser.add_argument("--no-mask-embedding", action="store_true",
                        help="drafter: keep the mask token's embedding frozen (default: trained within the adapter)")
    parser.add_argument("--hard-weight", type=float, default=0.0,
                        help="drafter: weight of the CE on the greedy token beside the KL to the base distribution")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-ratio", type=float, default=0.03)
    parser.add_argument("--max-steps", type=int, default=-1, help="optimizer steps (default: --epochs)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-hours", type=float, default=None, help="stop (and save) after this many hours")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds for the whole run: self-distillation gets at most 35%%, the step count is set "
                             "from a timed probe step to fill the rest (unless --max-steps), training stops in time "
                             "for the final evaluation and save")
    parser.add_argument("--eval-steps", type=int, default=None, help="default 200 (a quarter of the run under --time-budget)")
    parser.add_argument("--save-steps", type=int, default=None, help="default 200 (a quarter of the run under --time-budget)")
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --output-dir")
    parser.add_argument("--save-dtype", choices=("float32", "float16", "bfloat16"), default="float16",
                        help="drafter: dtype of the saved adapter weights")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--attn-implementation", default="sdpa", help="attention backend for training (default sdpa)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    parser.add_argument("--seed", type=int, default=0)


def _check(args):
    for name in ("distill", "eval_sequences", "max_new_tokens", "distill_batch_size", "seq_len", "block_size",
                 "blocks_per_sequence", "lora_r", "batch_size", "grad_accum", "eval_steps", "save_steps",
                 "logging_steps", "max_prompt_tokens"):
        value = getattr(args, name)
        if value is None:
            continue
        minimum = 2 if name in ("block_size", "seq_len") else 1
        if value < minimum:
            raise UserError(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")
    if not args.lr > 0:
        raise UserError(f"--lr must be > 0, got {args.lr}")
    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    if args.target == "drafter" and not targets:
        raise UserError("--lora-targets names no module")
    return targets


def _load_jsonl(path, tokenizer, seq_len):
    from ..training import load_records

    if not os.path.isfile(path):
        raise UserError(f"data file {path!r} does not exist")
    records = []
    for record in load_records(path):
        if "input_ids" in record:
            records.append({"input_ids": record["input_ids"][:seq_len], "prompt_length": record.get("prompt_length", 0)})
        elif "text" in record:
            ids = tokenizer(record["text"], add_special_tokens=False).input_ids
            records += [{"input_ids": ids[i : i + seq_len]} for i in range(0, max(len(ids) - 1, 1), seq_len)]
        else:
            raise UserError(f"{path}: each record needs 'input_ids' or 'text'")
    return records


def _stdlib_records(args, model, tokenizer, split, count):
    from ..training import distill_sequences, load_records, save_records, stdlib_files, stdlib_prompts, text_windows

    files = stdlib_files(split)
    if args.target == "full":
        windows = text_windows(tokenizer, files, args.seq_len, max_windows=count if split == "heldout" else None)
        return [{"input_ids": w} for w in windows]
    cache = os.path.join(args.output_dir, f"distill-{split}-{count}-{args.max_new_tokens}.jsonl")
    if os.path.exists(cache):
        return load_records(cache)
    prompts = stdlib_prompts(tokenizer, files, seed=args.seed + (split == "heldout"), limit=count,
                             max_prompt_tokens=args.max_prompt_tokens)
    print(f"self-distillation: {len(prompts)} {split} prompts, up to {args.max_new_tokens} greedy tokens each")
    deadline = None
    if args.time_budget is not None and split == "train":
        deadline = RUN_START[0] + 0.35 * args.time_budget
    records = distill_sequences(model, prompts, max_new_tokens=args.max_new_tokens,
                                batch_size=args.distill_batch_size, pad_token_id=model.config.pad_token_id or 0,
                                deadline=deadline)
    records = [{"input_ids": r["input_ids"][-args.seq_len:] if len(r["input_ids"]) > args.seq_len else r["input_ids"],
                "prompt_length": max(0, r["prompt_length"] - max(0, len(r["input_ids"]) - args.seq_len))}
               for r in records]
    save_records(records, cache + ".tmp")
    os.replace(cache + ".tmp", cache)
    return records


_FINAL_MARGIN = 30.0  # seconds kept for the final evaluation and save under --time-budget


def _steps_for_budget(args, model, collator, records, device):
    """Times three training micro-batches (forward + backward) and returns the step count that fills the time left.
    The fastest of the three is used: on a shared machine a spike of other load would otherwise shorten the run."""
    import torch

    from ..training import drafter_loss

    batch = collator([records[i % len(records)] for i in range(args.batch_size)])
    model.train()
    seconds = []
    for _ in range(3):
        start = time.time()
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=args.bf16):
            if args.target == "drafter":
                loss = drafter_loss(model, batch, args.block_size, layouts=_layouts(args)).loss
            else:
                loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        (loss / args.grad_accum).backward()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds.append(time.time() - start)
    model.zero_grad(set_to_none=True)
    left = RUN_START[0] + args.time_budget - _FINAL_MARGIN - time.time()
    fastest = min(seconds[1:])  # the first one includes warm-up
    per_step = fastest * args.grad_accum * 1.15 + 0.01  # optimizer, logging, periodic evaluation
    steps = max(1, int(left / per_step))
    print(f"--time-budget: {fastest:.3f} s per micro-batch, {left:.0f} s left -> {steps} steps")
    return steps


def _layouts(args):
    """--layouts "linear,quadratic:4" -> (("linear", block size), ("quadratic", 4))."""
    from ..training import DRAFT_LAYOUTS

    layouts = []
    for part in (p.strip() for p in args.layouts.split(",")):
        if not part:
            continue
        name, _, size = part.partition(":")
        if name not in DRAFT_LAYOUTS or (size and not size.isdigit()) or (size and int(size) < 2):
            raise UserError(f"--layouts {args.layouts!r} is invalid; allowed: comma-separated names from "
                            f"{DRAFT_LAYOUTS}, each optionally with ':BLOCK_SIZE' (>= 2)")
        layouts.append((name, int(size) if size else args.block_size))
    if not layouts:
        raise UserError(f"--layouts {args.layouts!r} names no layout; allowed: {DRAFT_LAYOUTS}")
    return tuple(layouts)


def _save_adapter(model, folder, dtype_name, metrics, args, tokens_seen):
    import torch
    from safetensors.torch import load_file, save_file

    model.save_pretrained(folder)
    weights = os.path.join(folder, "adapter_model.safetensors")
    if dtype_name != "float32" and os.path.exists(weights):
        dtype = getattr(torch, dtype_name)
        state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in load_file(weights).items()}
        save_file(state, weights, metadata={"format": "pt"})
    with open(os.path.join(folder, "training_metrics.json"), "w") as f:
        json.dump({"metrics": metrics, "tokens_seen": tokens_seen, "args": vars(args)}, f, indent=2, default=str)


def run(args):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    import nemotron_diffusion  # noqa: F401  (registers the model type)

    from ..training import DrafterCollator, JointCollator, RecordDataset, TriModeTrainer, add_drafter_adapter

    targets = _check(args)
    _layouts(args)
    RUN_START[0] = time.time()
    if args.time_budget is not None and not args.time_budget > 0:
        raise UserError(f"--time-budget must be > 0 seconds, got {args.time_budget}")
    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.model
    if path is None:
        from ..demo import demo_path

        try:
            path = demo_path()
        except FileNotFoundError as error:
            raise UserError(str(error)) from error
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"--model {path!r} is not a model folder (no config.json there)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    os.makedirs(args.output_dir, exist_ok=True)
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation=args.attn_implementation).to(device)
    if args.target == "full":
        model.config.dlm_paradigm = args.paradigm
        model.config.block_size = args.block_size
        model.config.ar_loss_weight = args.ar_loss_weight

    # ---- data
    t0 = time.time()
    model.eval()
    if args.eval_data:
        eval_records = _load_jsonl(args.eval_data, tokenizer, args.seq_len)[: args.eval_sequences]
    else:
        eval_records = _stdlib_records(args, model, tokenizer, "heldout", args.eval_sequences)
    if args.data == "stdlib":
        train_records = _stdlib_records(args, model, tokenizer, "train", args.distill)
    else:
        train_records = _load_jsonl(args.data, tokenizer, args.seq_len)
    for path in args.extra_data:
        train_records += _load_jsonl(path, tokenizer, args.seq_len)
    if not train_records:
        raise UserError("no training sequences")
    print(f"data: {len(train_records)} training / {len(eval_records)} held-out sequences ({time.time() - t0:.0f} s)")

    # ---- model and collator
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    if args.target == "drafter":
        if args.init_adapter:
            from peft import PeftModel

            if not os.path.isfile(os.path.join(args.init_adapter, "adapter_config.json")):
                raise UserError(f"--init-adapter {args.init_adapter!r} is not a PEFT adapter folder")
            model = PeftModel.from_pretrained(model, args.init_adapter, is_trainable=True)
        else:
            model = add_drafter_adapter(model, r=args.lora_r, alpha=args.lora_alpha, target_modules=targets,
                                        train_mask_embedding=not args.no_mask_embedding)
        model.print_trainable_parameters()
        collator = DrafterCollator(pad, block_size=args.block_size, blocks_per_sequence=args.blocks_per_sequence,
                                   max_length=args.seq_len, seed=args.seed)
    else:
        collator = JointCollator(pad, max_length=args.seq_len, seed=args.seed)

    if args.time_budget is not None and args.max_steps < 0:
        args.max_steps = _steps_for_budget(args, model, collator, train_records, device)
        args.eval_steps = args.eval_steps or max(1, args.max_steps // 4)
        args.save_steps = args.save_steps or max(1, args.max_steps // 4)
    args.eval_steps = args.eval_steps or 200
    args.save_steps = args.save_steps or 200
    tokens_per_step = args.batch_size * args.grad_accum * (
        args.blocks_per_sequence * args.block_size if args.target == "drafter" else args.seq_len)
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=args.warmup_ratio,
        weight_decay=0.0,
        max_steps=args.max_steps,
        num_train_epochs=args.epochs,
        logging_steps=args.logging_steps,
        eval_strategy="steps",
        eval_steps=args.eval_steps,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=2,
        remove_unused_columns=False,
        report_to=[],
        dataloader_num_workers=0,
        bf16=args.bf16,
        use_cpu=device == "cpu",
        seed=args.seed,
        disable_tqdm=False,
    )

    class _Deadline(TrainerCallback):
        def on_step_end(self, _args, state, control, **kwargs):
            late = args.time_budget is not None and time.time() > RUN_START[0] + args.time_budget - _FINAL_MARGIN
            if late or (args.max_hours is not None and time.time() - started > args.max_hours * 3600):
                control.should_training_stop = True
                control.should_save = True
            return control

    trainer = TriModeTrainer(
        model=model,
        args=training_args,
        train_dataset=RecordDataset(train_records),
        eval_dataset=RecordDataset(eval_records),
        data_collator=collator,
        target=args.target,
        block_size=args.block_size,
        hard_weight=args.hard_weight,
        layouts=_layouts(args),
        callbacks=[_Deadline()],
    )
    last = get_last_checkpoint(args.output_dir) if args.resume and os.path.isdir(args.output_dir) else None
    if args.resume and last is None:
        print("--resume: no checkpoint in the output folder yet, starting from scratch")
    before = trainer.evaluate() if last is None else None
    started = time.time()
    trainer.train(resume_from_checkpoint=last)
    after = trainer.evaluate()
    tokens_seen = int(trainer.state.global_step * tokens_per_step)
    metrics = {"before": before, "after": after, "steps": trainer.state.global_step,
               "train_seconds": time.time() - started}
    final = os.path.join(args.output_dir, "final")
    if args.target == "drafter":
        _save_adapter(model, final, args.save_dtype, metrics, args, tokens_seen)
    else:
        model.save_pretrained(final)
        tokenizer.save_pretrained(final)
    print(json.dumps({"final": final, "tokens_seen": tokens_seen, **metrics}, indent=2, default=str))
    return 0
