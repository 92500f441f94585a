"""`nemotron-diffusion serve`: an OpenAI-compatible endpoint (transformers' server), the decoding mode per request."""

import sys

from ..cli import UserError
from .common import add_model_arguments, load_model


HELP = "serve a model over an OpenAI-compatible HTTP API (transformers' server), the decoding mode chosen per request"

ATTENTION_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")


def add_arguments(parser):
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one (default 8000)")
    parser.add_argument(
        "--served-model-name", default=None, metavar="NAME",
        help="the `model` name clients send (default: --model as given, or 'nemotron-diffusion-demo')",
    )
    parser.add_argument(
        # the choices of serving.QUANTIZATION_METHODS, written out so that --help works without the serve extras
        "--quantization", default=None, choices=("torchao-int8", "bnb-8bit", "bnb-4bit"),
        help="load the weights quantized with transformers' TorchAoConfig (int8 weight-only, CPU or GPU) or "
        "BitsAndBytesConfig (GPU)",
    )
    parser.add_argument(
        "--attn-implementation", default=None, choices=ATTENTION_IMPLEMENTATIONS,
        help="attention backend (default: the model's choice)",
    )
    parser.add_argument(
        "--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"),
        help="uvicorn's log level (default warning)",
    )


def run(args):
    try:
        from .. import serving
    except ImportError as error:
        raise UserError(
            f"serving needs transformers' serving extras: pip install 'nemotron-diffusion[serve]' ({error})"
        ) from None
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port} is not a port number (0-65535; 0 picks a free one)")
    try:
        quantization = serving.quantization_config(args.quantization)
    except ImportError as error:
        hint = "pip install 'nemotron-diffusion[quant]'"
        if args.quantization.startswith("bnb"):
            hint = "pip install bitsandbytes (GPU)"
        raise UserError(f"--quantization {args.quantization} needs a missing package ({error}): {hint}") from None
    served_name = args.served_model_name or args.model or "nemotron-diffusion-demo"
    # The model is loaded now (the manager preloads it), so a bad --model fails before the port is opened.
    manager = serving.TriModeModelManager(
        lambda: load_model(args, quantization_config=quantization, attn_implementation=args.attn_implementation),
        served_name,
    )
    app = serving.build_app(manager)

    def announce(host, port):
        import transformers

        print(
            f"nemotron-diffusion serve: {served_name!r} on http://{host}:{port}/v1 "
            f"(transformers {transformers.__version__}; Ctrl-C stops)",
            file=sys.stderr,
            flush=True,
        )

    try:
        serving.serve(app, args.host, args.port, log_level=args.log_level, on_listening=announce)
    except OSError as error:  # the address is taken or not ours
        raise UserError(f"cannot listen on {args.host}:{args.port}: {error}") from None
    finally:
        manager.shutdown()
    return 0
