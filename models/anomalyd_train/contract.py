"""Checks an ONNX file against the model contract (docs/MODEL-CONTRACT.md).

`check(path)` returns a list of problems (empty: the file follows the contract). It reads the
graph's declared inputs and outputs and the metadata, then runs the model in onnxruntime on a
batch of 2 and checks shapes, finiteness and that `error` agrees with `reconstruction`.
"""

from __future__ import annotations

import json
import re

import numpy as np
import onnx

from . import KINDS
from .calibrate import QUANTILES, MAX_SAMPLE

REQUIRED = (
    "anomalyd.kind", "anomalyd.features", "anomalyd.window", "anomalyd.calibration",
    "anomalyd.version", "anomalyd.trained_at", "anomalyd.training_data",
)
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")


def _dims(value_info) -> list:
    t = value_info.type.tensor_type
    return [d.dim_param if d.HasField("dim_param") or not d.HasField("dim_value") else d.dim_value
            for d in t.shape.dim]


def _json(meta: dict, key: str, problems: list[str]):
    try:
        return json.loads(meta[key])
    except (KeyError, json.JSONDecodeError) as e:
        problems.append(f"metadata {key} is not valid JSON ({e})")
        return None


def summary(path: str) -> dict:
    """The contract as the daemon reads it: kind, features, window, shape, calibration quantiles."""
    proto = onnx.load(path)
    meta = {p.key: p.value for p in proto.metadata_props}
    cal = json.loads(meta["anomalyd.calibration"])
    out = {
        "name": meta.get("anomalyd.name"),
        "kind": meta["anomalyd.kind"],
        "features": json.loads(meta["anomalyd.features"]),
        "window": int(meta["anomalyd.window"]),
        "version": meta["anomalyd.version"],
        "trained_at": meta["anomalyd.trained_at"],
        "training_data": json.loads(meta["anomalyd.training_data"]),
        "calibration": {k: cal[k] for k in ("count", "mean", "std", "quantiles")},
        "input": _dims(proto.graph.input[0]),
    }
    if "anomalyd.shape" in meta:
        out["shape"] = json.loads(meta["anomalyd.shape"])
    if "anomalyd.baseline" in meta:
        out["baseline"] = json.loads(meta["anomalyd.baseline"])
    return out


def check(path: str) -> list[str]:
    problems: list[str] = []
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as e:  # noqa: BLE001 - any load failure is the answer
        return [f"cannot load as ONNX: {e}"]
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:  # noqa: BLE001
        problems.append(f"onnx checker: {e}")
    for init in proto.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            problems.append(f"initializer {init.name} is stored in an external file; the model must be one file")
            break

    meta = {p.key: p.value for p in proto.metadata_props}
    for key in REQUIRED:
        if key not in meta:
            problems.append(f"metadata {key} is missing")
    if problems:
        return problems

    kind = meta["anomalyd.kind"]
    if kind not in KINDS:
        problems.append(f"anomalyd.kind {kind!r} is not one of {' '.join(KINDS)}")
    features = _json(meta, "anomalyd.features", problems)
    if not (isinstance(features, list) and features and all(isinstance(f, str) and f for f in features)):
        problems.append("anomalyd.features must be a non-empty JSON list of names")
        return problems
    if len(set(features)) != len(features):
        problems.append("anomalyd.features names a feature twice")
    try:
        window = int(meta["anomalyd.window"])
        if window < 1 or str(window) != meta["anomalyd.window"]:
            raise ValueError
    except ValueError:
        problems.append(f"anomalyd.window must be a positive integer, got {meta['anomalyd.window']!r}")
        return problems
    shape = _json(meta, "anomalyd.shape", []) if "anomalyd.shape" in meta else None
    if shape is not None and not (isinstance(shape, list) and len(shape) == 3 and shape[0] == len(features)):
        problems.append(f"anomalyd.shape must be [C, H, W] with C = {len(features)} features, got {shape}")
        return problems
    if not meta["anomalyd.version"].strip():
        problems.append("anomalyd.version is empty")
    if not RFC3339.match(meta["anomalyd.trained_at"]):
        problems.append(f"anomalyd.trained_at is not RFC 3339: {meta['anomalyd.trained_at']!r}")
    td = _json(meta, "anomalyd.training_data", problems)
    if td is not None and not (
        isinstance(td, dict) and re.fullmatch(r"[0-9a-f]{64}", str(td.get("sha256", "")))
        and isinstance(td.get("rows"), int) and isinstance(td.get("file"), str)
    ):
        problems.append("anomalyd.training_data must be {\"sha256\": 64 hex, \"rows\": int, \"file\": str}")
    cal = _json(meta, "anomalyd.calibration", problems)
    if cal is not None:
        problems += _check_calibration(cal, len(features))
    if "anomalyd.baseline" in meta:
        problems += _check_baseline(_json(meta, "anomalyd.baseline", problems), features, shape)

    # Graph signature.
    f = len(features)
    expected_in = [shape[0], shape[1], shape[2]] if shape else [window, f]
    inputs = [i for i in proto.graph.input if i.name not in {x.name for x in proto.graph.initializer}]
    if [i.name for i in inputs] != ["input"]:
        problems.append(f"the graph must have one input named 'input', has {[i.name for i in inputs]}")
        return problems
    outs = {o.name: o for o in proto.graph.output}
    if set(outs) != {"reconstruction", "error"}:
        problems.append(f"outputs must be 'reconstruction' and 'error', are {sorted(outs)}")
        return problems
    for vi in (inputs[0], outs["reconstruction"], outs["error"]):
        if vi.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            problems.append(f"{vi.name} must be float32")
    din, drec, derr = _dims(inputs[0]), _dims(outs["reconstruction"]), _dims(outs["error"])
    if len(din) != 1 + len(expected_in) or din[1:] != expected_in or not isinstance(din[0], str):
        problems.append(f"input shape is {din}, expected [batch, {', '.join(map(str, expected_in))}] "
                        "with a symbolic batch")
    if drec[1:] != expected_in:
        problems.append(f"reconstruction shape is {drec}, expected [batch, {', '.join(map(str, expected_in))}]")
    if derr[1:] != [f]:
        problems.append(f"error shape is {derr}, expected [batch, {f}]")
    if problems:
        return problems
    problems += _check_run(proto, meta, [2, *expected_in], f, image=shape is not None)
    return problems


