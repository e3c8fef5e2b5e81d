"""ONNX Runtime vs PyTorch eager for the csPCa detector on this CPU, and studies/hour for one
replica of the full analysis (DICOM load -> preprocess -> both models -> postprocess -> SR/SEG).

Same network, same weights, same input, same thread count, both measured in this one run.
Uses the bundled models' architecture and grid when they exist, else the default MONAI UNet
configs on `--shape` (weights do not change the compute). Writes benchmarks/results/inference.json.

    python -m benchmarks.inference [--threads N] [--repeats R] [--studies S]
    python -m benchmarks.inference --grid picai    # 3 x 20x256x256 at 0.5x0.5x3.0 mm

`--grid picai` measures the bundled network architecture (random weights: a speed measurement)
on the PI-CAI baseline's grid, 3 channels x 20x256x256 voxels at 0.5x0.5x3.0 mm, writing
benchmarks/results/inference_picai.json. CPU only: no GPU is lent to this workplace.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

OUT = Path(__file__).with_name("results") / "inference.json"
OUT_PICAI = Path(__file__).with_name("results") / "inference_picai.json"
PICAI_SHAPE_ZYX = (20, 256, 256)
PICAI_SPACING_XYZ = (0.5, 0.5, 3.0)


def _timed_pair(a: Any, b: Any, repeats: int) -> tuple[list[float], list[float]]:
    """Time `a` and `b` alternately (after one warm-up each), so that load from elsewhere on a
    shared machine falls on both alike rather than on whichever ran during a spike."""
    a(), b()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, out in ((a, times[0]), (b, times[1])):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return times


def _picai(spec: Any, gspec: Any) -> tuple[Any, Any]:
    """The same input specs moved onto the PI-CAI baseline's grid."""
    update = {"shape_zyx": PICAI_SHAPE_ZYX, "spacing_xyz": PICAI_SPACING_XYZ}
    return spec.model_copy(update=update), gspec.model_copy(update=update)


