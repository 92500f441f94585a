"""A tiny word-level tokenizer with a chat template, matching the tiny models of conftest.py (64 ids, pad 0, <s> 1,
</s> 2, mask 63), and a helper that saves a tiny model and this tokenizer as one folder."""

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from conftest import BOS_ID, EOS_ID, MASK_ID, PAD_ID


CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
WORDS = ["hello", "the", "sea", "is", "blue", "write", "a", "haiku", "about", "once", "upon", "time"]


def word_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    special = {"<pad>": PAD_ID, "<s>": BOS_ID, "</s>": EOS_ID, "<unk>": 3, "<|user|>": 4, "<|assistant|>": 5,
               "<|system|>": 6, "<mask>": MASK_ID}
    vocab = dict(special)
    for i, word in enumerate(WORDS):
        vocab[word] = 7 + i
    for i in range(7 + len(WORDS), MASK_ID):
        vocab[f"w{i}"] = i
    assert sorted(vocab.values()) == list(range(64))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        mask_token="<mask>", additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"],
    )
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def save_tiny_folder(folder, model=None, **save_kwargs):
    """A tiny tri-mode model and the word tokenizer saved together: a folder every entry point can load."""
    from conftest import tiny_model

    model = model if model is not None else tiny_model()
    model.save_pretrained(folder, **save_kwargs)
    word_tokenizer().save_pretrained(folder)
    return folder