def _check_calibration(cal, f: int) -> list[str]:
    p = []
    if not isinstance(cal, dict):
        return ["anomalyd.calibration must be a JSON object"]
    for k in ("count", "mean", "std", "quantiles", "sample", "feature_mean"):
        if k not in cal:
            p.append(f"anomalyd.calibration lacks {k!r}")
    if p:
        return p
    if not (isinstance(cal["count"], int) and cal["count"] >= 1):
        p.append("calibration count must be a positive integer")
    q = cal["quantiles"]
    if not isinstance(q, dict) or set(q) != set(QUANTILES):
        p.append(f"calibration quantiles must have the keys {list(QUANTILES)}")
    elif [q[k] for k in QUANTILES] != sorted(q[k] for k in QUANTILES):
        p.append("calibration quantiles must not decrease")
    s = cal["sample"]
    if not (isinstance(s, list) and 1 <= len(s) <= min(MAX_SAMPLE, cal["count"])):
        p.append(f"calibration sample must hold 1..{MAX_SAMPLE} scores (at most count)")
    elif any(b < a for a, b in zip(s, s[1:])) or min(s) < 0:
        p.append("calibration sample must be non-negative and sorted ascending")
    fm = cal["feature_mean"]
    if not (isinstance(fm, list) and len(fm) == f):
        p.append(f"calibration feature_mean must hold {f} values (one per feature)")
    return p


def _check_baseline(b, features: list[str], shape) -> list[str]:
    if b is None:
        return []
    if shape is not None:
        return ["anomalyd.baseline applies to tabular features, not to image-shaped (anomalyd.shape) models"]
    if not (isinstance(b, dict) and set(b) == {"features", "half_life", "clip"}):
        return ['anomalyd.baseline must be {"features": [...], "half_life": N, "clip": [...]}']
    names, clip = b["features"], b["clip"]
    p = []
    if not (isinstance(names, list) and names and all(n in features for n in names) and len(set(names)) == len(names)):
        p.append(f"anomalyd.baseline features must name distinct model features, got {names}")
    if not (isinstance(clip, list) and len(clip) == len(names or []) and all(
            isinstance(c, (int, float)) and c > 0 for c in clip)):
        p.append("anomalyd.baseline clip must hold one positive value per baselined feature")
    if not (isinstance(b["half_life"], (int, float)) and b["half_life"] >= 1):
        p.append(f"anomalyd.baseline half_life must be at least 1 record, got {b['half_life']}")
    return p


def _check_run(proto, meta, shape, f: int, image: bool) -> list[str]:
    from .export import session

    p = []
    try:
        sess = session(proto)
    except Exception as e:  # noqa: BLE001
        return [f"onnxruntime cannot load the model: {e}"]
    rng = np.random.default_rng(0)
    norm = json.loads(meta["anomalyd.normalisation"]) if "anomalyd.normalisation" in meta else None
    bshape = (1, -1, 1, 1) if image else (1, 1, -1)
    if norm:
        mean = np.asarray(norm["mean"], np.float32).reshape(bshape)
        std = np.asarray(norm["std"], np.float32).reshape(bshape)
    else:
        mean, std = np.float32(0), np.float32(1)
    x = (mean + std * rng.standard_normal(shape)).astype(np.float32)
    rec, err = sess.run(["reconstruction", "error"], {"input": x})
    if list(rec.shape) != shape or list(err.shape) != [shape[0], f]:
        p.append(f"outputs have shapes {list(rec.shape)} and {list(err.shape)} for input {shape}")
        return p
    if not (np.all(np.isfinite(rec)) and np.all(np.isfinite(err))) or err.min() < 0:
        p.append("outputs are not finite, or error is negative")
    if norm:
        sq = ((rec - x) / std) ** 2
        # a sequence model with a code per row (kinds.StepCode) scores the window's last row; the
        # variational models (VAE, per-row codes) divide each value's squared error by its noise variance
        arch = json.loads(meta.get("anomalyd.training", "{}")).get("architecture", {})
        if "noise_variance" in arch:
            sq = sq / np.asarray(arch["noise_variance"], np.float32)
        last_row = not image and arch.get("code") == "step"
        expect = sq.mean(axis=(2, 3)) if image else sq[:, -1, :] if last_row else sq.mean(axis=1)
        if not np.allclose(err, expect, rtol=1e-3, atol=1e-4):
            which = "of the last row" if last_row else "mean"
            over = " over the noise variance" if "noise_variance" in arch else ""
            p.append(f"error is not the {which} squared difference of reconstruction and input in normalised "
                     f"units{over}")
    return p
