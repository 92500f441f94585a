# Copyright 2026 The nemotron-diffusion authors. Licensed under the Apache License, Version 2.0.
"""An OpenAI-compatible server for tri-mode models, built on transformers' own (`transformers serve`).

transformers' app, endpoints, request schema and streaming are used as they are; this module supplies what our
models need from them:

* **Loading** (`TriModeModelManager`): transformers' `ModelManager` resolves `config.architectures[0]` on the
  `transformers` namespace, where our class is not, so `transformers serve FOLDER --trust-remote-code` cannot load
  our folders. The manager here loads through our Auto classes like the other `nemotron-diffusion` commands
  (dtype, device, quantization, the LoRA drafter) and pins the server to that one model.
* **Mode fields per request**: `decode_mode`, `block_size`, ... (`GENERATION_FIELDS`) are read from transformers'
  `generation_config` JSON string and from plain top-level fields of the body (what the OpenAI client's
  `extra_body` sends); a top-level field wins over the JSON, which wins over the model's `generation_config.json`.
  A top-level `temperature` > 0 turns sampling on (OpenAI's meaning; our models save `do_sample=False`).
* **Bad requests** are answered with HTTP 400 before anything is generated, with the message `generate()` itself
  raises (field, value, allowed values): the checks `generate()` runs before its first forward are run first.
* **Decoding statistics**: every chat/completions response carries an extra top-level field `"decoding"`
  (`decode_mode`, `block_size`, `num_forwards`, `tokens_per_forward`, `acceptance_lengths`), in the last chunk
  when streaming.
* **Concurrency: generation is serialised per model.** A generate() call switches state shared by all calls on
  the model (adapter flags and PEFT wrappers swapped out of the module tree, the attention backend of the
  config for custom masks), so two calls must never overlap. transformers' server already runs every generate()
  of a model on one inference thread; `TriModeGenerateManager` also holds a per-model lock around each call (and
  around each request's pre-flight checks, which read that state), so the guarantee does not rest on the thread
  layout. A request's `seed` is applied under that lock, right before its generate(), so a seeded sampled
  request draws the same tokens whatever runs beside it. Requests queue; they are not batched together.
"""

import asyncio
import contextlib
import contextvars
import copy
import inspect
import json
import threading

import torch
from fastapi import HTTPException
from fastapi.responses import JSONResponse
from transformers.cli.serving.chat_completion import ChatCompletionHandler
from transformers.cli.serving.completion import CompletionHandler
from transformers.cli.serving.model_manager import ModelManager
from transformers.cli.serving.response import ResponseHandler
from transformers.cli.serving.server import build_server
from transformers.cli.serving.systemone import SystemOneHandler
from transformers.cli.serving.transcription import TranscriptionHandler
from transformers.cli.serving.utils import (
    DirectStreamer,
    GenerateManager,
    GenerationState,
    Modality,
    _GenerationCancelled,
    _StreamError,
)

from . import GENERATION_FIELDS
from .drafting_nemotron_diffusion import adapters_for_drafting  # the drafter check generate() runs first


# The package's generation fields, accepted as plain top-level request fields as well.
MODE_FIELDS = tuple(GENERATION_FIELDS)
# `--quantization` choices: transformers' own quantization configs. The bitsandbytes ones are those of
# `transformers serve --quantization`.
QUANTIZATION_METHODS = ("torchao-int8", "bnb-8bit", "bnb-4bit")
# Name of the extra response field with the decoding statistics.
DECODING_FIELD = "decoding"
# Token-budget fields of the three endpoints (transformers' serve converts them with int() and checks nothing).
_TOKEN_BUDGET_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")

# The mode fields of the request being handled. Set by `handle_request` and read by `_build_generation_config`,
# which transformers' handler calls in between; each request runs in its own asyncio task, hence its own context.
_request_mode_fields: contextvars.ContextVar[dict] = contextvars.ContextVar("request_mode_fields")


