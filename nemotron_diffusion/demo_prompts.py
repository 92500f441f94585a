# Copyright 2026 The nemotron-diffusion authors. Licensed under the Apache License, Version 2.0.
"""Chat requests for the demo drafter's self-distillation data and for its held-out measurement.

Users do not only ask for code, so the requests come from three sources, each split into a training and a held-out
part by a stable hash (a held-out request never appears in training data):

* `code`: requests about functions of the CPython standard library (`training.stdlib_prompts`; the split is by
  file, `training.stdlib_files`).
* `prose`: requests about passages of Python's own documentation, the prose of `pydoc_data.topics` (summarise,
  explain, answer a question about it).
* `general`: everyday requests (explain, advise, write a short text, compare) built from a list of topics and
  request templates below; the split is by (template, topic) pair.

Tooling beside the model files (it imports `training`), never imported by them.
"""

from __future__ import annotations

import random
import zlib

from .training import stdlib_files, stdlib_prompts

SOURCES = ("code", "prose", "general")

TOPICS = (
    "the water cycle", "photosynthesis", "black holes", "the French Revolution", "volcanoes", "the immune system",
    "compound interest", "the stock market", "climate change", "recycling", "electric cars", "solar panels",
    "the internet", "email etiquette", "public speaking", "time management", "learning a new language",
    "baking bread", "growing tomatoes", "keeping a houseplant alive", "training a puppy", "adopting a cat",
    "running a marathon", "starting to jog", "healthy breakfasts", "drinking enough water", "sleep hygiene",
    "meditation", "job interviews", "writing a resume", "negotiating a salary", "working from home",
    "team meetings", "giving feedback", "saving money", "making a budget", "buying a used car", "renting an apartment",
    "moving to a new city", "travelling on a budget", "packing for a trip", "camping", "hiking safety",
    "the Roman Empire", "ancient Egypt", "the printing press", "the Moon landing", "the Olympic Games", "chess",
    "learning to play the guitar", "jazz music", "the history of cinema", "reading more books", "writing poetry",
    "keeping a journal", "making friends as an adult", "birthday party ideas", "a rainy weekend", "the ocean",
    "coral reefs", "honey bees", "penguins", "elephants", "the solar system", "Mars", "gravity", "magnets",
    "rainbows", "earthquakes", "how vaccines work", "antibiotics", "the human heart", "dinosaurs", "evolution",
    "DNA", "the periodic table", "electricity at home", "how a refrigerator works", "how airplanes fly",
    "bicycles", "trains", "coffee", "tea", "chocolate", "pizza", "a picnic", "vegetarian cooking", "spices",
    "cleaning the kitchen", "decluttering a room", "painting a wall", "fixing a leaky tap", "gardening in winter",
    "bird watching", "photography for beginners", "smartphone battery life", "strong passwords", "online privacy",
    "spotting a scam email", "backing up files", "choosing a laptop", "video calls", "social media habits",
    "volunteering", "recycling electronics", "the library", "museums", "autumn", "spring", "snow", "the desert",
    "mountains", "rivers", "a small village", "a busy market", "friendship", "kindness", "curiosity", "patience",
    "teamwork", "leadership", "procrastination", "motivation", "stress at work", "a first day at school",
    "learning mathematics", "fractions", "percentages", "probability", "maps and navigation", "weather forecasts",
)

TEMPLATES = (
    "Explain {topic} in simple terms.",
    "Explain {topic} to a ten-year-old.",
    "Give me three practical tips about {topic}.",
    "What are the most important facts about {topic}?",
    "Write a short story about {topic}.",
    "Write a short poem about {topic}.",
    "Write a friendly paragraph for a newsletter about {topic}.",
    "What are common mistakes people make with {topic}, and how can they avoid them?",
    "Summarize what a beginner should know about {topic}.",
    "Write a short dialogue between two friends talking about {topic}.",
    "List the pros and cons of {topic}.",
    "Why is {topic} interesting? Answer in a few sentences.",
    "Write an encouraging message to someone who is struggling with {topic}.",
    "Describe {topic} as if you were a tour guide.",
)

