"""One ViT-L forward (one prompt + one query): this project vs Hugging Face, fp32 and bf16.

Each configuration runs in its own process so that peak RSS is its own; configurations
are interleaved over rounds so machine noise hits them alike.  Random weights: speed
and memory do not depend on the values.

    python benchmarks/speed.py [--repeats 3] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

CONFIGS = [("ours", "fp32"), ("hf", "fp32"), ("ours", "bf16"), ("hf", "bf16")]


def child(impl: str, dtype: str, repeats: int) -> dict:
    import torch

    from seggpt_model import SegGPTConfig
    from seggpt_model.testing import random_model

    torch.manual_seed(0)
    model = random_model(SegGPTConfig.vit_large())
    imgs, tgts = torch.randn(1, 3, 896, 448), torch.randn(1, 3, 896, 448)
    if impl == "ours":
        if dtype == "bf16":
            model = model.to(torch.bfloat16)
        run = lambda: model(imgs, tgts)  # noqa: E731
    else:
        from transformers import SegGptConfig, SegGptForImageSegmentation

        from seggpt_model.weights import hf_config, official_to_hf_key
        cfg = {k: v for k, v in hf_config(model.config).items() if k not in ("model_type", "architectures")}
        hf = SegGptForImageSegmentation(SegGptConfig(**cfg)).eval()
        hf.load_state_dict({official_to_hf_key(k): v for k, v in model.state_dict().items()})
        del model

        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                return hf(pixel_values=imgs[:, :, 448:], prompt_pixel_values=imgs[:, :, :448],
                          prompt_masks=tgts[:, :, :448]).pred_masks
    times = []
    with torch.inference_mode():
        run()  # warm-up
        for _ in range(repeats):
            t = time.perf_counter()
            run()
            times.append(time.perf_counter() - t)
    return {"impl": impl, "dtype": dtype, "times": times,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", nargs=2, metavar=("IMPL", "DTYPE"))
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.repeats)))
        return
    results = {}
    for impl, dtype in CONFIGS:
        out = subprocess.run([sys.executable, __file__, "--child", impl, dtype, "--repeats", str(args.repeats)],
                             capture_output=True, text=True, check=True)
        results[(impl, dtype)] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{'impl':6} {'dtype':5} {'median s':>9} {'min s':>7} {'vs HF':>6} {'peak RSS MB':>12}")
    rows = []
    for impl, dtype in CONFIGS:
        r = results[(impl, dtype)]
        med = statistics.median(r["times"])
        ref = statistics.median(results[("hf", dtype)]["times"])
        r.update(median_s=med, speedup_vs_hf=ref / med)
        rows.append(r)
        print(f"{impl:6} {dtype:5} {med:9.2f} {min(r['times']):7.2f} {ref / med:5.2f}x {r['peak_rss_mb']:12.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