def quantization_config(method):
    """The transformers quantization config of a `--quantization` choice (None: no quantization)."""
    if method is None:
        return None
    if method == "torchao-int8":
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        return TorchAoConfig(Int8WeightOnlyConfig())
    from transformers import BitsAndBytesConfig

    if method == "bnb-8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if method == "bnb-4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    raise ValueError(f"quantization={method!r} is invalid; allowed: {QUANTIZATION_METHODS}.")


# ------------------------------------------------------------------------------------------------- loading
class TriModeModelManager(ModelManager):
    """transformers' model manager, pinned to one tri-mode model that `load()` returns as (model, tokenizer).

    `served_name` is the name clients pass as `model` (any other name gets transformers' 400 answer).
    """

    def __init__(self, load, served_name):
        self._load = load
        self._pending = None
        # trust_remote_code only affects transformers' own loading, which `load` replaces; force_model preloads the
        # model now and disables the idle unload.
        super().__init__(device="cpu", dtype="auto", trust_remote_code=True, force_model=served_name)

    def _validate_args(self):
        pass  # quantization, dtype and device were checked (and applied) by `load`

    def _loaded_pair(self):
        # transformers asks for the processor, then for the model; `load` gives both at once.
        if self._pending is None:
            self._pending = self._load()
        return self._pending

    def _load_processor(self, model_id_and_revision, gguf_file=None):
        return self._loaded_pair()[1]

    def _load_model(self, model_id_and_revision, tqdm_class=None, progress_callback=None, gguf_file=None):
        model, _ = self._loaded_pair()
        self._pending = None  # the manager owns the model from here on (an unload frees it)
        return model

    @staticmethod
    def get_model_modality(model, processor=None):
        return Modality.LLM  # transformers looks the class name up in its own tables, which do not list ours

    def _served_models(self):
        return [{"id": self.force_model, "object": "model", "created": 0, "owned_by": "nemotron-diffusion"}]

    def list_models(self, cache_dir=None):  # transformers 5.24
        return self._served_models()

    def get_gen_models(self, cache_dir=None):  # transformers 5.23 (it lists the HF cache, not the served model)
        return self._served_models()


# ---------------------------------------------------------------------------------------------- generation
def decoding_stats(output, resolved_config):
    """The `"decoding"` field of a response: the mode that ran and generate()'s forward counts for row 0 (None
    where transformers' own loops ran, e.g. AR beam search, which does not count forwards)."""
    mode = resolved_config.decode_mode
    counted = getattr(output, "num_forwards", None) is not None
    stats = {
        "decode_mode": mode,
        "block_size": None if mode == "ar" else resolved_config.block_size,
        "num_forwards": int(output.num_forwards[0]) if counted else None,
        "tokens_per_forward": round(float(output.tokens_per_forward[0]), 4) if counted else None,
    }
    if getattr(output, "acceptance_lengths", None) is not None:
        lengths = output.acceptance_lengths[0].tolist()
        stats["acceptance_lengths"] = [n for n in lengths if n > 0]  # 0 pads after the last cycle
    return stats


def check_generation_config(model, generation_config, streaming=False):
    """Runs the checks generate() makes before its first forward, without generating: the mode fields and their
    combinations, transformers' own config validation, the generation mode the mode refuses (beams, ...; beams with
    a streamer in any mode), the drafter adapter, and the logits processors (temperature, top-k, ...). Raises
    generate()'s ValueError."""
    resolved, _ = model._prepare_generation_config(copy.deepcopy(generation_config))
    resolved.validate()
    mode_kwargs = {"streamer": None} if streaming else {}  # transformers checks for the key
    model._validate_generation_mode(resolved.get_generation_mode(), resolved, mode_kwargs)
    with adapters_for_drafting(model, resolved.drafter_adapter):
        pass
    model._prepare_special_tokens(resolved, kwargs_has_attention_mask=True, device=model.device)
    model._get_logits_processor(
        generation_config=resolved, input_ids_seq_length=1, device=model.device, model_kwargs={}
    )
    return resolved


class _StatsStreamer(DirectStreamer):
    """transformers' streamer, whose end of stream waits until generate() has returned its statistics: the handler
    builds the last chunk (where the `"decoding"` field goes) when it reads the end marker."""

    stats = None

    def end(self):
        pass  # generate() is done with the tokens, but its output (the statistics) is not there yet

    def close(self, stats):
        self.stats = stats
        super().end()


