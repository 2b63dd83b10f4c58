"""The exported graph and its metadata (docs/MODEL-CONTRACT.md).

    input [batch, T, F] (raw)  ->  z = (input - mean) / std
                                   r = core(z)
    reconstruction = r * std + mean               [batch, T, F], raw units
    error          = mean over T of (r - z)^2      [batch, F], normalised units
                     (the last row's (r - z)^2 for a code per row, kinds.StepCode)

(For image models: input [batch, C, H, W], per-channel mean/std, error averaged over H x W.)
The graph is written with the TorchScript-based ONNX exporter at opset 17, weights inline, the
batch dimension symbolic.
"""

from __future__ import annotations

import io
import json
import os
import time
import warnings

import numpy as np
import onnx
import torch
from torch import nn

from .kinds import Core

OPSET = 17
INPUT, RECONSTRUCTION, ERROR = "input", "reconstruction", "error"


class Exported(nn.Module):
    def __init__(self, core: Core, mean: np.ndarray, std: np.ndarray, image: bool):
        super().__init__()
        self.core = core
        shape = (1, -1, 1, 1) if image else (1, 1, -1)
        self.image = image
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).reshape(shape))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).reshape(shape))
        if not image:
            self.register_buffer("scale", torch.diag(1 / self.std.flatten()))
            self.register_buffer("unscale", torch.diag(self.std.flatten()))
            self.register_buffer("shift", -self.mean / self.std)

    def forward(self, input: torch.Tensor):  # noqa: A002 - the ONNX input's name
        # Tabular models: the per-feature affine maps as [F, F] diagonal products with a bias,
        # which tract runs in its matmul kernels, while a broadcast op over a few features misses
        # its vectorised element-wise path (docs/NOTES.md). The same function to float rounding.
        z = (input - self.mean) / self.std if self.image else input @ self.scale + self.shift
        r = self.core(z)
        reconstruction = r * self.std + self.mean if self.image else r @ self.unscale + self.mean
        sq = self.core.squared_error(r, z)
        if self.image:
            error = sq.mean(dim=(2, 3))
        else:
            error = sq[:, -1, :] if self.core.last_row_error else sq.mean(dim=1)
        return reconstruction, error


def to_onnx(model: Exported, example: torch.Tensor) -> onnx.ModelProto:
    """Exports `model` (in eval mode) with a symbolic batch dimension."""
    model.eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            buf,
            input_names=[INPUT],
            output_names=[RECONSTRUCTION, ERROR],
            dynamic_axes={INPUT: {0: "batch"}, RECONSTRUCTION: {0: "batch"}, ERROR: {0: "batch"}},
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    proto = onnx.load_from_string(buf.getvalue())
    # The exporter leaves some fixed output dimensions symbolic; declare them (the checker's shape
    # inference verifies them on save).
    sample = list(example.shape[1:])
    features = sample[0] if model.image else sample[-1]
    for out in proto.graph.output:
        tail = sample if out.name == RECONSTRUCTION else [features]
        dims = out.type.tensor_type.shape.dim
        for d, size in zip(list(dims)[1:], tail):
            d.Clear()
            d.dim_value = size
    return proto


def set_metadata(proto: onnx.ModelProto, metadata: dict[str, object]) -> None:
    """Sets `metadata_props`; non-string values are written as compact JSON."""
    del proto.metadata_props[:]
    for key in sorted(metadata):
        value = metadata[key]
        text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, text


def metadata(proto_or_path) -> dict[str, str]:
    proto = onnx.load(proto_or_path) if isinstance(proto_or_path, (str, os.PathLike)) else proto_or_path
    return {p.key: p.value for p in proto.metadata_props}


def save(proto: onnx.ModelProto, path: str) -> None:
    onnx.checker.check_model(proto, full_check=True)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(proto.SerializeToString())
    os.replace(tmp, path)


def session(proto_or_path):
    """An onnxruntime session (single-threaded, deterministic) on a file or an in-memory model."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    src = proto_or_path.SerializeToString() if isinstance(proto_or_path, onnx.ModelProto) else str(proto_or_path)
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def run(sess, x: np.ndarray, batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Runs a session on raw input in batches; returns (reconstruction, error)."""
    recs, errs = [], []
    for i in range(0, len(x), batch):
        rec, err = sess.run([RECONSTRUCTION, ERROR], {INPUT: np.ascontiguousarray(x[i : i + batch], np.float32)})
        recs.append(rec)
        errs.append(err)
    return np.concatenate(recs), np.concatenate(errs)


def trained_at() -> str:
    """RFC 3339 UTC; SOURCE_DATE_EPOCH (the reproducible-builds convention) fixes it."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    t = int(epoch) if epoch else int(time.time())
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def find_tensor(proto: onnx.ModelProto, scope: str) -> str:
    """The output tensor of the last node exported from module `scope` (e.g. "/core/mu/")."""
    names = [n.output[0] for n in proto.graph.node if n.name.startswith(scope)]
    if not names:
        raise ValueError(f"no node of module scope {scope!r} in the exported graph")
    return names[-1]
