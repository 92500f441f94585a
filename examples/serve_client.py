"""One prompt through a running `nemotron-diffusion serve`, in every mode, with the official OpenAI client.

    nemotron-diffusion serve &                      # the demo model on http://127.0.0.1:8000/v1
    python examples/serve_client.py [--base-url http://127.0.0.1:8000/v1] [--model nemotron-diffusion-demo]

Prints each mode's reply and a table of the `"decoding"` field (forwards, tokens per forward) and the time the
request took, and checks that self-speculation returned exactly the AR text (both are greedy here).
"""

import argparse
import time

from openai import OpenAI


MODES = {
    "ar": {"decode_mode": "ar"},
    "diffusion": {"decode_mode": "diffusion", "block_size": 8},
    "linear_spec": {"decode_mode": "linear_spec", "block_size": 8},
    "quadratic_spec": {"decode_mode": "quadratic_spec", "block_size": 4},
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default="nemotron-diffusion-demo", help="the server's --served-model-name")
    parser.add_argument("--prompt", default="Explain in three sentences why the sky is blue.")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    client = OpenAI(base_url=args.base_url, api_key="unused")
    messages = [{"role": "user", "content": args.prompt}]
    rows, texts = [], {}
    for mode, fields in MODES.items():
        start = time.perf_counter()
        reply = client.chat.completions.create(
            model=args.model, messages=messages, max_tokens=args.max_tokens, temperature=0, extra_body=fields
        )
        seconds = time.perf_counter() - start
        texts[mode] = reply.choices[0].message.content
        decoding = reply.model_extra["decoding"]
        tokens = reply.usage.completion_tokens
        rows.append((mode, tokens, decoding["num_forwards"], decoding["tokens_per_forward"], seconds))
        print(f"--- {mode}\n{texts[mode]}\n")

    print("| mode | tokens | forwards | tokens / forward | seconds | tok/s |")
    print("|---|---|---|---|---|---|")
    for mode, tokens, forwards, per_forward, seconds in rows:
        print(f"| {mode} | {tokens} | {forwards} | {per_forward:.2f} | {seconds:.2f} | {tokens / seconds:.1f} |")
    for mode in ("linear_spec", "quadratic_spec"):
        print(f"{mode} text == AR text: {texts[mode] == texts['ar']}")


if __name__ == "__main__":
    main()