class TriModeGenerateManager(GenerateManager):
    """transformers' sequential generation manager (one inference thread per model), with each generate() under a
    per-model lock, the request's seed applied right before it, and the decoding statistics kept."""

    def __init__(self):
        super().__init__()
        self._lock = threading.Lock()

    def _generate(self, model, generate_kwargs):
        """One generate() call: (output, resolved generation config). Runs on the inference thread."""
        config = copy.deepcopy(generate_kwargs.pop("generation_config"))
        seed = _take_request_seed(config)
        config.return_dict_in_generate = True
        with self._lock:
            if seed is not None:
                torch.manual_seed(seed)
            resolved, _ = model._prepare_generation_config(copy.deepcopy(config))
            output = model.generate(**generate_kwargs, generation_config=config)
        return output, resolved

    def check(self, model, generation_config, streaming):
        """`check_generation_config` under the lock: the checks read state that a running generate() switches."""
        config = copy.deepcopy(generation_config)
        _take_request_seed(config)
        with self._lock:
            return check_generation_config(model, config, streaming)

    async def generate_non_streaming_with_stats(self, model, processor, inputs, gen_config, request_id):
        """transformers' `generate_non_streaming`, plus the `"decoding"` statistics."""
        generate_kwargs = {**inputs, "generation_config": gen_config, "tokenizer": processor}
        output, resolved = await self.async_submit(self._generate, model, generate_kwargs)
        input_len = inputs["input_ids"].shape[-1]
        generated_ids = output.sequences[0, input_len:]
        text = processor.decode(generated_ids, skip_special_tokens=True)
        return text, input_len, generated_ids, decoding_stats(output, resolved)

    async def generate_non_streaming(self, model, processor, inputs, gen_config, request_id):
        text, input_len, generated_ids, _ = await self.generate_non_streaming_with_stats(
            model, processor, inputs, gen_config, request_id
        )
        return text, input_len, generated_ids

    def generate_streaming(self, model, processor, inputs, gen_config, request_id, response_parser=None):
        # As transformers' GenerateManager.generate_streaming, with `_StatsStreamer` and the output kept.
        loop = asyncio.get_running_loop()
        queue = asyncio.Queue()
        rust_tokenizer = getattr(processor, "tokenizer", processor)._tokenizer
        streamer = _StatsStreamer(rust_tokenizer, loop, queue, response_parser=response_parser)
        generate_kwargs = {**inputs, "streamer": streamer, "generation_config": gen_config, "tokenizer": processor}

        def run():
            try:
                output, resolved = self._generate(model, generate_kwargs)
            except _GenerationCancelled:  # the client went away
                loop.call_soon_threadsafe(queue.put_nowait, None)
                return
            except Exception as error:
                loop.call_soon_threadsafe(queue.put_nowait, _StreamError(str(error)))
                return
            streamer.close(decoding_stats(output, resolved))

        self.submit(run)
        return queue, streamer


class TriModeGenerationState(GenerationState):
    """transformers' generation state (no continuous batching: paged attention serves AR only), handing out
    `TriModeGenerateManager`s."""

    def __init__(self):
        super().__init__(continuous_batching=False)

    def get_manager(self, model_id, use_cb=False):
        if model_id not in self._generate_managers:
            self._generate_managers[model_id] = TriModeGenerateManager()
        return self._generate_managers[model_id]


# The request seed travels on the request's generation config to the inference thread (see `_generate`).
_SEED_ATTRIBUTE = "_serve_request_seed"


def _take_request_seed(config):
    seed = getattr(config, _SEED_ATTRIBUTE, None)
    if hasattr(config, _SEED_ATTRIBUTE):
        delattr(config, _SEED_ATTRIBUTE)
    return seed


# ------------------------------------------------------------------------------------------------ handlers
def _bad_request(message):
    return HTTPException(status_code=400, detail=message)


