"""generate() with images in every decoding mode: images at the prefill only, greedy self-speculation equal to AR,
diffusion equal to a plain reference loop, padded batches with different numbers of images per row."""

import math

import pytest
import torch
from transformers.cache_utils import DynamicCache

from vlm_helpers import (
    IMAGE_BREAK,
    IMAGE_END,
    IMAGE_PAD,
    IMAGE_START,
    VLM_EOS_ID,
    VLM_MASK_ID,
    VLM_PAD_ID,
    image_prompt,
    random_pixels,
    tiny_vlm,
)


NEVER = [IMAGE_START, IMAGE_PAD, IMAGE_BREAK, IMAGE_END, VLM_MASK_ID]
MODES = ("ar", "diffusion", "linear_spec", "quadratic_spec")


def _excluded(logits):
    logits = logits.clone()
    logits[..., NEVER] = -math.inf
    return logits


def _reference_ar(model, ids, pixels, sizes, new_tokens):
    """Greedy AR without a cache: the whole sequence (images spliced) through the model for every token."""
    seq = ids.clone()
    for _ in range(new_tokens):
        logits = model(input_ids=seq, pixel_values=pixels, image_sizes=sizes).logits[:, -1]
        token = _excluded(logits).argmax(-1)
        seq = torch.cat([seq, token[:, None]], dim=1)
        if int(token) == VLM_EOS_ID:
            break
    return seq[0, ids.shape[1] :].tolist()


def _reference_diffusion(model, ids, pixels, sizes, new_tokens, block_size, threshold):
    """Block diffusion with the causal seed, written plainly (batch 1): causal prefill with the images; per block
    [seed, masks], bidirectional forwards over the read-only cache commit every masked slot whose confidence (raw
    softmax of its candidate) reaches the threshold plus the most confident one; a causal forward then writes the
    block and gives the next seed."""
    cache = DynamicCache(config=model.config)
    logits = model(input_ids=ids, pixel_values=pixels, image_sizes=sizes, cache=cache, use_cache=True).logits
    seed = int(_excluded(logits[0, -1]).argmax())
    out = []
    while len(out) < new_tokens:
        block = torch.full((1, block_size), VLM_MASK_ID)
        block[0, 0] = seed
        masked = torch.ones(block_size, dtype=torch.bool)
        masked[0] = False
        while masked.any():
            logits = model(input_ids=block, cache=cache, use_cache=True, is_causal=False, update_cache=False).logits[0]
            candidates = _excluded(logits).argmax(-1)
            confidence = torch.softmax(logits.float(), -1).gather(-1, candidates[:, None])[:, 0]
            confidence = torch.where(masked, confidence, -math.inf)
            commit = masked & (confidence >= threshold)
            commit[confidence.argmax()] = True
            block[0] = torch.where(commit, candidates, block[0])
            masked &= ~commit
        out += block[0].tolist()
        logits = model(input_ids=block, cache=cache, use_cache=True).logits
        seed = int(_excluded(logits[0, -1]).argmax())
    out = out[:new_tokens]
    return out[: out.index(VLM_EOS_ID) + 1] if VLM_EOS_ID in out else out


def _generate(model, ids, pixels, sizes, mode, new_tokens=10, **kwargs):
    kwargs.setdefault("do_sample", False)
    with torch.no_grad():
        out = model.generate(
            ids, pixel_values=pixels, image_sizes=sizes, max_new_tokens=new_tokens, decode_mode=mode, block_size=4,
            pad_token_id=VLM_PAD_ID, **kwargs,
        )
    return out[:, ids.shape[1] :]


def _strip(row):
    """A generated row up to its first EOS (padding after it removed)."""
    row = row.tolist()
    return row[: row.index(VLM_EOS_ID) + 1] if VLM_EOS_ID in row else row


@pytest.fixture(scope="module")
def model():
    return tiny_vlm(seed=1)


def test_ar_with_images_equals_a_reference_loop_without_cache(model):
    grids = [(2, 3), (1, 2)]
    pixels, sizes = random_pixels(grids)
    ids = torch.tensor([image_prompt(grids)])
    with torch.no_grad():
        expected = _reference_ar(model, ids, pixels, sizes, 10)
    assert _strip(_generate(model, ids, pixels, sizes, "ar")[0]) == expected
    # the images matter: other pixels give other tokens
    other, _ = random_pixels(grids, seed=5)
    assert _strip(_generate(model, ids, other, sizes, "ar")[0]) != expected


@pytest.mark.parametrize("mode", ["linear_spec", "quadratic_spec"])
def test_greedy_self_speculation_with_images_equals_ar(model, mode):
    grids = [(2, 2)]
    pixels, sizes = random_pixels(grids, seed=2)
    ids = torch.tensor([image_prompt(grids)])
    ar = _generate(model, ids, pixels, sizes, "ar", new_tokens=12)
    assert _generate(model, ids, pixels, sizes, "ar", new_tokens=12, use_cache=True).tolist() == ar.tolist()
    spec = _generate(model, ids, pixels, sizes, mode, new_tokens=12)
    assert spec.tolist() == ar.tolist()


def test_diffusion_with_images_equals_a_reference_loop(model):
    grids = [(1, 3), (2, 1)]
    pixels, sizes = random_pixels(grids, seed=3)
    ids = torch.tensor([image_prompt(grids)])
    with torch.no_grad():
        expected = _reference_diffusion(model, ids, pixels, sizes, 8, block_size=4, threshold=0.3)
    got = _generate(model, ids, pixels, sizes, "diffusion", new_tokens=8, confidence_threshold=0.3)
    assert _strip(got[0]) == expected


