"""The generation layer's internals the benchmark uses, imported here and nowhere else in the bench."""

from ..generation_nemotron_diffusion import _peft_base_module as peft_base_module  # noqa: F401