class _RecordingManager:
    """Stands in for a request's generation manager inside transformers' `_streaming` / `_non_streaming`: forwards
    to it and keeps what that request's generation reported."""

    def __init__(self, manager):
        self._manager = manager
        self.stats = None
        self.streamer = None

    async def generate_non_streaming(self, *args, **kwargs):
        text, input_len, generated_ids, self.stats = await self._manager.generate_non_streaming_with_stats(
            *args, **kwargs
        )
        return text, input_len, generated_ids

    def generate_streaming(self, *args, **kwargs):
        queue, self.streamer = self._manager.generate_streaming(*args, **kwargs)
        return queue, self.streamer


def _with_recording_manager(method, args, kwargs):
    """(args, kwargs, recorder) for calling transformers' `method` with its `gen_manager` wrapped."""
    bound = inspect.signature(method).bind(*args, **kwargs)
    recorder = _RecordingManager(bound.arguments["gen_manager"])
    bound.arguments["gen_manager"] = recorder
    return bound.args, bound.kwargs, recorder


def _add_stats_to_last_chunk(sse_parts, recorder):
    """transformers' SSE stream, with the `"decoding"` field added to the chunk that carries `usage` (the last)."""

    def edit(part):
        events = []
        for event in part.split("\n\n"):
            if event.startswith("data: ") and '"usage"' in event:
                chunk = json.loads(event[len("data: "):])
                if "usage" in chunk and recorder.streamer is not None and recorder.streamer.stats is not None:
                    chunk[DECODING_FIELD] = recorder.streamer.stats
                    event = "data: " + json.dumps(chunk)
            events.append(event)
        return "\n\n".join(events)

    async def stream():
        try:
            async for part in sse_parts:
                yield edit(part) if isinstance(part, str) else part
        finally:
            await sse_parts.aclose()  # a client that leaves cancels the generation (transformers' stream does it)

    return stream()


class _TriModeHandlerMixin:
    """The mode fields and the pre-flight checks, for any of transformers' text handlers."""

    streams_by_default = False  # what transformers' handler does when the body has no `stream`

    async def handle_request(self, body, request_id):
        body = dict(body)
        mode_fields = {name: body.pop(name) for name in MODE_FIELDS if name in body}
        token = _request_mode_fields.set(mode_fields)
        try:
            await self._check_request(body)
            return await super().handle_request(body, request_id)
        finally:
            _request_mode_fields.reset(token)

    async def _check_request(self, body):
        """HTTP 4xx for every request generate() would refuse, before anything is generated."""
        self._validate_request(body)  # transformers' 422 for fields it does not know
        for field in _TOKEN_BUDGET_FIELDS:
            value = body.get(field)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise _bad_request(f"`{field}`={value!r} is invalid; allowed: an int >= 1.")
        temperature = body.get("temperature")
        if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                                        or temperature < 0):
            raise _bad_request(f"`temperature`={temperature!r} is invalid; allowed: a number >= 0 (0 = greedy).")
        raw_config = body.get("generation_config")
        if raw_config is not None:
            try:
                parsed = json.loads(raw_config) if isinstance(raw_config, str) else None
            except ValueError as error:
                raise _bad_request(f"`generation_config` is not valid JSON ({error}); allowed: a JSON object string.")
            if not isinstance(parsed, dict):
                raise _bad_request(
                    f"`generation_config`={raw_config!r} is invalid; allowed: a JSON object string, e.g. "
                    '\'{"decode_mode": "linear_spec", "block_size": 16}\'.'
                )
        model_id, model, _ = self._resolve_model(dict(body))  # transformers' 400 for another model name
        try:
            generation_config = self._build_generation_config(body, model.generation_config)
        except (ValueError, TypeError) as error:
            raise _bad_request(str(error)) from None
        manager = self.generation_state.get_manager(model_id)
        try:
            streaming = bool(body.get("stream", self.streams_by_default))
            await manager.async_submit(manager.check, model, generation_config, streaming)
        except (ValueError, TypeError) as error:
            raise _bad_request(str(error)) from None

    def _build_generation_config(self, body, model_generation_config, use_cb=False):
        # transformers seeds torch's global generator here, long before the request runs; the seed is applied on
        # the inference thread instead, right before this request's generate().
        seed = body.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64):
            raise ValueError(f"`seed`={seed!r} is invalid; allowed: an int in [0, 2**64).")
        config = super()._build_generation_config(
            {k: v for k, v in body.items() if k != "seed"}, model_generation_config, use_cb=use_cb
        )
        # OpenAI's temperature > 0 means sampling; our models save do_sample=False, which transformers' serve would
        # keep (a temperature alone would then change nothing). A `do_sample` in the JSON config is left as it is.
        temperature = body.get("temperature")
        json_fields = json.loads(body["generation_config"]) if body.get("generation_config") else {}
        if temperature is not None and float(temperature) > 0 and "do_sample" not in json_fields:
            config.do_sample = True
        for name, value in _request_mode_fields.get({}).items():
            setattr(config, name, value)
        if seed is not None:
            setattr(config, _SEED_ATTRIBUTE, seed)
        return config


