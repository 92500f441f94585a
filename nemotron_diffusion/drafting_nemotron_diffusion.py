# Copyright 2026 The nemotron-diffusion authors. Licensed under the Apache License, Version 2.0.
"""The drafter switch: which PEFT adapter serves which forward of a decoding loop.

A drafter adapter (a LoRA trained for the bidirectional draft forwards, like NVIDIA's `linear_spec_lora`) must be
on exactly in the forwards it serves and off in every other forward, so that the verifier is the base model and
self-speculation stays lossless. Every other adapter a user attached keeps the state the user set.

`adapters_for_drafting(model, adapter_name)` yields `set_drafting(bool)` for one `generate()` call and restores
each PEFT layer on exit. It flips flags on shared modules, so generation on one model is serialised
(`NemotronDiffusionGenerationMixin.generate` holds the model's generation lock).
"""

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .int8_nemotron_diffusion import int8_linear, int8_supported, int8_weight
from .packed_nemotron_diffusion import (
    PackedWeight,
    can_use_packed,
    few_row_linear,
    few_row_product_applies,
    kept_packed_weight,
    packed_linear,
)

@contextlib.contextmanager
def adapters_for_drafting(model, adapter_name, bypass=False):
    """Yields `set_drafting(drafting, only_at=None)` for the forwards of one decoding loop.

    * `adapter_name=None`: every attached adapter is the drafter: all PEFT layers are on while drafting and off
      in every other forward.
    * `adapter_name=False`: there is no drafter: every adapter keeps the user's state in every forward.
    * `adapter_name="name"`: only that adapter is switched (on while drafting, off otherwise); every other adapter
      keeps the state the user set (active or not, enabled or not) in every forward.
    * `only_at` (a [batch, query] bool tensor, drafting only): the drafter's LoRA contribution is applied at those
      query positions only, every other position computes with the user's adapter state alone. QuadraticSpec
      drafts this way at its mask slots while its verify slots stay the base model's computation (`can_gate`
      says whether the drafter's layers allow it: LoRA on linear layers, trainable tokens of the mask token).

    Each PEFT layer's state is restored on exit. Works whether or not the model is wrapped in a `PeftModel` (both
    keep the PEFT layers inside the model). A no-op for a model without adapters.

    `bypass=True` (decoding loops): a PEFT wrapper that computes its base module alone outside drafting is swapped
    out of its parent for that module while drafting is off (same result, without the wrappers' per-call Python
    work: about 8% of an AR step of the 135M demo with its drafter, on a CPU); while drafting, a trainable-tokens
    embedding of the drafter is computed sparsely (`DraftTokenEmbedding`), and a LoRA layer whose merged draft
    weights were kept (`enable_merged_drafter`) computes `F.linear` with them in forwards that draft at every
    position. The wrappers are put back on exit."""
    layers = peft_layers(model)
    if adapter_name is False:
        yield _NoAdapters()
        return
    if not layers:
        if adapter_name is not None:
            raise ValueError(f"drafter_adapter={adapter_name!r} is set, but the model has no PEFT adapter attached.")
        yield _NoAdapters()
        return
    if any(getattr(layer, "merged", False) for layer in layers):
        raise ValueError(
            "A PEFT adapter is merged into the base weights, so causal (AR and verify) forwards cannot run with base "
            "weights. Call `unmerge_adapter()` before generating."
        )
    if adapter_name is not None:
        known = set()
        for layer in layers:
            known.update(_adapter_names(layer))
        if adapter_name not in known:
            raise ValueError(
                f"drafter_adapter={adapter_name!r} is not an adapter of this model; found {sorted(known)}."
            )
    saved = {layer: (layer._disable_adapters, layer._active_adapter) for layer in layers}
    states = {layer: _layer_states(layer, *saved[layer], adapter_name) for layer in layers}
    swaps, inner_layers = [], {}
    for parent, name, wrapper, base in wrapper_swaps(model) if bypass else []:
        inner = inner_layers[wrapper] = {m for m in wrapper.modules() if m in states}
        if all(states[m][0][0] for m in inner):  # every PEFT layer in it is off outside drafting: base alone
            token_layer = getattr(wrapper, "token_adapter", None)
            drafting = states[token_layer][1] if token_layer in states else (True, None)
            drafting_module = None if drafting[0] else DraftTokenEmbedding.for_wrapper(wrapper, base, drafting[1])
            gated_module = None
            if drafting_module is None and wrapper in states and not states[wrapper][1][0]:
                drafting_module = MergedDraftLinear.for_wrapper(wrapper, base, states[wrapper][1][1])
                gated_module = GatedDraftLoRALinear.for_wrapper(wrapper, base, states[wrapper][1][1])
            swaps.append((parent, name, wrapper, base, drafting_module or wrapper, gated_module))
    # The decoding loops apply the LM head with the drafter off: only the backbone's layers need gating.
    backbone = set(getattr(model, "encoder", model).modules())
    switch = _DraftingSwitch(states, swaps, backbone, inner_layers)
    try:
        switch(False)
        yield switch
    finally:
        switch.remove_gates()
        for parent, name, wrapper, *_ in swaps:
            parent._modules[name] = wrapper
        for layer, (disabled, active) in saved.items():
            layer._disable_adapters = disabled
            layer._active_adapter = active


