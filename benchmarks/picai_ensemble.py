"""The PI-CAI baseline's five-fold ensemble with horizontal-flip TTA per study: ONNX Runtime (the
ensemble as `radtriage models import-picai-unet` writes it, run by the one executor
`models.pipeline.forward_map`) vs PyTorch eager (the same folds' state dicts in
`models.networks.picai_unet`, through the same executor), in one run on the same input.

Probe folds with seeded random weights (weights do not change the compute). The input is
ProstateX-0001 prepared by the declared pipeline when ../shared/data is there, else a random
case of the same shape. Alternates the two runtimes per repeat so load from elsewhere falls on
both. Writes benchmarks/results/picai_ensemble.json.

    python -m benchmarks.picai_ensemble [--folds 5] [--repeats 1] [--threads N] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.metadata import ModelMetadata
from models.networks import picai_unet
from models.onnx_runner import OnnxModel
from models.pipeline import forward_map
from training.picai_import import SHAPE_ZYX, import_picai_unet

OUT = Path(__file__).with_name("results") / "picai_ensemble.json"
PROSTATEX = Path(__file__).resolve().parents[2] / "shared" / "data" / "prostatex" / "ProstateX-0001"


def _study_input(md: ModelMetadata) -> tuple[np.ndarray, str]:
    if PROSTATEX.is_dir():
        from imaging.study_volumes import load_study_volumes
        from models.preprocessing import prepare_case

        v = load_study_volumes(PROSTATEX)
        prepared = prepare_case(v.t2w, v.adc, v.hbv, md.input_spec)
        return prepared.model_input(md.input_spec.channels), "ProstateX-0001"
    x = np.random.default_rng(0).standard_normal((3, *SHAPE_ZYX)).astype(np.float32)
    return x, "random"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="radtriage-bench-") as tmp:
        weights = Path(tmp) / "weights"
        weights.mkdir()
        nets = []
        for fold in range(args.folds):
            torch.manual_seed(fold)
            net = picai_unet().eval()
            torch.save({"model_state_dict": net.state_dict()}, weights / f"unet_F{fold}.pt")
            nets.append(net.to(device))
        started = time.perf_counter()
        import_picai_unet(weights, name="picai_unet", version="bench", repository=Path(tmp))
        import_s = time.perf_counter() - started
        model = OnnxModel.load(
            Path(tmp), "picai_unet:bench", device=args.device, threads=args.threads
        )
        md = model.metadata
        x, source = _study_input(md)

        def eager(net: torch.nn.Module) -> Any:
            def run(batch: np.ndarray) -> np.ndarray:
                with torch.no_grad():
                    return net(torch.from_numpy(batch).to(device)).cpu().numpy()

            return run

        runtimes = {
            "onnxruntime": lambda: forward_map(md, model.member_runs(), x),
            "torch_eager": lambda: forward_map(md, [eager(n) for n in nets], x),
        }
        maps = {name: fn() for name, fn in runtimes.items()}  # warm-up, and the agreement
        times: dict[str, list[float]] = {name: [] for name in runtimes}
        for _ in range(args.repeats):
            for name, fn in runtimes.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    per_study = {name: float(np.median(t)) for name, t in times.items()}
    doc = {
        "what": f"PI-CAI U-Net ensemble, {args.folds} folds x 2 (flip TTA), one study",
        "input": source,
        "device": args.device,
        "providers": model.providers,
        "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "load_average": os.getloadavg()[0],
        "s_per_study": per_study,
        "onnxruntime_speedup": per_study["torch_eager"] / per_study["onnxruntime"],
        "max_abs_diff_maps": float(np.max(np.abs(maps["onnxruntime"] - maps["torch_eager"]))),
        "import_s": import_s,
        "repeats": args.repeats,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(doc, indent=2))
    return doc


if __name__ == "__main__":
    main()