class _StatsHandlerMixin:
    """The `"decoding"` field in chat/completions responses."""

    async def _non_streaming(self, *args, **kwargs):
        args, kwargs, recorder = _with_recording_manager(super()._non_streaming, args, kwargs)
        response = await super()._non_streaming(*args, **kwargs)
        if recorder.stats is None:
            return response
        content = json.loads(response.body)
        content[DECODING_FIELD] = recorder.stats
        return JSONResponse(content, status_code=response.status_code)

    def _streaming(self, *args, **kwargs):
        args, kwargs, recorder = _with_recording_manager(super()._streaming, args, kwargs)
        response = super()._streaming(*args, **kwargs)
        response.body_iterator = _add_stats_to_last_chunk(response.body_iterator, recorder)
        return response


class TriModeChatCompletionHandler(_StatsHandlerMixin, _TriModeHandlerMixin, ChatCompletionHandler):
    """`/v1/chat/completions`."""


class TriModeCompletionHandler(_StatsHandlerMixin, _TriModeHandlerMixin, CompletionHandler):
    """`/v1/completions`."""


class TriModeResponseHandler(_TriModeHandlerMixin, ResponseHandler):
    """`/v1/responses`: the mode fields and checks (its event stream carries no `"decoding"` field)."""

    streams_by_default = True


# ------------------------------------------------------------------------------------------------ the app
def build_app(model_manager):
    """transformers' FastAPI app (`build_server`) with the handlers above."""
    generation_state = TriModeGenerationState()
    shared = dict(model_manager=model_manager, generation_state=generation_state)
    return build_server(
        model_manager,
        TriModeChatCompletionHandler(**shared),
        completion_handler=TriModeCompletionHandler(**shared),
        response_handler=TriModeResponseHandler(**shared),
        transcription_handler=TranscriptionHandler(model_manager, generation_state),
        systemone_handler=SystemOneHandler(**shared),
        generation_state=generation_state,
    )


def serve(app, host, port, log_level="warning", on_listening=None):
    """Runs `app` with uvicorn until SIGINT or SIGTERM, which shut it down gracefully (requests in flight are
    answered first); then returns normally. The socket is bound first, so that port 0 (any free port) can be
    reported: `on_listening(host, port)` is called with the bound address before serving starts."""
    import signal
    import socket

    import uvicorn

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family)
    # After its graceful shutdown uvicorn raises the signal again under the handlers it found: with Python's
    # defaults that is a KeyboardInterrupt (SIGINT) or death by signal (SIGTERM). The shutdown is done by then, so
    # the handlers it finds here just note the signal.
    stop_signals = []
    previous = {sig: signal.signal(sig, lambda signum, frame: stop_signals.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with contextlib.closing(sock):
            if on_listening is not None:
                on_listening(host, sock.getsockname()[1])
            uvicorn.Server(uvicorn.Config(app, log_level=log_level)).run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return stop_signals


__all__ = [
    "DECODING_FIELD",
    "MODE_FIELDS",
    "QUANTIZATION_METHODS",
    "TriModeModelManager",
    "build_app",
    "check_generation_config",
    "quantization_config",
    "serve",
]