def peft_layers(model):
    """The PEFT layers of `model` (modules with PEFT's adapter switches)."""
    return [m for m in model.modules() if hasattr(m, "_disable_adapters") and hasattr(m, "_active_adapter")]


class _NoAdapters:
    can_gate = True

    def __call__(self, drafting, only_at=None):
        pass


def _adapter_names(layer):
    names = set()
    for attribute in ("lora_A", "lora_embedding_A", "token_indices", "trainable_tokens_delta", "modules_to_save"):
        names.update(getattr(layer, attribute, None) or {})
    return names


def _as_list(active):
    return [active] if isinstance(active, str) else list(active)


def _layer_states(layer, disabled, active, adapter_name):
    """((disabled, active) outside drafting, (disabled, active) while drafting) of one PEFT layer."""
    if adapter_name is None:
        return (True, active), (False, active)
    user_active = [] if disabled else [n for n in _as_list(active) if n != adapter_name]
    off = (not user_active, user_active or _as_list(active))
    if adapter_name not in _adapter_names(layer):
        return off, off
    return off, (False, user_active + [adapter_name])


class _DraftingSwitch:
    """`set_drafting(drafting, only_at=None)` of `adapters_for_drafting` (see there)."""

    def __init__(self, states, swaps, backbone, inner_layers):
        self.states, self.swaps = states, swaps
        self.gates = []
        # Trainable-tokens layers computed sparsely while drafting: those embeddings can be limited to positions.
        self.sparse_token_layers = {
            getattr(wrapper, "token_adapter", None)
            for _, _, wrapper, _, drafting_module, _ in swaps
            if isinstance(drafting_module, DraftTokenEmbedding)
        }
        # LoRA layers whose gated drafting runs in our own module (no PEFT call, no hook).
        self.gated_layers = {wrapper for _, _, wrapper, _, _, gated in swaps if gated is not None}
        # The PEFT layers whose flags matter in each kind of forward: a layer inside a wrapper that is out of the
        # call path (replaced by its base or by one of our modules) is never called, so its flags are left alone
        # (setting ~200 module attributes twice a cycle costs a few ms on a CPU).
        covered = {"off": set(), "full": set(), "gated": set()}
        for _, _, wrapper, _, full_module, gated_module in swaps:
            inner = inner_layers[wrapper]  # the PEFT layers inside the wrapper
            gated_in_use = full_module if isinstance(full_module, DraftTokenEmbedding) else gated_module
            covered["off"] |= inner
            covered["full"] |= inner if full_module is not wrapper else set()
            covered["gated"] |= inner if gated_in_use not in (None, wrapper) else set()
        self.flag_layers = {kind: [m for m in states if m not in layers] for kind, layers in covered.items()}
        self.can_gate = all(self._gateable(layer) for layer in states if layer in backbone)

    def _drafter_names(self, layer):
        drafting = self.states[layer][1]
        off = self.states[layer][0]
        if drafting[0]:
            return []
        on = set(_as_list(drafting[1])) - (set() if off[0] else set(_as_list(off[1])))
        return sorted(on)

    def _gateable(self, layer):
        names = self._drafter_names(layer)
        if not names:
            return True
        lora_a = getattr(layer, "lora_A", None)
        if lora_a is not None and all(n in lora_a for n in names):
            return not any(getattr(layer, "use_dora", {}).get(n, False) for n in names)
        return layer in self.sparse_token_layers

    def __call__(self, drafting, only_at=None):
        self.remove_gates()
        gating = drafting and only_at is not None
        for layer in self.flag_layers["gated" if gating else "full" if drafting else "off"]:
            off, on = self.states[layer]
            layer._disable_adapters, layer._active_adapter = on if drafting else off
        if gating and not self.can_gate:
            raise ValueError("the drafter adapter has layers whose contribution cannot be limited to positions")
        gate = only_at[..., None] if gating else None
        gates = {}  # one gate tensor per dtype for all GatedDraftLoRALinear modules of this forward
        for parent, name, wrapper, base, drafting_module, gated_module in self.swaps:
            if gating and not isinstance(drafting_module, DraftTokenEmbedding):
                # Merged weights cannot be limited to positions: the LoRA terms with their gate.
                drafting_module = wrapper if gated_module is None else gated_module
            if isinstance(drafting_module, DraftTokenEmbedding):
                drafting_module.only_at = only_at if drafting else None
            elif isinstance(drafting_module, GatedDraftLoRALinear):
                dtype = drafting_module.low_rank_dtype
                if gating and dtype not in gates:
                    gates[dtype] = gate.to(dtype)
                drafting_module.gate = gates[dtype] if gating else None
            parent._modules[name] = drafting_module if drafting else base
        if gating:
            for layer in self.states:
                if layer in self.gated_layers:
                    continue
                for n in self._drafter_names(layer):
                    if n in getattr(layer, "lora_A", {}):
                        self.gates.append(layer.lora_A[n].register_forward_hook(_gate_hook(gate)))

    def remove_gates(self):
        for handle in self.gates:
            handle.remove()
        self.gates = []


