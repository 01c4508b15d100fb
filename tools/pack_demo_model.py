"""Package a trained model as the embedded demo model (cod/assets/demo-model): its EMA weights in float16
(half the size: 14 MB for mini-pixel, within the 25 MB a wheel should carry) and a model card that says where it
came from. The source is a model directory (`model.export_dir` of `cod fit`) or a Lightning checkpoint of that
run (its EMA weights).

    python tools/pack_demo_model.py runs/demo-model/model            # or .../checkpoints/step=8000.ckpt
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="model directory, or Lightning checkpoint of conf/demo-model.yaml")
    ap.add_argument("--out", default=str(ROOT / "cod" / "assets" / "demo-model"))
    ap.add_argument("--note", default="", help="a line for the model card (training command, steps, date)")
    a = ap.parse_args()

    import cod
    from cod.model import CoDModel

    source = Path(a.source)
    if source.is_dir():
        model = cod.load(source)
        step = "?"
    else:
        from cod.training.module import CoDTrainingModule

        import inspect

        ckpt = torch.load(source, map_location="cpu", weights_only=True)
        accepted = inspect.signature(CoDTrainingModule).parameters
        module = CoDTrainingModule(**{k: v for k, v in ckpt["hyper_parameters"].items() if k in accepted})
        module.load_state_dict(ckpt["state_dict"])
        model = CoDModel(module.model_config, module.ema.module.eval())
        step = ckpt["global_step"]
    card = {"title": "the embedded demo model of `cod demo`",
            "provenance": f"`cod fit --config conf/demo-model.yaml` (EMA weights at step {step}), weights stored "
                          f"in float16 by tools/pack_demo_model.py", "training data": "../shared/data/train256 "
                          "(499 photos, 256x256; the demo's scikit-image photos are not among them)"}
    if a.note:
        card["note"] = a.note
    model.save(a.out, card=card, overwrite=True, weights_dtype=torch.float16)
    size = sum(p.stat().st_size for p in Path(a.out).iterdir())
    print(f"wrote {a.out}: {size / 1e6:.1f} MB, fingerprint {cod.load(a.out).fingerprint[:16]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
