# Copyright 2026 The nemotron-diffusion authors. Licensed under the Apache License, Version 2.0.
"""`NemotronDiffusionGenerationConfig`: a `GenerationConfig` with the fields of the tri-mode decoding loops."""

import copy

from transformers import GenerationConfig

DECODE_MODES = ("ar", "diffusion", "linear_spec", "quadratic_spec")
# Modes whose bidirectional (mask) forwards a drafter adapter may serve.
DRAFTING_MODES = ("diffusion", "linear_spec", "quadratic_spec")
# Diffusion: which masked slots a denoising step commits besides those at or above the confidence threshold.
COMMIT_ORDERS = ("most_confident", "leftmost")

# The fields of this package and their defaults. `block_size` and `confidence_threshold` default per mode.
GENERATION_FIELDS = {
    "decode_mode": "ar",
    "block_size": None,
    "confidence_threshold": None,
    "causal_context": True,
    "max_denoising_steps": None,
    "commit_order": "most_confident",
    "defer_adjacent_repeats": False,
    "fused_commit_forward": False,
    "max_thinking_tokens": None,
    "end_think_token_id": None,
    "drafter_adapter": None,
    "drafter_modes": ("linear_spec",),
    "tree_width": None,
    "tree_slots": 3,
}
PER_MODE_DEFAULTS = {
    "block_size": {"ar": 32, "diffusion": 32, "linear_spec": 32, "quadratic_spec": 16},
    "confidence_threshold": {"ar": None, "diffusion": 0.9, "linear_spec": None, "quadratic_spec": None},
}


def mode_field(name, overrides, *configs):
    """The value of mode field `name` for one call: from `overrides` (the `generate()` keyword arguments), else the
    first of `configs` (generation configs, `None` skipped) that has it set, else its default; `_UNSET` for a
    field whose default follows the mode."""
    if name in overrides:
        return overrides[name]
    for config in configs:
        if config is not None and name in vars(config):
            return vars(config)[name]
    return _UNSET if name in PER_MODE_DEFAULTS else GENERATION_FIELDS[name]


_UNSET = object()


