"""Linear products of the demo's shapes on a CPU in bfloat16: F.linear, a prepacked oneDNN weight, weight-only int8.

    python -m benchmarks.packed_linear [--rows 1,4,8,16] [--out benchmarks/results/packed_linear_cpu]

Per shape of the 135M demo (576 hidden, 1536 MLP, 192 key/value, 49152 vocabulary) and per number of rows, the
median time of one product, over `--layers` distinct weights called in turn (as a forward calls its 30 layers: the
weights do not stay in the caches), the three kinds interleaved per round. Also checks that the packed product is
bit-identical to F.linear. Prints a table; writes PREFIX.json and PREFIX.md with --out.
"""

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from nemotron_diffusion.int8_nemotron_diffusion import int8_linear, int8_supported, quantize_int8
from nemotron_diffusion.packed_nemotron_diffusion import PackedWeight, packed_linear, packing_supported

SHAPES = {"q/o 576x576": (576, 576), "k/v 192x576": (192, 576), "gate/up 1536x576": (1536, 576),
          "down 576x1536": (576, 1536), "head 49152x576": (49152, 576)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,4,8,16")
    parser.add_argument("--layers", type=int, default=30, help="distinct weights per shape (the head: 2)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    probe = torch.zeros(2, 2, dtype=torch.bfloat16)
    if not packing_supported(probe):
        raise SystemExit("this CPU's oneDNN has no bfloat16 kernels: nothing to measure")
    use_int8 = int8_supported("cpu", torch.bfloat16)
    rows = [int(r) for r in args.rows.split(",")]
    results = []
    for name, (out_features, in_features) in SHAPES.items():
        count = 2 if out_features > 10000 else args.layers
        torch.manual_seed(0)
        weights = [torch.randn(out_features, in_features).bfloat16() for _ in range(count)]
        packs = [PackedWeight() for _ in weights]
        int8s = [quantize_int8(w) for w in weights] if use_int8 else []
        for m in rows:
            x = torch.randn(m, in_features).bfloat16()
            identical = all(torch.equal(packed_linear(x, w, None, p), F.linear(x, w)) for w, p in zip(weights, packs))
            kinds = {"F.linear": lambda: [F.linear(x, w) for w in weights],
                     "packed": lambda: [packed_linear(x, w, None, p) for w, p in zip(weights, packs)]}
            if use_int8:
                kinds["int8"] = lambda: [int8_linear(x, q, s) for q, s in int8s]
            times = {k: [] for k in kinds}
            for _ in range(2):
                for f in kinds.values():
                    f()
            for _ in range(args.rounds):
                for k, f in kinds.items():
                    start = time.perf_counter()
                    f()
                    times[k].append((time.perf_counter() - start) / count * 1e6)
            row = {"shape": name, "rows": m, "identical": identical}
            row.update({f"{k}_us": statistics.median(v) for k, v in times.items()})
            results.append(row)
            print(f"{name:18s} rows {m:3d}: " + "  ".join(f"{k} {row[f'{k}_us']:7.0f} us" for k in kinds)
                  + f"  packed==F.linear {identical}", flush=True)
    machine = f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)"
    if args.out:
        with open(args.out + ".json", "w") as f:
            json.dump({"machine": machine, "layers": args.layers, "rounds": args.rounds, "results": results}, f,
                      indent=1)
        kinds = [k for k in ("F.linear", "packed", "int8") if f"{k}_us" in results[0]]
        lines = [f"# Linear products in bfloat16 on a CPU ({machine})", "",
                 f"Median µs per product over {args.rounds} interleaved rounds, {args.layers} distinct weights per "
                 "shape (2 for the head) called in turn. `python -m benchmarks.packed_linear`.", "",
                 "| shape | rows | " + " | ".join(kinds) + " | packed / F.linear | packed bit-identical |",
                 "|---|---|" + "---|" * len(kinds) + "---|---|"]
        for r in results:
            lines.append(f"| {r['shape']} | {r['rows']} | " + " | ".join(f"{r[f'{k}_us']:.0f}" for k in kinds)
                         + f" | {r['packed_us'] / r['F.linear_us']:.2f} | {r['identical']} |")
        with open(args.out + ".md", "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