def _gate_hook(gate):
    def hook(module, args, output):
        # lora_B is linear without bias: zeroing its input at a position removes the LoRA term there.
        return output * gate.to(output.dtype)

    return hook


def wrapper_swaps(model):
    """[(parent, name, wrapper, base)] for each outermost PEFT wrapper (LoRA layer, trainable-tokens or
    modules-to-save wrapper) and the module it computes with its adapters disabled. Wrappers holding an accelerate
    hook (device_map offload) stay in place."""
    swaps = []

    def visit(parent):
        for name, child in parent._modules.items():
            if child is None:
                continue
            if not hasattr(child, "_disable_adapters"):
                visit(child)
                continue
            base = peft_base_module(child)
            if base is not child and not hasattr(child, "_hf_hook"):
                swaps.append((parent, name, child, base))

    visit(model)
    return swaps


def peft_base_module(module):
    """The module a PEFT wrapper (LoRA layer, trainable tokens, modules to save) computes with its adapters off."""
    while isinstance(inner := getattr(module, "base_layer", getattr(module, "original_module", None)), nn.Module):
        module = inner
    return module


class DraftTokenEmbedding(nn.Module):
    """What a PEFT trainable-tokens embedding computes with its adapter on, without what PEFT does on every call:
    rebuild the whole [vocab, hidden] matrix to change a few rows (for a drafter, the mask token's). The base rows,
    with the adapter's rows put in where the input holds one of its tokens."""

    def __init__(self, embedding: nn.Embedding, token_ids: torch.Tensor, rows: torch.Tensor):
        super().__init__()
        self.embedding = embedding
        self.token_ids = token_ids  # [n]
        self.rows = rows  # [n, hidden]
        self.only_at = None  # [batch, query] bool: where the adapter's rows apply (None: everywhere)

    @classmethod
    def for_wrapper(cls, wrapper, base, drafting_names):
        """The sparse module for a trainable-tokens wrapper around a plain `nn.Embedding` whose drafting adapters
        (`drafting_names`: the layer's active adapters while drafting) train tokens, else None (the wrapper itself
        then serves draft forwards)."""
        layer = getattr(wrapper, "token_adapter", None)
        if layer is None or type(base) is not nn.Embedding or getattr(layer, "merged", False) or not drafting_names:
            return None
        names = [n for n in _as_list(drafting_names) if n in layer.token_indices]
        if not names:
            return None
        token_ids = torch.tensor([t for n in names for t in layer.token_indices[n]], device=base.weight.device)
        rows = torch.cat([layer.trainable_tokens_delta[n].detach() for n in names]).to(base.weight)
        return cls(base, token_ids, rows)

    def forward(self, input_ids):
        embeddings = self.embedding(input_ids)
        hits = input_ids[..., None] == self.token_ids  # [..., n]
        trained = self.rows[hits.int().argmax(dim=-1)]
        use = hits.any(dim=-1, keepdim=True)
        if self.only_at is not None:
            use = use & self.only_at[..., None]
        return torch.where(use, trained, embeddings)