class NemotronDiffusionGenerationConfig(GenerationConfig):
    r"""
    A [`GenerationConfig`] with the fields of the tri-mode decoding loops (on top of every field of the base class).

    Args:
        decode_mode (`str`, *optional*, defaults to `"ar"`):
            Which decoding loop `generate()` runs: `"ar"`, `"diffusion"`, `"linear_spec"` or `"quadratic_spec"`.
        block_size (`int`, *optional*):
            Tokens per diffusion block / speculative draft (>= 1; >= 2 in the spec modes). Default 32, 16 for
            `"quadratic_spec"` (its forward carries B*(B+1) query tokens).
        confidence_threshold (`float` or `None`, *optional*):
            Diffusion: every masked slot whose confidence reaches it is committed per step, plus the most confident
            one; `None` commits one slot per step. LinearSpec: `None` drafts a block in one forward, a value drafts
            in several. Default 0.9 in diffusion, `None` in the spec modes. `None` is a value: it is not "unset".
        causal_context (`bool`, *optional*, defaults to `True`):
            Diffusion: seed each block with the AR token of the causal prefix (NVIDIA's default), or encode the prompt
            and commit blocks bidirectionally (`False`).
        max_denoising_steps (`int`, *optional*):
            Diffusion: at most this many denoising forwards per block; the last one commits every remaining slot.
        commit_order (`str`, *optional*, defaults to `"most_confident"`):
            Diffusion: the slot a denoising step commits besides those whose confidence reaches the threshold (so
            that every step commits at least one): the most confident masked slot (`"most_confident"`, NVIDIA's
            rule) or the leftmost masked slot (`"leftmost"`, which keeps the committed prefix growing); without a
            threshold, the schedule's count of slots in that order. The demo drafter's settings choose `"leftmost"`
            (docs/reference-model.md §7.3).
        defer_adjacent_repeats (`bool`, *optional*, defaults to `False`):
            Diffusion: a masked slot whose candidate equals the candidate of its left neighbour, itself still masked
            when the step began, is not committed in that step but decided again in the next, after the neighbour.
            Slots committed in one step never see each other, and two neighbours that both take the same word
            ("the the") are the commonest flaw of parallel commits. NVIDIA's rule has no such check (`False`); the
            demo drafter's settings turn it on (docs/reference-model.md §7.3).
        fused_commit_forward (`bool`, *optional*, defaults to `False`):
            Diffusion: the causal forward that writes a finished block to the cache also carries the next block's
            masks (they see the cache, the block and each other, and, with a drafter serving diffusion, run with it
            at those masks only), and their logits are the next block's first denoising step: one forward fewer per
            block. Slot 0 of that step was a mask, not the seed, so it commits only the slots that reach the
            threshold; it does not count against `max_denoising_steps`. Needs `causal_context=True` and a
            `confidence_threshold`. NVIDIA's loop has no such step (`False`), and the demo drafter's settings leave
            it off: on held-out prompts it gave more tokens per forward but no speed and less coherent text
            (docs/reference-model.md §7.3).
        max_thinking_tokens (`int`, *optional*), end_think_token_id (`int`, *optional*):
            Thinking budget: generated token number `max_thinking_tokens + 1` is `end_think_token_id` unless that
            token appeared before (the same rule in every mode).
        drafter_adapter (`str`, `False` or `None`, *optional*):
            Name of the PEFT adapter that drafts: the only adapter `generate()` switches (on in the forwards of
            `drafter_modes` it serves, off in every other forward); every other adapter keeps the state the user
            set. `False`: no adapter drafts, every adapter keeps the user's state in every forward (a task LoRA).
            `None` (default): every attached adapter is the drafter (NVIDIA's `linear_spec_lora` attached alone).
        drafter_modes (`tuple[str]`, *optional*, defaults to `("linear_spec",)`):
            The modes whose bidirectional forwards the drafter serves: LinearSpec's draft forwards, diffusion's
            denoising forwards, QuadraticSpec's mask slots (its verify slots keep the base computation, so it stays
            lossless). Every causal forward runs without the drafter. NVIDIA's checkpoints keep the default (their
            base model was trained for diffusion); the SmolLM2 demo serves all three.
        tree_width (`int` or `None`, *optional*):
            LinearSpec, greedy: verify a tree instead of the chain of drafts: at each of the first `tree_slots` draft
            slots the drafter's `tree_width - 1` runner-up tokens, each followed by the next slot's draft, in the
            same verify forward (tree attention; every node is an exact causal query of its path, so the output is
            still AR's). `None` or 1: the chain. Sampling (`do_sample=True`) verifies the chain.
        tree_slots (`int`, *optional*, defaults to 3):
            How many leading draft slots branch when `tree_width` > 1 (the verify forward carries
            B + tree_slots * (tree_width - 1) * 2 tokens, about).

    A field that is not set anywhere is absent from the instance (not `None`, since `None` is a meaningful value of
    several fields): `generate()` reads each field from its keyword argument, else the `generation_config` passed to
    it, else the model's generation config, else the default above (`resolved`). `save_pretrained` writes every
    field whose default does not depend on the mode, so a saved `generation_config.json` lists them.
    """

    def __init__(self, **kwargs):
        mode_fields = {name: kwargs.pop(name) for name in GENERATION_FIELDS if name in kwargs}
        if kwargs.get("_from_model_config"):
            # Built from a model's config.json (which has a `block_size` of its own, the training block): like the
            # base class, take no extra field from it.
            mode_fields = {}
        super().__init__(**kwargs)
        for name, value in mode_fields.items():
            setattr(self, name, list(value) if name == "drafter_modes" and isinstance(value, tuple) else value)
        self.validate_mode_fields()  # the base class validated before these were set

    @classmethod
    def resolved(cls, base: GenerationConfig, overrides: dict, *fallbacks: GenerationConfig):
        """A new config: `base`'s fields (a prepared `GenerationConfig` of any class) with every mode field set,
        from `overrides` (the `generate()` keyword arguments), else the first of `fallbacks` that has it, else the
        default of the chosen mode. Validates the mode fields; nothing passed in is modified."""
        fields = copy.deepcopy(base.to_dict())
        for name in GENERATION_FIELDS:
            fields.pop(name, None)
        config = cls.from_dict(fields)
        for name in GENERATION_FIELDS:
            value = mode_field(name, overrides, *fallbacks)
            if value is not _UNSET:  # per-mode defaults are set below, once the mode is known
                setattr(config, name, value)
        config.validate_mode_fields()  # a bad decode_mode is named before its defaults are looked up
        for name, defaults in PER_MODE_DEFAULTS.items():
            if name not in vars(config):
                setattr(config, name, defaults[config.decode_mode])
        config.validate_mode_fields()
        return config

    def validate(self, *args, **kwargs):
        super().validate(*args, **kwargs)
        self.validate_mode_fields()

    def validate_mode_fields(self):
        """Checks the mode fields that are set, against each other; raises a `ValueError` naming the field, its value
        and what is allowed. (Checks against the model, e.g. token ids, are in `validate_for_model`.)"""
        mode = getattr(self, "decode_mode", "ar")
        if mode not in DECODE_MODES:
            raise ValueError(f"`decode_mode`={mode!r} is invalid; allowed: {DECODE_MODES}.")

        def bad(field, value, allowed):
            raise ValueError(f"`{field}`={value!r} is invalid for decode_mode={mode!r}; allowed: {allowed}.")

        if hasattr(self, "block_size") and self.block_size is not None:
            block_size = self.block_size
            if not _is_int(block_size) or block_size < 1:
                bad("block_size", block_size, "an int >= 1")
            if mode in ("linear_spec", "quadratic_spec") and block_size < 2:
                bad("block_size", block_size, "an int >= 2 (one seed slot plus at least one draft slot)")
        threshold = getattr(self, "confidence_threshold", None)
        if threshold is not None and (
            isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1
        ):
            bad("confidence_threshold", threshold, "a float in (0, 1], or None")
        if mode == "quadratic_spec" and threshold is not None:
            bad("confidence_threshold", threshold, "None (QuadraticSpec drafts the next block in the verify forward)")
        causal = getattr(self, "causal_context", True)
        if not isinstance(causal, bool):
            bad("causal_context", causal, "True or False")
        if mode != "diffusion" and causal is not True:
            bad("causal_context", causal, "True (only diffusion can encode without it)")
        steps = getattr(self, "max_denoising_steps", None)
        if steps is not None and (not _is_int(steps) or steps < 1):
            bad("max_denoising_steps", steps, "an int >= 1, or None")
        order = getattr(self, "commit_order", "most_confident")
        if order not in COMMIT_ORDERS:
            bad("commit_order", order, f"one of {COMMIT_ORDERS}")
        defer = getattr(self, "defer_adjacent_repeats", False)
        if not isinstance(defer, bool):
            bad("defer_adjacent_repeats", defer, "True or False")
        fused = getattr(self, "fused_commit_forward", False)
        if not isinstance(fused, bool):
            bad("fused_commit_forward", fused, "True or False")
        if mode == "diffusion" and fused and causal is not True:
            bad("fused_commit_forward", fused, "False when causal_context=False (its look-ahead step needs the seed)")
        if mode == "diffusion" and fused and "confidence_threshold" in vars(self) and threshold is None:
            bad("fused_commit_forward", fused, "False when confidence_threshold is None (its look-ahead step commits "
                "the slots that reach the threshold)")
        budget = getattr(self, "max_thinking_tokens", None)
        if budget is not None and (not _is_int(budget) or budget < 0):
            bad("max_thinking_tokens", budget, "an int >= 0, or None")
        adapter = getattr(self, "drafter_adapter", None)
        if adapter is not None and adapter is not False and not isinstance(adapter, str):
            bad("drafter_adapter", adapter, "an adapter name (str), False (no drafter) or None (every adapter)")
        width = getattr(self, "tree_width", None)
        if width is not None and (not _is_int(width) or width < 1):
            bad("tree_width", width, "an int >= 1, or None (a chain)")
        slots = getattr(self, "tree_slots", 3)
        if not _is_int(slots) or slots < 1:
            bad("tree_slots", slots, "an int >= 1")
        drafter_modes = getattr(self, "drafter_modes", ())
        if isinstance(drafter_modes, str) or not isinstance(drafter_modes, (list, tuple)) or any(
            m not in DRAFTING_MODES for m in drafter_modes
        ):
            bad("drafter_modes", drafter_modes, f"a list of modes from {DRAFTING_MODES}")

    def validate_for_model(self, model_config):
        """Checks of the (resolved) mode fields that need the model's config."""
        mode = self.decode_mode
        budget, end = self.max_thinking_tokens, self.end_think_token_id
        if budget is not None and (not _is_int(end) or not 0 <= end < model_config.vocab_size):
            raise ValueError(
                f"`end_think_token_id`={end!r} is invalid for decode_mode={mode!r}; allowed: a token id in "
                f"[0, {model_config.vocab_size}) when max_thinking_tokens is set."
            )
        width = getattr(self, "tree_width", None)
        if mode == "linear_spec" and width is not None and width >= model_config.vocab_size:
            raise ValueError(
                f"`tree_width`={width!r} is invalid for decode_mode={mode!r}; allowed: an int below the vocabulary "
                f"size ({model_config.vocab_size}), or None."
            )
        # (the mask id as `end_think_token_id` is refused in every mode by `validate_generation_settings`)

    def to_diff_dict(self):
        # Written by `save_pretrained`: the mode fields whose default is not per mode are listed explicitly, and the
        # file is authoritative (`_from_model_config` false, else transformers drops the extra fields on reload).
        fields = super().to_diff_dict()
        for name, default in GENERATION_FIELDS.items():
            if name not in PER_MODE_DEFAULTS:
                fields.setdefault(name, list(default) if isinstance(default, tuple) else default)
        fields["_from_model_config"] = False
        return fields

    def to_dict(self):
        fields = super().to_dict()
        if isinstance(fields.get("drafter_modes"), tuple):
            fields["drafter_modes"] = list(fields["drafter_modes"])
        return fields


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


__all__ = [
    "COMMIT_ORDERS", "DECODE_MODES", "DRAFTING_MODES", "GENERATION_FIELDS", "NemotronDiffusionGenerationConfig",
    "mode_field",
]