def _nets(shape: tuple[int, int, int]) -> tuple[Any, ...]:
    """(detector net, detector config, gland net, gland config, input spec) for the benchmark."""
    from models.networks import NetworkConfig, build_network, detector_config, gland_config
    from models.repository import ModelRepository

    repo = ModelRepository()
    try:
        md = repo.resolve("cspca_detector").metadata
        gmd = repo.resolve("prostate_gland").metadata
        d_cfg, g_cfg = NetworkConfig.from_dict(md.network), NetworkConfig.from_dict(gmd.network)
        spec, gspec, source = md.input_spec, gmd.input_spec, "bundled model architecture"
    except Exception:
        from models.metadata import InputSpec, Normalisation

        d_cfg, g_cfg = detector_config(), gland_config()
        norm = tuple(Normalisation(channel=c) for c in ("t2w", "adc", "hbv"))
        spec = InputSpec(
            spacing_xyz=(0.5 * 256 / shape[2], 0.5 * 256 / shape[1], 3.0),
            shape_zyx=shape,
            channels=("t2w", "adc", "hbv"),
            normalisation=norm,
        )
        gspec = spec.model_copy(update={"channels": ("t2w",), "normalisation": norm[:1]})
        source = "default UNet configs (no bundled model)"
    return (
        build_network(d_cfg).eval(),
        d_cfg,
        build_network(g_cfg).eval(),
        g_cfg,
        spec,
        gspec,
        source,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--studies", type=int, default=3)
    p.add_argument("--shape", type=int, nargs=3, default=(24, 96, 96), metavar=("Z", "Y", "X"))
    p.add_argument(
        "--grid",
        choices=("bundled", "picai"),
        default="bundled",
        help="bundled: the bundled models' grid; picai: 3 x 20x256x256 at 0.5x0.5x3.0 mm",
    )
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.out is None:
        args.out = OUT_PICAI if args.grid == "picai" else OUT

    import onnxruntime as ort
    import torch

    from cli.composition import build_analyser, build_engine
    from core.settings import ModelSettings, Settings
    from imaging.study_reader import scan_study
    from models.metadata import ThresholdSpec
    from training.export import export_model
    from training.phantoms import synthesize_case, write_study

    torch.set_num_threads(args.threads)
    det, d_cfg, gland, g_cfg, spec, gspec, source = _nets(tuple(args.shape))
    if args.grid == "picai":
        spec, gspec = _picai(spec, gspec)
        source += ", on the PI-CAI grid (random weights)"
    tmp = Path(tempfile.mkdtemp(prefix="radtriage-bench-"))
    rng = np.random.default_rng(0)
    x1 = rng.normal(size=(1, len(spec.channels), *spec.shape_zyx)).astype(np.float32)
    export_model(
        det,
        repository=tmp,
        name="cspca_detector",
        version="1",
        task="cspca_detection",
        network=d_cfg,
        input_spec=spec,
        output_channels=("cspca_likelihood",),
        parity_inputs=x1,
        thresholds=ThresholdSpec(urgent=0.5, soon=0.2, source="bench"),
    )
    export_model(
        gland,
        repository=tmp,
        name="prostate_gland",
        version="1",
        task="gland_segmentation",
        network=g_cfg,
        input_spec=gspec,
        output_channels=("background", "pz", "tz"),
        parity_inputs=x1[:, :1],
    )
    from models.onnx_runner import OnnxModel
    from models.repository import ModelRepository

    ModelRepository(tmp).promote("cspca_detector:1", reason="bench", user="bench")
    ModelRepository(tmp).promote("prostate_gland:1", reason="bench", user="bench")
    onnx = OnnxModel.load(tmp, "cspca_detector", device="cpu", threads=args.threads)

    rows = []
    for batch in (1, 2, 4):
        x = rng.normal(size=(batch, *x1.shape[1:])).astype(np.float32)
        xt = torch.from_numpy(x)
        with torch.inference_mode():
            t_torch, t_ort = _timed_pair(
                lambda xt=xt: det(xt), lambda x=x: onnx.run(x), args.repeats
            )
        with torch.inference_mode():
            diff = float(np.abs(det(xt).numpy() - onnx.run(x)).max())
        rows.append(
            {
                "batch": batch,
                "torch_eager_ms": round(1000 * statistics.median(t_torch), 1),
                "onnxruntime_ms": round(1000 * statistics.median(t_ort), 1),
                "speedup_ort_over_torch": round(
                    statistics.median(t_torch) / statistics.median(t_ort), 2
                ),
                "ort_ms_per_study": round(1000 * statistics.median(t_ort) / batch, 1),
                "max_abs_diff": diff,
            }
        )
        print(json.dumps(rows[-1]))

    engine = build_engine(ModelSettings(repository=tmp), "cpu")
    analyser = build_analyser(Settings(), engine, tmp / "results")
    studies = [
        write_study(synthesize_case(100 + i, cspca=bool(i % 2)), tmp / "studies")
        for i in range(args.studies)
    ]
    analyser.analyse(scan_study(studies[0]), tmp / "warm")
    per_study = []
    stages: dict[str, list[float]] = {}
    for i, study in enumerate(studies):
        t = time.perf_counter()
        a = analyser.analyse(scan_study(study), tmp / f"out{i}")
        per_study.append(time.perf_counter() - t)
        for k, v in a.result.timings_ms.items():
            stages.setdefault(k, []).append(v)
    median_s = statistics.median(per_study)
    report = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "threads": args.threads,
            "onnxruntime": ort.__version__,
            "torch": torch.__version__,
            "providers": onnx.providers,
        },
        "gpu": "none lent to this workplace: CPU only",
        "detector": {
            "source": source,
            "grid": args.grid,
            "spacing_xyz": list(spec.spacing_xyz),
            "input_shape": list(x1.shape[1:]),
            "network": d_cfg.as_dict(),
        },
        "ort_vs_torch": rows,
        "one_replica": {
            "studies": args.studies,
            "median_s_per_study": round(median_s, 2),
            "studies_per_hour": round(3600 / median_s),
            "median_stage_ms": {k: round(statistics.median(v), 1) for k, v in stages.items()},
            "note": "sequential, one process, threads as above; phantom studies (classic MR)",
        },
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["one_replica"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