class GatedDraftLoRALinear(nn.Module):
    """A LoRA layer's drafting computation limited to positions, without PEFT's per-call work:
    `base(x) + B' ((A' x) * gate)`, where A' stacks the drafting adapters' A matrices and B' their B matrices
    times their scaling (one low-rank product for all of them), and `gate` is the drafting switch's
    [batch, query, 1] 0/1 tensor (1 where the adapter applies). A handful of tensor ops a layer instead of PEFT's
    module calls per adapter and a forward hook. The low-rank terms are computed in the adapter's dtype, as PEFT
    does (float32 for the demo's drafter: on a CPU a tiny bf16 matmul costs three times a float32 one). Where the
    gate is 0 the output is `base(x)` exactly."""

    def __init__(self, base: nn.Linear, terms, adapter_names=()):
        super().__init__()
        self.base = base
        self.terms = terms  # [(lora_A, lora_B, scaling)] of the drafting adapters
        self.adapter_names = tuple(adapter_names)
        self.low_rank_dtype = terms[0][0].weight.dtype  # the adapter's: the low-rank terms are computed in it
        self.gate = None  # [batch, query, 1] 0/1 in `low_rank_dtype`, or None: the adapter applies everywhere
        self._stacked = None  # (A' [sum of ranks, in], B' [out, sum of ranks] with the scalings folded in)

    @classmethod
    def for_wrapper(cls, wrapper, base, drafting_names):
        """The module for a plain LoRA wrapper around an `nn.Linear` (no DoRA or other variant, no dropout in
        effect) with drafting adapters `drafting_names`, else None (PEFT's layer with a gate hook serves it)."""
        if not hasattr(wrapper, "lora_A"):
            return None
        names = [n for n in _as_list(drafting_names) if n in wrapper.lora_A]
        if not names or not MergedDraftLinear.mergeable(wrapper, base, names):  # plain LoRA on a plain nn.Linear
            return None
        for n in names:
            dropout = wrapper.lora_dropout[n]
            if not isinstance(dropout, nn.Identity) and (dropout.training and getattr(dropout, "p", 0) > 0):
                return None
        terms = [(wrapper.lora_A[n], wrapper.lora_B[n], wrapper.scaling[n]) for n in names]
        # Kept on the wrapper (outside its submodules: not in any state dict) and reused while its parts are the
        # same; building 210 modules per generate() call cost ~30 ms on the demo.
        kept = wrapper.__dict__.get(GATED_MODULE_ATTRIBUTE)
        if kept is not None and kept.base is base and kept.terms == terms and kept.adapter_names == tuple(names):
            kept.reset()
            return kept
        module = cls(base, terms, names)
        wrapper.__dict__[GATED_MODULE_ATTRIBUTE] = module
        return module

    def reset(self):
        """For a new generate() call: no gate, stacks rebuilt from the adapter's current weights when first used."""
        self.gate, self._stacked = None, None

    def stacked(self):
        """(A', B'), stacked at the first gated forward of a generate() call (`reset` at each call, so they follow
        the adapter's current weights; calls that never gate never pay for them)."""
        if self._stacked is None:
            with torch.no_grad():
                lora_a = torch.cat([a.weight.to(self.low_rank_dtype) for a, _, _ in self.terms])
                lora_b = torch.cat([b.weight.to(self.low_rank_dtype) * scaling for _, b, scaling in self.terms], dim=1)
            self._stacked = (lora_a, lora_b)
        return self._stacked

    def forward(self, x):
        lora_a, lora_b = self.stacked()
        result = self.base(x)
        low_rank = F.linear(x.to(self.low_rank_dtype), lora_a)
        if self.gate is not None:
            low_rank = low_rank * self.gate  # a zero row removes the LoRA term at that position exactly
        return result.add_(F.linear(low_rank, lora_b))


# ---------------------------------------------------------------------------------------- merged draft weights
# The drafting modules built for a LoRA wrapper, kept in its __dict__ (not as submodules) for the next call.
GATED_MODULE_ATTRIBUTE = "_nemotron_diffusion_gated_module"
MERGED_MODULE_ATTRIBUTE = "_nemotron_diffusion_merged_module"
# Where merged draft weights are kept: on the LoRA layer itself, {"format": weight format, "weights": {adapter
# names: (freshness key, weight)}}.
MERGED_DRAFT_ATTRIBUTE = "_nemotron_diffusion_merged_draft"
# Formats of the kept weights: None (the base weight's dtype: a draft forward computes exactly what PEFT's LoRA
# computes, to rounding) or "int8" (int8, one scale per output channel; bfloat16 or float32 weights on a CPU).
MERGED_DRAFT_FORMATS = (None, "int8")


