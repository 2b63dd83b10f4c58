"""Parity: the same inputs through PyTorch, onnxruntime and tract (the daemon's runtime) must give
the same `reconstruction` and `error`, max abs difference <= 1e-4, for every kind, with a batch of
3 and a batch of 1, and for the recurrent decoder designs tract's own lowering could not run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anomalyd_train import export

from conftest import VARIANTS, tract_verify

TOL = 1e-4


def inputs(res, batch: int) -> np.ndarray:
    """Validation windows; in a batch of 3 the second is pushed far off normal (an anomaly) and
    the third is noise around the mean, so the graph is exercised beyond the training manifold."""
    x = res.val[:batch].copy()
    if batch >= 3:
        spread = res.train.std(axis=0, keepdims=True)[0]
        x[1] = x[1] + 4 * spread
        rng = np.random.default_rng(0)
        x[2] = res.train.mean(axis=0) + spread * rng.standard_normal(x[2].shape)
    return x.astype(np.float32)


def torch_outputs(res, x):
    with torch.no_grad():
        rec, err = res.model(torch.from_numpy(x))
    return rec.numpy(), err.numpy()


def max_diff(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


@pytest.mark.parametrize("name", list(VARIANTS))
def test_torch_matches_onnxruntime(quick_models, name):
    res = quick_models(name)
    sess = export.session(res.path)
    for batch in (3, 1):
        x = inputs(res, batch)
        trec, terr = torch_outputs(res, x)
        orec, oerr = sess.run(["reconstruction", "error"], {"input": x})
        assert orec.shape == x.shape and oerr.shape == (batch, x.shape[1] if x.ndim == 4 else x.shape[2])
        d_rec, d_err = max_diff(trec, orec), max_diff(terr, oerr)
        print(f"{name} batch {batch}: torch vs onnxruntime max abs diff reconstruction {d_rec:.2e} error {d_err:.2e}")
        assert d_rec <= TOL and d_err <= TOL, (d_rec, d_err)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_tract_matches_onnxruntime(quick_models, name, tmp_path):
    res = quick_models(name)
    sess = export.session(res.path)
    for batch in (3, 1):
        x = inputs(res, batch)
        rec, err = sess.run(["reconstruction", "error"], {"input": x})
        code, out = tract_verify(res.path, x, rec, err, tmp_path, tolerance=TOL)
        print(f"{name} batch {batch}: {out.strip()}")
        assert code == 0, f"tract differs from onnxruntime beyond {TOL} for {name} (batch {batch}):\n{out}"


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("design", ["repeat", "concat"])
def test_the_other_recurrent_decoders_run_exactly_in_the_daemon(quick_models, tmp_path, kind, design):
    """"repeat" is the classic RepeatVector decoder (the code alone repeated over time); "concat"
    adds the t/T position channel to it. onnxruntime agrees with PyTorch on both. tract 0.23's own
    lowering of the recurrent operators could not run them (an LSTM failed to load; NOTES.md saw
    "repeat" 2.7e-2 off in another set-up), which is why the toolkit's default is the "position"
    design (kinds.Recurrent). The daemon now runs plain LSTM and GRU nodes with its own
    whole-sequence op (src/model/recurrent.rs), and this holds it to onnxruntime on them too."""
    res = quick_models(kind, code="window", decoder=design)
    x = inputs(res, 3)
    trec, terr = torch_outputs(res, x)
    orec, oerr = export.session(res.path).run(["reconstruction", "error"], {"input": x})
    assert max_diff(trec, orec) <= TOL and max_diff(terr, oerr) <= TOL, "onnxruntime should agree with PyTorch"
    code, out = tract_verify(res.path, x, orec, oerr, tmp_path, tolerance=TOL)
    print(f"{kind} decoder {design!r} in the daemon: exit {code}: {out.strip()[:300]}")
    assert code == 0, f"the daemon differs from onnxruntime beyond {TOL} on the {design!r} {kind} decoder:\n{out}"


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_kind_follows_the_contract(quick_models, name):
    from anomalyd_train import contract

    assert contract.check(quick_models(name).path) == []