PROSE_TEMPLATES = (
    "Summarize this passage from the Python documentation in plain words:\n\n{text}",
    "Explain the following to a programmer who is new to Python:\n\n{text}",
    "Read this documentation excerpt and list its key points:\n\n{text}",
    "What is the main idea of this text?\n\n{text}",
)


def _heldout(key: str, every: int) -> bool:
    return zlib.crc32(key.encode()) % every == 0


def _render(tokenizer, text: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


def general_requests(split: str = "train", heldout_every: int = 10) -> list[str]:
    """Every (template, topic) request of the split ("train" or "heldout"), in a fixed order."""
    _check_split(split)
    requests = []
    for t, template in enumerate(TEMPLATES):
        for topic in TOPICS:
            if _heldout(f"{t}|{topic}", heldout_every) == (split == "heldout"):
                requests.append(template.format(topic=topic))
    return requests


def prose_requests(split: str = "train", heldout_every: int = 10, max_chars: int = 900, seed: int = 0) -> list[str]:
    """Requests about paragraphs of `pydoc_data.topics` (Python's language and library reference prose): one
    request per passage of at most `max_chars` characters, the template drawn with `seed`; split by topic name."""
    _check_split(split)
    from pydoc_data.topics import topics

    rng = random.Random(seed)
    requests = []
    for name in sorted(topics):
        if _heldout(name, heldout_every) != (split == "heldout"):
            continue
        passage = []
        for paragraph in topics[name].split("\n\n"):
            paragraph = paragraph.strip()
            if not paragraph or paragraph.startswith(("   ", ">>>")) or "\n   " in paragraph:
                continue  # code samples and indented grammar: not prose
            if sum(len(p) for p in passage) + len(paragraph) > max_chars and passage:
                requests.append(rng.choice(PROSE_TEMPLATES).format(text="\n\n".join(passage)))
                passage = []
            if len(paragraph) <= max_chars:
                passage.append(paragraph)
        if passage and sum(len(p) for p in passage) > 200:
            requests.append(rng.choice(PROSE_TEMPLATES).format(text="\n\n".join(passage)))
    return requests


def demo_prompts(tokenizer, split: str = "train", seed: int = 0, mix=(("code", 0.4), ("prose", 0.2), ("general", 0.4)),
                 limit: int | None = None, max_prompt_tokens: int = 256) -> list[dict]:
    """Chat prompts of the split, mixed from the sources in the proportions of `mix` (of the `limit`, or of as
    many as the scarcest source allows), shuffled with `seed`. Returns `{"input_ids", "source"}` dicts."""
    _check_split(split)
    rng = random.Random(seed)
    pools = {}
    for source, _ in mix:
        if source not in SOURCES:
            raise ValueError(f"mix: source {source!r} is invalid; allowed: {SOURCES}")
        if source == "code":
            ids = stdlib_prompts(tokenizer, stdlib_files(split), seed=seed, raw_share=0.0,
                                 max_prompt_tokens=max_prompt_tokens)
        else:
            texts = general_requests(split) if source == "general" else prose_requests(split, seed=seed)
            ids = [p for p in (_render(tokenizer, t) for t in texts) if len(p) <= max_prompt_tokens]
        rng.shuffle(ids)
        pools[source] = ids
    total = sum(share for _, share in mix)
    if limit is None:
        limit = int(min(len(pools[s]) / (share / total) for s, share in mix if share > 0))
    prompts, cumulative = [], 0.0
    for source, share in mix:
        # Counts from rounded cumulative shares: they add up to `limit` (when the pools are large enough).
        count = round(limit * (cumulative + share) / total) - round(limit * cumulative / total)
        cumulative += share
        prompts += [{"input_ids": ids, "source": source} for ids in pools[source][: min(count, len(pools[source]))]]
    rng.shuffle(prompts)
    return prompts[:limit]


def _check_split(split):
    if split not in ("train", "heldout"):
        raise ValueError(f"split={split!r} is invalid; allowed: 'train', 'heldout'")