def enable_merged_drafter(model, adapter_name=None, weight_format=None):
    """Keeps, for every LoRA linear layer of the drafter, a merged copy of its weight W + ΔW (ΔW = PEFT's
    `get_delta_weight`, summed over the drafting adapters), on the base weight's device. Draft forwards that apply
    the drafter at every position (LinearSpec's drafts, diffusion's denoising) then cost a forward of the base
    model: `F.linear(x, W + ΔW)` instead of `W x + B(A x)` with PEFT's per-layer work (on the demo in bf16 on a CPU,
    a draft forward costs about 35% more than a base forward with PEFT's LoRA, the same with merged weights).
    Verification and AR steps keep the base weights (lossless), and QuadraticSpec's mask-only drafting keeps the
    LoRA path (a merged weight cannot be limited to positions).

    `weight_format`:

    * None: the merged weight in the base weight's dtype; a draft forward computes what PEFT's LoRA computes (to
      rounding). Memory: one more copy of each adapted weight (the 135M demo with LoRA on every linear: ~212 MB in
      bf16; an 8B model: most of its size).
    * "int8" (bfloat16 or float32 weights on a CPU): the merged weight quantized to int8 with one scale per output
      channel, computed by torch's weight-only int8 kernel for bf16 (`torch.ops.aten._weight_int8pack_mm`) and by
      FBGEMM's dynamic int8 product for float32 (`int8_nemotron_diffusion`). Half the memory of a bf16 copy (a
      quarter of a float32 one), and a cheaper draft forward where reading the weights is what a forward costs (a
      CPU at a few query tokens: on the demo, the linears of a 4-token draft forward take ~0.65x their bf16 time,
      ~0.4x their float32 time on an AVX2 CPU). Drafts
      differ slightly from the unquantized drafter's; the verifier is still the base model, so self-speculation
      stays lossless and only acceptance can change (measured in `docs/cpu-performance.md`). Diffusion's denoising
      forwards use it too. Kept weights are recomputed in the base dtype where the base weights have moved off the
      CPU or to another dtype.

    A copy is recomputed when the adapter's or the base's weights change (training, `.to()`);
    `disable_merged_drafter` frees them.

    `adapter_name`: the drafter (default: the model's `generation_config.drafter_adapter`; None there means every
    adapter). Only plain LoRA on `nn.Linear` with a floating-point weight is merged (no DoRA or other variant, no
    quantized base); other layers keep PEFT's computation. Returns the number of layers kept merged."""
    if weight_format not in MERGED_DRAFT_FORMATS:
        raise ValueError(f"weight_format={weight_format!r} is invalid; allowed: {list(MERGED_DRAFT_FORMATS)}")
    if adapter_name is None:
        adapter_name = getattr(getattr(model, "generation_config", None), "drafter_adapter", None)
    if isinstance(adapter_name, str):
        known = set()
        for module in model.modules():
            known.update(getattr(module, "lora_A", None) or {})
        if adapter_name not in known:
            raise ValueError(
                f"enable_merged_drafter: adapter_name={adapter_name!r} is not a LoRA adapter of this model; found "
                f"{sorted(known)}."
            )
    layers = []
    for module in model.modules():
        if not hasattr(module, "lora_A") or not hasattr(module, "get_delta_weight"):
            continue
        names = sorted(module.lora_A) if adapter_name in (None, False) else [adapter_name]
        names = [n for n in names if n in module.lora_A]
        base = peft_base_module(module)
        if names and MergedDraftLinear.mergeable(module, base, names):
            layers.append((module, base, names))
    if weight_format == "int8":
        found = sorted({f"{str(base.weight.dtype).replace('torch.', '')} on {base.weight.device}"
                        for _, base, _ in layers if not int8_supported(base.weight.device, base.weight.dtype)})
        if found:
            raise ValueError(f"weight_format='int8' is available for bfloat16 or float32 weights on a CPU only; the "
                             f"drafter's weights are {found}. Use weight_format=None there.")
    for module, base, names in layers:
        setattr(module, MERGED_DRAFT_ATTRIBUTE, {"format": weight_format, "weights": {}})
        MergedDraftLinear.merged_weight(module, base, names)
    return len(layers)


