"""`nemotron-diffusion convert`: Llama / Mistral / Ministral3 checkpoints (folder or GGUF) into the tri-mode format,
or an NVIDIA Nemotron-Labs-Diffusion folder rewritten to use this package's remote code."""

from ..cli import UserError

HELP = "convert a Llama / Mistral / Ministral3 folder or GGUF file (or an NVIDIA folder) into the tri-mode format"


def add_arguments(parser):
    parser.add_argument("src", help="source model folder or .gguf file (with --from-nvidia: NVIDIA's folder)")
    parser.add_argument("dst", help="output folder (must be new or empty unless --overwrite)")
    parser.add_argument("--from-nvidia", action="store_true",
                        help="src is an NVIDIA Nemotron-Labs-Diffusion folder: write our remote code and auto_map, "
                             "weights untouched")
    parser.add_argument("--link", choices=("hardlink", "symlink", "copy"), default="hardlink",
                        help="--from-nvidia: how the weight files are carried over (default: hardlink, else copy)")
    parser.add_argument("--mask-token", default=None,
                        help="token (string, or an integer id) to use as the mask; default: a mask-like or reserved "
                             "special token if the tokenizer has one, else a new <|mask|> token")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="dtype of the saved weights (default: the source's; GGUF dequantizes to float32)")
    parser.add_argument("--no-verify", action="store_true", help="skip the AR logits check against the source")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty dst")


def run(args):
    import torch

    from ..convert import convert_checkpoint, convert_nvidia_folder

    try:
        if args.from_nvidia:
            written = convert_nvidia_folder(args.src, args.dst, link=args.link, overwrite=args.overwrite)
            print(f"wrote {args.dst}: {', '.join(written)}")
            return 0
        mask = args.mask_token
        if mask is not None and mask.isdigit():
            mask = int(mask)
        dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
        report = convert_checkpoint(args.src, args.dst, mask_token=mask, dtype=dtype, verify=not args.no_verify,
                                    overwrite=args.overwrite)
    except (ValueError, TypeError) as error:
        raise UserError(str(error)) from error
    print(report.summary())
    return 0
