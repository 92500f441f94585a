# Copyright 2026 The nemotron-diffusion authors. Licensed under the Apache License, Version 2.0.
"""KV-cache operations the tri-mode loops need beyond transformers' `Cache` API, for dynamic and static caches.

* read-only forwards (drafting, denoising) that see `[prefix | block]` but leave the cache as it was;
* rolling back the last entries (rejected verify tokens), keeping chosen entries of a forward (QuadraticSpec);
* selecting batch rows and left-compacting each row's real slots (rows of a batch keep different numbers of tokens).

A static layer (`StaticLayer`, fixed buffers for `torch.compile`/CUDA graphs) holds `max_cache_len` slots and a
`cumulative_length` counter: rolling back is moving the counter; slots past it are stale and always masked out.
"""

import torch


def is_static_cache(cache) -> bool:
    return any(getattr(layer, "is_compileable", False) for layer in cache.layers)


def _check_supported(cache):
    for layer in cache.layers:
        if getattr(layer, "is_sliding", False):
            raise ValueError(
                f"{type(cache).__name__} has a sliding-window layer ({type(layer).__name__}); the tri-mode loops need "
                "full-attention layers (a DynamicCache or a StaticCache)."
            )


def rewind_cache(cache, tokens: int) -> None:
    """Forget the last `tokens` entries of every layer."""
    if tokens <= 0:
        return
    for layer in cache.layers:
        if not layer.is_initialized:
            continue
        if getattr(layer, "is_compileable", False):
            # StaticLayer has no `crop` in transformers 5.23; its length is the counter.
            layer.cumulative_length.sub_(tokens)
        else:
            layer.crop(-tokens)


class ReadOnlyCache:
    """A view of a dynamic cache that attention layers can read but not write.

    `update` returns the cached keys/values concatenated with the current chunk's and stores nothing, so a drafting
    or denoising forward sees `[prefix | block]` while the cache is left exactly as it was. Everything else (mask
    sizes, sequence length, ...) is delegated, so masks and positions behave as if the block had been appended.
    (Static caches are written and rolled back instead: see `NemotronDiffusionModel.forward`.)
    """

    def __init__(self, cache):
        _check_supported(cache)
        self.cache = cache

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        layer = self.cache.layers[layer_idx]
        if not layer.is_initialized or layer.keys.numel() == 0:
            return key_states, value_states
        return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)

    def __getattr__(self, name):
        return getattr(self.cache, name)


def keep_chunk_entries(cache, chunk_length: int, keep: torch.Tensor) -> None:
    """After a forward appended `chunk_length` entries, keep only chunk entries `keep` (in that order) and forget
    the others: `keep` [K] for every row, or [batch, K] per row. QuadraticSpec keeps the exact causal K/V of its
    accepted draft tokens this way, LinearSpec's verify tree those of each row's accepted path. A static layer's
    chunk start stays a tensor (no host sync)."""
    k = keep.shape[-1]
    for layer in cache.layers:
        if not layer.is_initialized:
            continue
        static = getattr(layer, "is_compileable", False)
        start = (layer.cumulative_length if static else layer.keys.shape[2]) - chunk_length
        rows_keep = keep if keep.dim() == 2 else keep.expand(layer.keys.shape[0], -1)
        kept = []
        for states in (layer.keys, layer.values):
            index = (start + rows_keep)[:, None, :, None].expand(-1, states.shape[1], -1, states.shape[-1])
            kept.append(states.gather(2, index))
        if static:
            target = (start + torch.arange(k, device=keep.device))[None, None, :, None]
            for states, values in zip((layer.keys, layer.values), kept):
                states.scatter_(2, target.expand(values.shape), values)
            layer.cumulative_length.sub_(chunk_length - k)
        else:
            layer.keys = torch.cat([layer.keys[:, :, :start], kept[0]], dim=2)
            layer.values = torch.cat([layer.values[:, :, :start], kept[1]], dim=2)


def select_cache_rows(cache, index: torch.Tensor) -> None:
    """Keep batch rows `index` of every layer."""
    for layer in cache.layers:
        if not layer.is_initialized:
            continue
        if getattr(layer, "is_compileable", False):
            layer.keys = layer.keys.index_select(0, index)
            layer.values = layer.values.index_select(0, index)
            layer.batch_size = index.numel()
            if not torch.compiler.is_compiling():
                torch._dynamo.mark_static_address(layer.keys)
                torch._dynamo.mark_static_address(layer.values)
        elif layer.keys.numel():
            layer.keys = layer.keys[index]
            layer.values = layer.values[index]


def compact_cache_rows(cache, order: torch.Tensor) -> None:
    """Rearrange every row's slots: row b keeps its slots `order[b]` [B, S'] in that order, at slots 0..S'-1."""
    new_length = order.shape[1]
    for layer in cache.layers:
        if not layer.is_initialized:
            continue
        heads, dim = layer.keys.shape[1], layer.keys.shape[-1]
        index = order[:, None, :, None].expand(-1, heads, -1, dim)
        keys = layer.keys.gather(2, index)
        values = layer.values.gather(2, index.expand(-1, -1, -1, layer.values.shape[-1]))
        if getattr(layer, "is_compileable", False):
            layer.keys[:, :, :new_length] = keys
            layer.values[:, :, :new_length] = values
            layer.cumulative_length.fill_(new_length)
        else:
            layer.keys, layer.values = keys, values


__all__ = [
    "ReadOnlyCache",
    "compact_cache_rows",
    "is_static_cache",
    "keep_chunk_entries",
    "rewind_cache",
    "select_cache_rows",
]
