"""`nemotron-diffusion serve` as a real server: a subprocess on 127.0.0.1 (an ephemeral port), a tiny model with a
LoRA drafter saved to a tmp folder, and the official `openai` client.

* every mode, chat and completions, streaming and not: the text (and the forward counts of the `"decoding"`
  field) equal a direct `generate()` with the same settings, the fields passed top-level or as transformers'
  `generation_config` JSON; the model's generation_config.json gives the default;
* 8 concurrent requests in mixed modes (two of them sampled with a seed) each get their solo output;
* 200 sequential requests are all answered, with bounded RSS growth (printed);
* each bad request gets a 4xx naming the field and the allowed values, and the next request is unaffected;
* start-up and shutdown are clean: exit status 0 on SIGINT/SIGTERM, no traceback, no process or port left.
"""

import concurrent.futures
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
peft = pytest.importorskip("peft")
psutil = pytest.importorskip("psutil")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from conftest import tiny_model  # noqa: E402
from tiny_tokenizer import save_tiny_folder  # noqa: E402


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: one torch thread for this module

ROOT = Path(__file__).resolve().parents[1]
SERVED_NAME = "tiny-trimode"
PROMPT = "once upon a time the sea"
MESSAGES = [{"role": "user", "content": "write a haiku about the sea"}]
MAX_TOKENS = 10
# The model's generation_config.json default (a request without mode fields decodes with it).
DEFAULT_MODE = {"decode_mode": "linear_spec", "block_size": 4}
# One setting per mode, with the less common fields exercised too.
MODE_SETTINGS = {
    "ar": {"decode_mode": "ar"},
    "diffusion": {"decode_mode": "diffusion", "block_size": 4, "confidence_threshold": 0.5, "max_denoising_steps": 3},
    "diffusion_leftmost": {"decode_mode": "diffusion", "block_size": 4, "confidence_threshold": 0.5,
                           "commit_order": "leftmost", "defer_adjacent_repeats": True},
    "linear_spec": {"decode_mode": "linear_spec", "block_size": 4, "drafter_adapter": "drafter"},
    "linear_spec_tree": {"decode_mode": "linear_spec", "block_size": 4, "tree_width": 3, "tree_slots": 2},
    "quadratic_spec": {
        "decode_mode": "quadratic_spec", "block_size": 3, "max_thinking_tokens": 2, "end_think_token_id": 9,
    },
}


