"""Sampling synthetic normal data from a trained VAE model file.

The model file is the only input: its metadata `anomalyd.vae` names the latent tensor (the mean
mu of the encoder). The sub-graph from that tensor to `reconstruction` is the decoder followed by
the de-normalisation, so decoding z ~ N(0, I) gives samples in raw units. Unless `noise` is off,
Gaussian observation noise is added with the per-feature residual variance that the model showed
on held-back data (`feature_mean` of the calibration, in normalised units, times std^2).
"""

from __future__ import annotations

import csv
import json
import sys

import numpy as np
import onnx
from onnx.utils import Extractor

from .data import DataError
from .export import session


def decoder(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, str, int]:
    meta = {p.key: p.value for p in proto.metadata_props}
    if meta.get("anomalyd.kind") != "vae" or "anomalyd.vae" not in meta:
        raise DataError(f"generate needs a model of kind vae, this one is {meta.get('anomalyd.kind')!r}")
    vae = json.loads(meta["anomalyd.vae"])
    name, k = vae["latent_tensor"], int(vae["latent"])
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    proto.graph.value_info.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, ["batch", k]))
    sub = Extractor(proto).extract_model([name], ["reconstruction"])
    return sub, name, k


def generate(path: str, n: int, seed: int = 0, noise: bool = True) -> tuple[list[str], np.ndarray]:
    """Returns (features, samples [n, window, F]) in raw units."""
    if n < 1:
        raise DataError(f"-n must be at least 1, got {n}")
    proto = onnx.load(path)
    meta = {p.key: p.value for p in proto.metadata_props}
    sub, latent_name, k = decoder(proto)
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, k)).astype(np.float32)
    (samples,) = session(sub).run(["reconstruction"], {latent_name: z})
    if noise:
        # The likelihood's noise, sigma^2 per value (normalised); a VAE written before it was
        # stated has its mean error per feature instead, the same estimate then.
        norm = json.loads(meta["anomalyd.normalisation"])
        arch = json.loads(meta["anomalyd.training"]).get("architecture", {})
        var = arch.get("noise_variance") or json.loads(meta["anomalyd.calibration"])["feature_mean"]
        sd = np.sqrt(np.asarray(var)) * np.asarray(norm["std"])
        samples = samples + sd * rng.standard_normal(samples.shape)
    return json.loads(meta["anomalyd.features"]), samples.astype(np.float32)


def write(out: str, features: list[str], samples: np.ndarray) -> None:
    """CSV (or NDJSON for a .ndjson path): one row per sample; windows of T > 1 rows get columns
    `sample` and `step`."""
    n, t, _ = samples.shape
    records = []
    for i in range(n):
        for s in range(t):
            rec = {"sample": i, "step": s} if t > 1 else {}
            rec.update({f: round(float(v), 6) for f, v in zip(features, samples[i, s])})
            records.append(rec)
    if out.endswith((".ndjson", ".jsonl")):
        with open(out, "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        return
    fh = sys.stdout if out == "-" else open(out, "w", newline="")
    try:
        w = csv.DictWriter(fh, fieldnames=list(records[0].keys()))
        w.writeheader()
        w.writerows(records)
    finally:
        if fh is not sys.stdout:
            fh.close()
