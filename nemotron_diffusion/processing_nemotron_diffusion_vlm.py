# Copyright 2026 The nemotron-diffusion authors. Licensed under the Apache License, Version 2.0.
"""Processor of Nemotron-Labs-Diffusion-VLM: the tokenizer plus the image processor.

Prompts mark each image with one placeholder (by default `<|image_start|>`, what the chat template renders for an
image part). The processor replaces the i-th placeholder with the i-th image's full marker text,

    <|image_start|> (<|image_pad|> x w <|image_break|>) x (h - 1)  <|image_pad|> x w <|image_end|>

(`1 + h * (w + 1)` tokens for an image of h x w cells), then tokenizes. The placeholder and the four marker strings
are arguments, so a checkpoint whose template uses another placeholder (e.g. `<image>`) needs no code change.
"""

from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .generation_nemotron_diffusion import GENERATION_FIELDS
from .image_processing_nemotron_diffusion_vlm import image_token_layout


# A ChatML template in the style of the text family, with image parts rendered as the placeholder, used when
# neither the processor nor the tokenizer has one. Thinking is off unless `enable_thinking=True` (the assistant turn
# then opens `<think>\n`; off, it starts with an empty `<think></think>`).
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] in ('image', 'image_url') -%}{{- '<|image_start|>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking -%}{{- '<think>\\n' -}}"
    "{%- else -%}{{- '<think></think>' -}}{%- endif -%}"
    "{%- endif -%}"
)


class NemotronDiffusionVLMProcessor(ProcessorMixin):
    r"""
    Tokenizer + [`NemotronDiffusionVLMImageProcessor`].

    Args:
        image_processor, tokenizer: the two parts.
        chat_template (`str`, *optional*): defaults to the tokenizer's, else `DEFAULT_CHAT_TEMPLATE`.
        image_placeholder (`str`, defaults to `"<|image_start|>"`): the text that stands for one image in a prompt.
        image_start_token, image_token, image_break_token, image_end_token (`str`): NVIDIA's marker tokens
            (`<|image_start|>`, `<|image_pad|>`, `<|image_break|>`, `<|image_end|>`); each must be one token of the
            tokenizer.
    """

    attributes = ["image_processor", "tokenizer"]
    image_processor_class = "AutoImageProcessor"
    tokenizer_class = "AutoTokenizer"

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        image_placeholder: str = "<|image_start|>",
        image_start_token: str = "<|image_start|>",
        image_token: str = "<|image_pad|>",
        image_break_token: str = "<|image_break|>",
        image_end_token: str = "<|image_end|>",
        **kwargs,
    ):
        if chat_template is None:
            chat_template = getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        if not isinstance(image_placeholder, str) or not image_placeholder:
            raise ValueError(f"`image_placeholder`={image_placeholder!r} is invalid; allowed: a non-empty string.")
        self.image_placeholder = image_placeholder
        self.image_start_token = image_start_token
        self.image_token = image_token
        self.image_break_token = image_break_token
        self.image_end_token = image_end_token
        ids = {}
        for name in ("image_start_token", "image_token", "image_break_token", "image_end_token"):
            token = getattr(self, name)
            token_id = tokenizer.convert_tokens_to_ids(token) if isinstance(token, str) else None
            if token_id is None or token_id == tokenizer.unk_token_id:
                raise ValueError(
                    f"`{name}`={token!r} is invalid; allowed: a token of the tokenizer (its vocabulary has no such "
                    "token)."
                )
            ids[name] = token_id
        self.image_start_token_id = ids["image_start_token"]
        self.image_token_id = ids["image_token"]
        self.image_break_token_id = ids["image_break_token"]
        self.image_end_token_id = ids["image_end_token"]

    @property
    def image_token_ids(self) -> list[int]:
        return [self.image_start_token_id, self.image_token_id, self.image_break_token_id, self.image_end_token_id]

    def image_text(self, rows: int, cols: int) -> str:
        """The marker text of one image of rows x cols cells."""
        return image_token_layout(
            rows, cols, self.image_start_token, self.image_token, self.image_break_token, self.image_end_token
        )

    def __call__(self, images=None, text=None, return_tensors="pt", max_image_size=None, **text_kwargs):
        """`text`: a prompt or a list of prompts, each with one `image_placeholder` per image; `images`: the images
        in order of appearance (flat, or one list per prompt). Returns `input_ids`, `attention_mask` and, with
        images, `pixel_values` and `image_sizes`. Extra keyword arguments go to the tokenizer (e.g.
        `padding_side="left"` for a batch to generate from, `add_special_tokens`)."""
        if text is None:
            raise ValueError("`text` is required: the prompt(s), with one image placeholder per image.")
        misplaced = sorted(k for k in text_kwargs if k in GENERATION_FIELDS or k in ("max_new_tokens", "do_sample"))
        if misplaced:
            # e.g. pipeline("image-text-to-text") hands unknown keyword arguments to the processor, not to generate()
            raise ValueError(
                f"{misplaced} are generation arguments, not processor arguments; with a pipeline pass them as "
                f"generate_kwargs={{{', '.join(repr(k) + ': ...' for k in misplaced)}}}."
            )
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"`text` must be a string or a non-empty list of strings, got {type(text).__name__}.")
        placeholders = [t.count(self.image_placeholder) for t in texts]
        image_inputs = {}
        if images is not None:
            image_inputs = self.image_processor(images, max_image_size=max_image_size, return_tensors="pt")
        count = 0 if images is None else image_inputs["image_sizes"].shape[0]
        if sum(placeholders) != count:
            raise ValueError(
                f"`text` holds {sum(placeholders)} image placeholders ({self.image_placeholder!r}, per prompt: "
                f"{placeholders}) but {count} images were given in `images`; they must match one to one."
            )
        cell = self.image_processor.cell_size
        sizes = image_inputs["image_sizes"].tolist() if count else []
        expanded, next_image = [], 0
        for t in texts:
            pieces = t.split(self.image_placeholder)
            out = [pieces[0]]
            for piece in pieces[1:]:
                h, w = sizes[next_image]
                out.append(self.image_text(h // cell, w // cell))
                out.append(piece)
                next_image += 1
            expanded.append("".join(out))
        if len(expanded) > 1:
            text_kwargs.setdefault("padding", True)
        encoding = self.tokenizer(expanded, return_tensors=return_tensors, **text_kwargs)
        data = dict(encoding)
        data.update(image_inputs)
        return BatchFeature(data=data)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self):
        return list(self.tokenizer.model_input_names) + ["pixel_values", "image_sizes"]


# `save_pretrained` copies this file (and its single-dot relative imports) as remote code, with an `auto_map`.
NemotronDiffusionVLMProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["NemotronDiffusionVLMProcessor", "DEFAULT_CHAT_TEMPLATE"]
