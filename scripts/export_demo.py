"""Write a trained checkpoint as the bundled demo model: fp16 safetensors (half the bytes).

    python scripts/export_demo.py runs/demo/seggpt_demo.safetensors seggpt_model/assets/demo/seggpt_demo.safetensors
"""
from __future__ import annotations

import sys
from pathlib import Path

from safetensors.torch import save_file

from seggpt_model import load_seggpt


def main(src: str, dst: str) -> None:
    model = load_seggpt(src)  # strict: only a loadable SegGPT gets exported
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()}, dst)
    back = load_seggpt(dst)
    assert back.config == model.config
    print(f"wrote {dst} ({Path(dst).stat().st_size / 1e6:.1f} MB), config {model.config}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
