"""ViT-L SegGPT speed: this project's fast path vs Hugging Face, in one run.

Cases: one (prompt, query) pair; K = 4 prompts for one query (feature ensemble); a batch of
4 queries with one prompt.  fp32 and bf16 (ours: bf16 weights; HF: bf16 autocast, as
measured in the reference).  Each (implementation, dtype) runs in its own process so peak
RSS is its own; random weights (speed does not depend on values).  Reports seconds per
query (median), the ratio to HF, the share of this machine's bf16/fp32 matmul peak (measured
in the same run; K prompts count as K pairs of work) and peak RSS, and what K = 4 costs over one pair.

    python benchmarks/speed.py [--repeats 2] [--cases pair,k4,batch4] [--impls ours,hf] [--json out.json]

``--impls ours,ours-compile,hf`` adds the fast path under torch.compile (inductor; compile time
is excluded, it is spent in the warm-up run of each case).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

PAIR_GFLOP = 1589.7  # FlopCounterMode on the HF model, one pair (reference/cpu-performance.md)
CASES = {"pair": (1, 1), "k4": (4, 1), "batch4": (1, 4)}  # (prompts, queries)


def matmul_peak(dtype_name: str) -> float:
    """GFLOP/s of a 4096^3 matmul on this machine, best of 3."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a, b = torch.randn(4096, 4096, dtype=dtype), torch.randn(4096, 4096, dtype=dtype)
    a @ b
    best = min(_time(lambda: a @ b) for _ in range(3))
    return 2 * 4096 ** 3 / best / 1e9


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def child(impl: str, dtype_name: str, cases: list[str], repeats: int, config: str) -> dict:
    import torch

    from seggpt_model import SegGPTConfig
    from seggpt_model.fast import FastPainter
    from seggpt_model.testing import random_model

    torch.manual_seed(0)
    model = random_model(getattr(SegGPTConfig, config)())
    s = model.config.image_size
    bf16 = dtype_name == "bf16"
    if impl.startswith("ours"):
        if bf16:
            model = model.to(torch.bfloat16)
        painter = FastPainter(model)
        if impl == "ours-compile":  # compiled per (K, Q) shape by its warm-up run
            painter = torch.compile(painter.__call__, dynamic=False)

        def run(k, q, x):
            return painter(x["p_img"][:k], x["p_mask"][:k], x["q"][:q])
    else:
        from transformers import SegGptConfig, SegGptForImageSegmentation

        from seggpt_model.weights import hf_config, official_to_hf_key
        cfg = {k: v for k, v in hf_config(model.config).items() if k not in ("model_type", "architectures")}
        hf = SegGptForImageSegmentation(SegGptConfig(**cfg)).eval()
        hf.load_state_dict({official_to_hf_key(k): v for k, v in model.state_dict().items()})
        del model

        def run(k, q, x):  # HF batches pairs: K prompts = K copies of the query, ensembled
            n = max(k, q)
            p_img = x["p_img"][:k].repeat(n // k, 1, 1, 1)
            p_mask = x["p_mask"][:k].repeat(n // k, 1, 1, 1)
            queries = x["q"][:q].repeat(n // q, 1, 1, 1)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                return hf(pixel_values=queries, prompt_pixel_values=p_img, prompt_masks=p_mask,
                          feature_ensemble=k > 1).pred_masks
    g = torch.Generator().manual_seed(1)
    x = {name: torch.randn(4, 3, s, s, generator=g) for name in ("p_img", "p_mask", "q")}
    out = {"impl": impl, "dtype": dtype_name, "cases": {}}
    with torch.no_grad() if impl == "ours-compile" else torch.inference_mode():  # compile cannot trace the latter
        for case in cases:
            k, q = CASES[case]
            run(k, q, x)  # warm-up
            times = [_time(lambda: run(k, q, x)) for _ in range(repeats)]
            out["cases"][case] = {"s_per_query": [t / q for t in times], "prompts": k, "queries": q}
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--cases", default="pair,k4,batch4")
    ap.add_argument("--impls", default="ours,hf")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--config", default="vit_large", help="SegGPTConfig factory: vit_large or tiny (smoke test)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", nargs=2, metavar=("IMPL", "DTYPE"))
    args = ap.parse_args()
    cases = args.cases.split(",")
    if args.child:
        print(json.dumps(child(*args.child, cases, args.repeats, args.config)))
        return
    peaks = {d: matmul_peak(d) for d in args.dtypes.split(",")}
    results = {}
    for dtype in args.dtypes.split(","):
        for impl in args.impls.split(","):
            proc = subprocess.run([sys.executable, __file__, "--child", impl, dtype, "--repeats", str(args.repeats),
                                   "--cases", args.cases, "--config", args.config], capture_output=True, text=True, check=True)
            results[(impl, dtype)] = json.loads(proc.stdout.strip().splitlines()[-1])
    print("matmul peak (4096^3): " + ", ".join(f"{d} {p:.0f} GFLOP/s" for d, p in peaks.items()))
    print(f"{'case':7} {'impl':12} {'dtype':5} {'s/query':>8} {'vs HF':>6} {'% peak':>7} {'peak RSS MB':>11}")
    rows = []
    for case in cases:
        k, _ = CASES[case]
        for dtype in args.dtypes.split(","):
            for impl in args.impls.split(","):
                r = results[(impl, dtype)]
                med = statistics.median(r["cases"][case]["s_per_query"])
                hf = results.get(("hf", dtype))
                ratio = statistics.median(hf["cases"][case]["s_per_query"]) / med if hf else float("nan")
                pct = 100 * PAIR_GFLOP * k / med / peaks[dtype] if args.config == "vit_large" else float("nan")
                rows.append({"case": case, "impl": impl, "dtype": dtype, "s_per_query": med, "vs_hf": ratio,
                             "pct_peak": pct, "peak_rss_mb": r["peak_rss_mb"]})
                print(f"{case:7} {impl:12} {dtype:5} {med:8.2f} {ratio:5.2f}x {pct:6.1f}% {r['peak_rss_mb']:11.0f}")
    med = {(r["case"], r["impl"], r["dtype"]): r["s_per_query"] for r in rows}
    ensemble_cost = {f"{impl} {dtype}": med[("k4", impl, dtype)] / med[("pair", impl, dtype)]
                     for (case, impl, dtype) in med if case == "pair" and ("k4", impl, dtype) in med}
    for name, ratio in ensemble_cost.items():
        print(f"K=4 prompts / one pair, {name}: {ratio:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"peaks_gflops": peaks, "rows": rows, "k4_over_pair": ensemble_cost}, f, indent=2)


if __name__ == "__main__":
    main()