# --------------------------------------------------------------------------------------------------- server
class Server:
    """`python -m nemotron_diffusion.cli serve --port 0 ...` in a subprocess, from the source tree."""

    def __init__(self, *flags, timeout=180):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "nemotron_diffusion.cli", "serve", "--host", "127.0.0.1", "--port", "0",
             "--device", "cpu", *map(str, flags)],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True,
        )
        self.stderr_lines = []
        self._listening = threading.Event()
        threading.Thread(target=self._read_stderr, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not self._listening.wait(0.2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                self.process.wait()
                pytest.fail("the server did not start:\n" + self.stderr)
        self.port = int(re.search(r"http://127\.0\.0\.1:(\d+)/v1", self.stderr).group(1))
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def _read_stderr(self):
        for line in self.process.stderr:
            self.stderr_lines.append(line)
            if " on http://" in line:
                self._listening.set()

    @property
    def stderr(self):
        return "".join(self.stderr_lines)

    def client(self):
        return openai.OpenAI(base_url=self.base_url, api_key="unused", max_retries=0, timeout=120)

    def stop(self, sig=signal.SIGINT, timeout=60):
        """Signals the server and returns its exit status (None: it had to be killed)."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                return None
        return self.process.returncode


def save_served_folder(folder):
    """The tiny model and tokenizer, with DEFAULT_MODE in generation_config.json and a random LoRA drafter in
    linear_spec_lora/ (found by `--drafter auto`, as NVIDIA's is)."""
    model = tiny_model(seed=3)
    for name, value in DEFAULT_MODE.items():
        setattr(model.generation_config, name, value)
    save_tiny_folder(folder, model=model)
    torch.manual_seed(4)
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["o_proj"], init_lora_weights=False)
    peft.get_peft_model(tiny_model(seed=3), config).save_pretrained(
        folder / "linear_spec_lora"
    )
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_served_folder(tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def server(folder):
    server = Server("--model", folder, "--dtype", "float32", "--served-model-name", SERVED_NAME)
    yield server
    # SIGTERM (what process managers send) after everything this module asked: a graceful exit, status 0
    status = server.stop(signal.SIGTERM)
    assert status == 0 and "Traceback" not in server.stderr, server.stderr


def load_reference(folder, **from_pretrained_kwargs):
    """The served model in this process, loaded directly (transformers + PEFT), for direct generate() calls."""
    from nemotron_diffusion.demo import attach_drafter

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **from_pretrained_kwargs).eval()
    return attach_drafter(model, folder / "linear_spec_lora"), AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def reference(folder):
    return load_reference(folder)


def direct(reference, endpoint, max_tokens=MAX_TOKENS, seed=None, **settings):
    """(text, output) of generate() on the prompt the endpoint builds (chat template / plain prompt)."""
    model, tok = reference
    if endpoint == "chat":
        inputs = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    else:
        inputs = tok(PROMPT, return_tensors="pt")
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_tokens, return_dict_in_generate=True, **settings)
    return tok.decode(out.sequences[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True), out


def ask(client, endpoint, stream=False, max_tokens=MAX_TOKENS, extra_body=None, **kwargs):
    """(text, "decoding" field) of one request through the official client."""
    common = dict(model=SERVED_NAME, max_tokens=max_tokens, stream=stream, extra_body=extra_body, **kwargs)
    if endpoint == "chat":
        response = client.chat.completions.create(messages=MESSAGES, **common)
    else:
        response = client.completions.create(prompt=PROMPT, **common)
    if not stream:
        choice = response.choices[0]
        text = choice.message.content if endpoint == "chat" else choice.text
        return text, response.model_extra.get("decoding")
    pieces, decoding, finish = [], None, None
    for chunk in response:
        if chunk.choices:
            choice = chunk.choices[0]
            piece = choice.delta.content if endpoint == "chat" else choice.text
            pieces.append(piece or "")
            finish = choice.finish_reason or finish
        decoding = (chunk.model_extra or {}).get("decoding", decoding)
    assert finish in ("stop", "length")
    return "".join(pieces), decoding


def expected_decoding(output, settings):
    mode = settings.get("decode_mode", "ar")
    return int(output.num_forwards[0]), round(float(output.tokens_per_forward[0]), 4), mode


# ------------------------------------------------------------------------------------------- every mode
@pytest.mark.parametrize("mode", list(MODE_SETTINGS))
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_every_mode_equals_direct_generate(server, reference, endpoint, stream, mode):
    settings = MODE_SETTINGS[mode]
    # streaming requests send the fields as transformers' generation_config JSON, the others as top-level fields
    extra_body = {"generation_config": json.dumps(settings)} if stream else dict(settings)
    text, decoding = ask(server.client(), endpoint, stream=stream, extra_body=extra_body)
    want_text, out = direct(reference, endpoint, **settings)
    assert text == want_text
    assert want_text  # the comparison is between real texts
    forwards, per_forward, want_mode = expected_decoding(out, settings)
    assert decoding["decode_mode"] == want_mode
    assert (decoding["num_forwards"], decoding["tokens_per_forward"]) == (forwards, per_forward)
    if mode != "ar":
        assert decoding["block_size"] == settings["block_size"]
    if settings["decode_mode"] in ("linear_spec", "quadratic_spec"):
        assert decoding["acceptance_lengths"] == [n for n in out.acceptance_lengths[0].tolist() if n > 0]


def test_model_default_and_precedence(server, reference):
    """No mode field: the folder's generation_config.json (linear_spec, B=4); a top-level field wins over the
    generation_config JSON, which wins over the folder's default."""
    client = server.client()
    text, decoding = ask(client, "completions")
    assert (decoding["decode_mode"], decoding["block_size"]) == ("linear_spec", 4)
    assert text == direct(reference, "completions")[0]

    text, decoding = ask(client, "completions", extra_body={"generation_config": json.dumps({"block_size": 2})})
    assert (decoding["decode_mode"], decoding["block_size"]) == ("linear_spec", 2)

    both = {"generation_config": json.dumps({"decode_mode": "diffusion", "block_size": 2}), "decode_mode": "ar"}
    text, decoding = ask(client, "completions", extra_body=both)
    assert decoding["decode_mode"] == "ar"
    assert text == direct(reference, "completions", decode_mode="ar")[0]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_responses_endpoint_takes_the_mode(server, reference, stream):
    # (transformers' /v1/responses streams unless the request says `stream: false`, hence the explicit flag)
    response = server.client().responses.create(
        model=SERVED_NAME, input=MESSAGES[0]["content"], max_output_tokens=MAX_TOKENS, stream=stream,
        extra_body=MODE_SETTINGS["diffusion"],
    )
    if stream:
        text = "".join(event.delta for event in response if event.type == "response.output_text.delta")
    else:
        text = response.output_text
    assert text == direct(reference, "chat", **MODE_SETTINGS["diffusion"])[0]


def test_ar_beam_search(server, reference):
    """transformers' own loops still serve AR (beams: no forward counts); beams cannot stream, which is a 400."""
    extra_body = {"decode_mode": "ar", "generation_config": json.dumps({"num_beams": 2})}
    text, decoding = ask(server.client(), "completions", extra_body=extra_body)
    assert text == direct(reference, "completions", decode_mode="ar", num_beams=2)[0]
    assert decoding == {"decode_mode": "ar", "block_size": None, "num_forwards": None, "tokens_per_forward": None}
    with pytest.raises(openai.BadRequestError) as raised:
        ask(server.client(), "completions", stream=True, extra_body=extra_body)
    assert "`streamer` cannot be used with beam search" in raised.value.body["detail"]


def test_models_endpoint_lists_the_served_name(server):
    assert [m.id for m in server.client().models.list()] == [SERVED_NAME]


# ------------------------------------------------------------------------------------------- concurrency
CONCURRENT = [
    ("chat", False, {"decode_mode": "ar"}, None),
    ("completions", True, {"decode_mode": "diffusion", "block_size": 4}, None),
    ("chat", True, {"decode_mode": "linear_spec", "block_size": 4}, None),
    ("completions", False, {"decode_mode": "quadratic_spec", "block_size": 4}, None),
    ("completions", False, {"decode_mode": "linear_spec", "block_size": 2}, 11),  # sampled, seeded
    ("chat", False, {"decode_mode": "diffusion", "block_size": 8, "confidence_threshold": 0.3}, None),
    ("chat", True, {"decode_mode": "quadratic_spec", "block_size": 2}, 12),  # sampled, seeded
    ("completions", True, {"decode_mode": "ar"}, None),
]


def test_concurrent_mixed_modes_each_get_their_solo_output(server, reference):
    max_tokens = 24

    def one(case):
        endpoint, stream, settings, seed = case
        sampling = {} if seed is None else {"temperature": 0.9, "seed": seed}
        return ask(server.client(), endpoint, stream=stream, max_tokens=max_tokens, extra_body=settings, **sampling)

    with concurrent.futures.ThreadPoolExecutor(len(CONCURRENT)) as pool:
        results = list(pool.map(one, CONCURRENT))
    for (endpoint, stream, settings, seed), (text, decoding) in zip(CONCURRENT, results):
        sampling = {} if seed is None else {"do_sample": True, "temperature": 0.9}
        want_text, out = direct(reference, endpoint, max_tokens=max_tokens, seed=seed, **sampling, **settings)
        assert text == want_text, (endpoint, stream, settings, seed)
        assert decoding["num_forwards"] == int(out.num_forwards[0])


def test_200_sequential_requests_bounded_memory(server):
    client = server.client()
    process = psutil.Process(server.process.pid)
    modes = list(MODE_SETTINGS.values())

    def run(i):
        endpoint = ("chat", "completions")[i % 2]
        text, decoding = ask(client, endpoint, stream=i % 3 == 0, max_tokens=2, extra_body=modes[i % len(modes)])
        assert decoding["decode_mode"] == modes[i % len(modes)]["decode_mode"]

    for i in range(20):  # warm-up: allocator pools and lazily built objects settle
        run(i)
    rss_before = process.memory_info().rss
    start = time.perf_counter()
    for i in range(200):
        run(i)
    seconds = time.perf_counter() - start
    growth_mib = (process.memory_info().rss - rss_before) / 2**20
    print(f"\n200 sequential requests in {seconds:.1f} s; server RSS {rss_before / 2**20:.0f} MiB -> "
          f"{process.memory_info().rss / 2**20:.0f} MiB (growth {growth_mib:+.1f} MiB)")
    assert growth_mib < 64


# ---------------------------------------------------------------------------------------------- bad requests
BAD_REQUESTS = {
    "unknown mode": (dict(extra_body={"decode_mode": "turbo"}), 400, ["`decode_mode`='turbo'", "'linear_spec'"]),
    "block size 0": (dict(extra_body={"decode_mode": "diffusion", "block_size": 0}), 400,
                     ["`block_size`=0", "int >= 1"]),
    "threshold 2": (dict(extra_body={"decode_mode": "diffusion", "confidence_threshold": 2}), 400,
                    ["`confidence_threshold`=2", "(0, 1]"]),
    "commit order": (dict(extra_body={"decode_mode": "diffusion", "commit_order": "random"}), 400,
                     ["`commit_order`='random'", "'leftmost'"]),
    "defer repeats": (dict(extra_body={"decode_mode": "diffusion", "defer_adjacent_repeats": "yes"}), 400,
                      ["`defer_adjacent_repeats`='yes'", "True or False"]),
    "malformed json": (dict(extra_body={"generation_config": '{"decode_mode": "ar",'}), 400,
                       ["`generation_config` is not valid JSON", "JSON object"]),
    "json not an object": (dict(extra_body={"generation_config": "[1, 2]"}), 400,
                           ["`generation_config`='[1, 2]'", "JSON object"]),
    "negative max_tokens": (dict(max_tokens=-3), 400, ["`max_tokens`=-3", "int >= 1"]),
    "negative temperature": (dict(temperature=-0.5), 400, ["`temperature`=-0.5", ">= 0"]),
    "quadratic with threshold": (dict(extra_body={"decode_mode": "quadratic_spec", "confidence_threshold": 0.5}),
                                 400, ["`confidence_threshold`=0.5", "decode_mode='quadratic_spec'", "None"]),
    "linear_spec block 1": (dict(extra_body={"decode_mode": "linear_spec", "block_size": 1}), 400,
                            ["`block_size`=1", ">= 2"]),
    "beams in diffusion": (dict(extra_body={"generation_config": json.dumps({"decode_mode": "diffusion",
                                                                             "num_beams": 2})}), 400,
                           ["beam search", "num_beams"]),  # streaming: transformers' streamer refusal first
    "causal_context off in spec": (dict(extra_body={"decode_mode": "linear_spec", "causal_context": False}), 400,
                                   ["`causal_context`=False", "only diffusion"]),
    "beams in diffusion, top-level mode": (dict(extra_body={"decode_mode": "diffusion",
                                                            "generation_config": json.dumps({"num_beams": 2})}),
                                           400, ["beam search", "num_beams"]),
    "tree width 0": (dict(extra_body={"decode_mode": "linear_spec", "tree_width": 0}), 400,
                     ["`tree_width`=0", "int >= 1, or None"]),
    "unknown adapter": (dict(extra_body={"decode_mode": "linear_spec", "drafter_adapter": "nope"}), 400,
                        ["drafter_adapter='nope'", "['drafter']"]),
    "seed out of range": (dict(seed=2**64, temperature=0.5), 400, ["`seed`=18446744073709551616", "[0, 2**64)"]),
    "unknown model": (dict(model="gpt-4"), 400, ["pinned to 'tiny-trimode'", "'gpt-4'"]),
    "unknown field": (dict(extra_body={"decode_mod": "ar"}), 422, ["decode_mod"]),
}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_4xx_and_the_next_request_is_unaffected(server, reference, case, stream):
    kwargs, status, needles = BAD_REQUESTS[case]
    client = server.client()
    kwargs = {"model": SERVED_NAME, "max_tokens": MAX_TOKENS, **kwargs}
    with pytest.raises(openai.APIStatusError) as raised:
        client.chat.completions.create(messages=MESSAGES, stream=stream, **kwargs)
    assert raised.value.status_code == status
    message = json.dumps(raised.value.body)
    detail = raised.value.body["detail"]
    detail = detail if isinstance(detail, str) else json.dumps(detail)
    for needle in needles:
        assert needle in detail, (needle, message)
    # the next request decodes with the folder's defaults, as if the bad one had never been sent
    text, decoding = ask(client, "chat", stream=stream)
    assert {k: decoding[k] for k in DEFAULT_MODE} == DEFAULT_MODE
    assert text == direct(reference, "chat")[0]


# ---------------------------------------------------------------------------------------------- quantized
def test_torchao_int8_server_every_mode(folder):
    """`--quantization torchao-int8`: every mode (streaming too) equals generate() of the same int8 model, and
    self-speculation returns that model's AR text."""
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    reference = load_reference(folder, device_map="cpu", quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))
    server = Server("--model", folder, "--dtype", "float32", "--quantization", "torchao-int8",
                    "--served-model-name", SERVED_NAME)
    try:
        client = server.client()
        for mode, settings in MODE_SETTINGS.items():
            for endpoint, stream in (("completions", False), ("chat", True)):
                text, decoding = ask(client, endpoint, stream=stream, extra_body=settings)
                assert text == direct(reference, endpoint, **settings)[0], (mode, endpoint)
                assert decoding["decode_mode"] == mode
        ar_text, _ = ask(client, "chat", max_tokens=16, extra_body={"decode_mode": "ar"})
        for mode in ("linear_spec", "quadratic_spec"):
            assert ask(client, "chat", max_tokens=16, extra_body={"decode_mode": mode, "block_size": 3})[0] == ar_text
    finally:
        assert server.stop() == 0, server.stderr


# --------------------------------------------------------------------------------------- start-up / shutdown
def _port_is_open(port):
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_startup_and_shutdown_are_clean(folder):
    """Ctrl-C (SIGINT) on a fresh server; the module's server is stopped with SIGTERM and checked the same way."""
    server = Server("--model", folder, "--drafter", "none", "--served-model-name", SERVED_NAME)
    process = psutil.Process(server.process.pid)
    try:
        text, decoding = ask(server.client(), "completions", max_tokens=3, extra_body={"decode_mode": "ar"})
        assert decoding["decode_mode"] == "ar"
        assert process.children(recursive=True) == []  # no worker processes to leak
    finally:
        status = server.stop(signal.SIGINT)
    assert status == 0, server.stderr
    assert "Traceback" not in server.stderr, server.stderr
    assert not psutil.pid_exists(server.process.pid) or process.status() == psutil.STATUS_ZOMBIE
    assert not _port_is_open(server.port)


def test_bad_model_fails_before_listening(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "nemotron_diffusion.cli", "serve", "--model", tmp_path / "missing", "--port", "0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "--model" in result.stderr and "no such folder" in result.stderr
    assert "Traceback" not in result.stderr and " on http://" not in result.stderr