@pytest.mark.parametrize("mode", MODES)
def test_images_go_to_the_prefill_only(model, mode, monkeypatch):
    grids = [(1, 2)]
    pixels, sizes = random_pixels(grids)
    ids = torch.tensor([image_prompt(grids)])
    calls = []
    original = type(model.encoder).get_image_features

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(model.encoder), "get_image_features", counting)
    # (NVIDIA's config.json has `use_cache: false`, under which AR recomputes the whole sequence, images included,
    # at every step; the block modes always keep a cache.)
    out = _generate(model, ids, pixels, sizes, mode, new_tokens=9, use_cache=True)
    assert len(calls) == 1
    assert out.shape[1] == 9


@pytest.mark.parametrize("mode", MODES)
def test_never_generated_ids_are_never_generated(mode):
    """A model whose head favours the image markers and the mask: none of them comes out in any mode."""
    model = tiny_vlm(seed=2)
    with torch.no_grad():
        model.diffusion_head.weight[NEVER] *= 0
        model.diffusion_head.weight[NEVER] += model.encoder.norm.weight * 50  # large logits for every hidden state
    grids = [(1, 2)]
    pixels, sizes = random_pixels(grids)
    ids = torch.tensor([image_prompt(grids)])
    out = _generate(model, ids, pixels, sizes, mode, new_tokens=8)
    assert not any(t in NEVER for t in out[0].tolist())
    assert model.never_generated_token_ids() == sorted(NEVER)


def _padded_batch():
    """Three rows: two images, one image, no image; left padded."""
    grids_per_row = [[(2, 2), (1, 3)], [(3, 1)], []]
    prompts = [image_prompt(g) if g else [5, 6, 7, 8] for g in grids_per_row]
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), VLM_PAD_ID)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :] = torch.tensor(p)
        mask[b, width - len(p) :] = 1
    all_grids = [g for row in grids_per_row for g in row]
    pixels, sizes = random_pixels(all_grids, seed=4)
    per_row, start = [], 0
    for g in grids_per_row:
        per_row.append((pixels[start : start + len(g)], sizes[start : start + len(g)]) if g else (None, None))
        start += len(g)
    return ids, mask, pixels, sizes, prompts, per_row, grids_per_row


@pytest.mark.parametrize("mode", MODES)
def test_padded_batch_rows_equal_each_row_alone(model, mode):
    ids, mask, pixels, sizes, prompts, per_row, grids_per_row = _padded_batch()
    batch = _generate(model, ids, pixels, sizes, mode, attention_mask=mask)
    for b, prompt in enumerate(prompts):
        row_pixels, row_sizes = per_row[b]
        if row_pixels is not None:
            # a row's own images, cropped to their own largest size
            h, w = int(row_sizes[:, 0].max()), int(row_sizes[:, 1].max())
            row_pixels = row_pixels[:, :, :h, :w]
        alone = _generate(model, torch.tensor([prompt]), row_pixels, row_sizes, mode)
        assert _strip(batch[b]) == _strip(alone[0]), (mode, b)


@pytest.mark.parametrize("mode", ["linear_spec", "quadratic_spec"])
def test_padded_batch_self_speculation_equals_ar(model, mode):
    ids, mask, pixels, sizes, *_ = _padded_batch()
    ar = _generate(model, ids, pixels, sizes, "ar", attention_mask=mask, use_cache=True)
    spec = _generate(model, ids, pixels, sizes, mode, attention_mask=mask)
    assert [_strip(r) for r in spec] == [_strip(r) for r in ar]


def test_text_only_prompts_work_without_images(model):
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    ar = _generate(model, ids, None, None, "ar")
    for mode in ("linear_spec", "quadratic_spec"):
        assert _generate(model, ids, None, None, mode).tolist() == ar.tolist()


def test_num_return_sequences_repeats_each_rows_own_images(model):
    """Rows with 2, 1 and 0 images, each returned twice: every returned row is its source row's continuation."""
    ids, mask, pixels, sizes, prompts, per_row, _ = _padded_batch()
    expanded, kwargs = model._expand_inputs_for_generation(
        expand_size=2, input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes
    )
    assert torch.equal(kwargs["pixel_values"], pixels[[0, 1, 0, 1, 2, 2]])
    assert torch.equal(kwargs["image_sizes"], sizes[[0, 1, 0, 1, 2, 2]])
    single = _generate(model, ids, pixels, sizes, "ar", attention_mask=mask, use_cache=True)
    for mode in ("ar", "linear_spec"):
        torch.manual_seed(0)
        out = _generate(
            model, ids, pixels, sizes, mode, attention_mask=mask, use_cache=True, num_return_sequences=2,
            do_sample=True, top_k=1,  # sampling from the top token only: greedy, but allowed with several returns
        )
        for b in range(ids.shape[0]):
            for k in range(2):
                assert _strip(out[2 * b + k]) == _strip(single[b]), (mode, b, k)


def test_image_tokens_that_do_not_split_into_images_are_a_clear_error(model):
    pixels, sizes = random_pixels([(2, 2)])
    ids = torch.tensor([image_prompt([(1, 3)])])  # 3 image tokens, an image of 4 features
    with pytest.raises(ValueError, match=r"do not split into whole images"):
        model._expand_inputs_for_generation(expand_size=2, input_ids=ids, pixel_values=pixels, image_sizes=sizes)


@pytest.mark.parametrize("mode", MODES)
def test_static_cache_with_images_gives_the_dynamic_cache_tokens(model, mode):
    ids, mask, pixels, sizes, *_ = _padded_batch()
    dynamic = _generate(model, ids, pixels, sizes, mode, attention_mask=mask, use_cache=True)
    static = _generate(model, ids, pixels, sizes, mode, attention_mask=mask, use_cache=True,
                       cache_implementation="static")
    assert [_strip(r) for r in static] == [_strip(r) for r in dynamic]
