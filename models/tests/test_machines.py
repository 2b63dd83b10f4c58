"""The drifting-machines benchmark (issue 17): its data has the properties the issue names, and
the harness counts what it says it counts. The figures themselves are printed by
`anomalyd-train machines`, not asserted here."""

from __future__ import annotations

import numpy as np

from anomalyd_train import machines

from conftest import anomalyd_bin


def test_runs_drift_out_of_the_training_range_and_hold_every_kind_of_fault():
    runs = [machines.run(1200, seed) for seed in range(8)]
    kinds = {k for r in runs for k, _, _ in r.faults}
    assert kinds == set(machines.FAULTS)
    shares = [r.labels[400:].mean() for r in runs]
    assert 0.15 < np.mean(shares) < 0.5, shares
    assert not any(r.labels[:400].any() for r in runs), "the training rows are normal"
    # The temperatures' normal rows leave the training range by several standard deviations.
    bearing = machines.CHANNELS.index("temp_bearing")
    far = [np.abs((r.values[400:][~r.labels[400:], bearing] - r.values[:400, bearing].mean())
                  / r.values[:400, bearing].std()).max() for r in runs]
    assert max(far) > 5, far
    # Seeded: the same run twice.
    again = machines.run(1200, 3)
    assert np.array_equal(again.values, runs[3].values) and again.faults == runs[3].faults


def test_the_harness_counts_rows_after_training_through_the_daemon(tmp_path):
    runs = [machines.run(600, seed) for seed in (1, 2)]
    f = machines.evaluate("dense", runs, str(anomalyd_bin()), work=tmp_path)
    labels = np.concatenate([r.labels[400:] for r in runs])
    assert (f.normal_rows, f.fault_rows) == (int((~labels).sum()), int(labels.sum()))
    assert 0 <= f.false_alarms <= f.normal_rows and 0 <= f.missed <= f.fault_rows
    p = f.fault_rows / (f.fault_rows + f.normal_rows)
    assert abs(f.flag_everything_f1 - 2 * p / (1 + p)) < 1e-12
    assert (tmp_path / "dense-0-scores.csv").exists()
    assert "| dense |" in machines.table([f])


def test_measuring_the_temperatures_from_their_level_cuts_the_false_alarms_of_drift(tmp_path):
    """Issue 17, item 1: the same runs, the same model kind, with and without `--baseline` on the
    two drifting temperatures (one calibration fold, to keep the test short)."""
    runs = [machines.run(900, seed) for seed in (4, 5)]
    fast = ["--calibration-folds", "1"]
    plain = machines.evaluate("dense", runs, str(anomalyd_bin()), work=tmp_path, extra_fit=fast, baseline=[])
    relative = machines.evaluate("dense", runs, str(anomalyd_bin()), work=tmp_path, extra_fit=fast)
    print(machines.table([plain, relative]))
    assert relative.false_alarm_rate < plain.false_alarm_rate / 2, (plain, relative)
    assert relative.f1 > plain.f1