def disable_merged_drafter(model):
    """Frees the merged draft weights kept by `enable_merged_drafter`; draft forwards use PEFT's LoRA again."""
    for module in model.modules():
        if hasattr(module, MERGED_DRAFT_ATTRIBUTE):
            delattr(module, MERGED_DRAFT_ATTRIBUTE)
        module.__dict__.pop(MERGED_MODULE_ATTRIBUTE, None)


class MergedDraftLinear(nn.Module):
    """A LoRA layer's drafting computation with the adapter merged into a kept weight: `F.linear(x, W + ΔW, b)`,
    or its int8 form (`enable_merged_drafter(weight_format="int8")`). Where the base layer keeps a packed weight
    (`enable_packed_weights`), the merged weight is packed too; in float32 a few rows take `few_row_linear`."""

    def __init__(self, base: nn.Linear, weight):
        super().__init__()
        self.base = base
        self.weight = weight  # [out, in] in the base dtype, or `int8_weight`'s (int8 [out, in], scales [out], ...)
        self._packed = PackedWeight()

    @staticmethod
    def mergeable(wrapper, base, names):
        if type(base) is not nn.Linear or getattr(wrapper, "merged", False):
            return False
        weight = base.weight
        if type(weight.data) is not torch.Tensor or not weight.dtype.is_floating_point or weight.is_meta:
            return False  # a quantized or offloaded weight: PEFT computes it
        if any(getattr(wrapper, "use_dora", {}).get(n, False) for n in names):
            return False
        return not any(n in getattr(wrapper, "lora_variant", {}) for n in names)

    @staticmethod
    def _key(wrapper, base, names):
        parts = [base.weight.data_ptr(), base.weight._version, base.weight.dtype, base.weight.device]
        for n in names:
            for w in (wrapper.lora_A[n].weight, wrapper.lora_B[n].weight):
                parts += [w.data_ptr(), w._version, w.dtype, w.device]
            parts.append(wrapper.scaling[n])
        return tuple(parts)

    @classmethod
    def merged_weight(cls, wrapper, base, names):
        """The kept merged weight of `names` (computed now if missing or stale)."""
        kept = getattr(wrapper, MERGED_DRAFT_ATTRIBUTE)
        names = tuple(sorted(names))
        key = cls._key(wrapper, base, names)
        weights = kept["weights"]
        if names not in weights or weights[names][0] != key:
            with torch.no_grad():
                weight = base.weight.float()
                for n in names:
                    weight = weight + wrapper.get_delta_weight(n).float()
                weight = weight.to(base.weight.dtype)
            if kept["format"] == "int8" and int8_supported(weight.device, weight.dtype):
                weight = int8_weight(weight)
            weights[names] = (key, weight)
        return weights[names][1]

    @classmethod
    def for_wrapper(cls, wrapper, base, drafting_names):
        """The merged module of a LoRA wrapper that has merged draft weights kept for its drafting adapters
        (`drafting_names`), else None."""
        if not hasattr(wrapper, MERGED_DRAFT_ATTRIBUTE):
            return None
        names = [n for n in _as_list(drafting_names) if n in wrapper.lora_A]
        if not names or not cls.mergeable(wrapper, base, names):
            return None
        weight = cls.merged_weight(wrapper, base, names)
        kept = wrapper.__dict__.get(MERGED_MODULE_ATTRIBUTE)  # reused while it computes with the same kept weight
        if kept is None or kept.base is not base or kept.weight is not weight:
            kept = wrapper.__dict__[MERGED_MODULE_ATTRIBUTE] = cls(base, weight)
        return kept

    def forward(self, x):
        if isinstance(self.weight, torch.Tensor):
            if kept_packed_weight(self.base) is not None and can_use_packed(x, self.weight):
                return packed_linear(x, self.weight, self.base.bias, self._packed)
            if few_row_product_applies(x, self.weight):
                return few_row_linear(x, self.weight, self.base.bias)
            return F.linear(x, self.weight, self.base.bias)
        out = int8_linear(x, *self.weight)
        return out if self.base.bias is None else out + self.base.bias.to(out.dtype)


__all__ = [
    "DraftTokenEmbedding",
    "GatedDraftLoRALinear",
    "MERGED_DRAFT_FORMATS",
    "MergedDraftLinear",
    "adapters_for_drafting",
    "disable_merged_drafter",
    "enable_merged_drafter",
    "peft_base_module",
    "peft_layers",
    "wrapper_swaps",
]
