"""`anomalyd-train retrain`: the parts that need no broker. The loop itself (Kafka in, candidate
out, shadow and promotion in the daemon) runs on tansu in tests/learning.rs."""

from __future__ import annotations

import json

import pytest
from conftest import FEATURES, REPO

from anomalyd_train import export, retrain
from anomalyd_train.data import DataError
from anomalyd_train.fit import FitOptions, fit
from anomalyd_train.retrain import Episodes, Record


def test_the_daemons_config_is_read_with_its_defaults_and_environment_overrides(tmp_path):
    config = tmp_path / "conf" / "anomalyd.toml"
    config.parent.mkdir()
    config.write_text(
        '[kafka]\nbrokers = "k1:9092"\n[kafka.properties]\n"security.protocol" = "SSL"\n'
        '[pipelines.fleet]\ntopics = "a, b"\nmodel = "../models/fleet.onnx"\n'
        '[pipelines.fleet.field_map]\ncpu_pct = "cpu.util"\n[pipelines.fleet.feedback]\ntopic = "fb"\n'
    )
    s = retrain.load_source(str(config), "fleet", environ={})
    # key_field as the daemon's default (src/config.rs, docs/CONFIG.md): "key".
    assert (s.brokers, s.topics, s.key_field, s.alerts_topic) == ("k1:9092", ["a", "b"], "key", "anomalyd-alerts")
    assert s.model == (tmp_path / "models" / "fleet.onnx").resolve()
    assert s.candidate == (tmp_path / "models" / "fleet.candidate.onnx").resolve()
    assert (s.properties, s.feedback_topic) == ({"security.protocol": "SSL"}, "fb")
    assert (s.field("cpu_pct"), s.field("latency_ms")) == ("cpu.util", "latency_ms")

    s = retrain.load_source(str(config), "fleet", environ={
        "ANOMALYD__KAFKA__BROKERS": "k2:9092", "ANOMALYD__PIPELINES__FLEET__TOPICS": "c",
        "ANOMALYD__PIPELINES__FLEET__CANDIDATE": "next.onnx", "OTHER": "x",
    })
    assert (s.brokers, s.topics, s.candidate) == ("k2:9092", ["c"], (config.parent / "next.onnx").resolve())

    with pytest.raises(DataError, match="no pipeline 'other'.*fleet"):
        retrain.load_source(str(config), "other", environ={})
    with pytest.raises(DataError, match="does not exist"):
        retrain.load_source(str(tmp_path / "missing.toml"), "fleet", environ={})


def test_durations_and_versions():
    assert retrain.parse_duration("7d") == 7 * 86400
    assert retrain.parse_duration("90s") == 90
    assert retrain.parse_duration("1.5h") == 5400
    for bad in ("7", "0d", "-1h", "7 days"):
        with pytest.raises(DataError, match="--since"):
            retrain.parse_duration(bad)
    assert [retrain.next_version(v) for v in ("1.0.0", "2.3.9", "v7", "nightly")] == ["1.0.1", "2.3.10", "v8", "nightly.1"]


def event(kind, key, offset, started=None, reason=None, pipeline="fleet", partition=0, started_at=None):
    e = {"event": kind, "pipeline": pipeline, "key": key,
         "source": {"topic": "m", "partition": partition, "offset": offset},
         "episode": {"started_at": started_at}}
    if started is not None:
        e["episode"]["started_offset"] = started
    if reason:
        e["reason"] = reason
    return e


def test_episodes_cover_their_keys_records_from_the_first_anomalous_point_to_the_resolving_one():
    eps = Episodes.of_events([
        event("firing", "a", 12, started=10),
        event("firing", "b", 13, started=11),
        event("resolved", "a", 20),
        event("firing", "a", 40, started=38),  # still open
        event("firing", "c", 50, started=50, partition=1),
        event("resolved", "c", 60, reason="rebaselined", partition=1),
        event("firing", "z", 5, started=1, pipeline="other"),
    ], "fleet")
    covered = [o for o in range(0, 100) if eps.covers("m", 0, "a", o)]
    assert covered == list(range(10, 21)) + list(range(38, 100))
    assert eps.covers("m", 0, "b", 11) and eps.covers("m", 0, "b", 10_000) and not eps.covers("m", 0, "b", 10)
    # A rebaselined episode is left out like any other: what it accepted is learned from the
    # records after it.
    assert eps.covers("m", 1, "c", 55) and not eps.covers("m", 1, "c", 61)
    assert not eps.covers("m", 0, "c", 55), "another partition"
    assert not eps.covers("m", 0, "z", 3), "another pipeline's episode"
    assert eps.count() == 4


def test_an_episode_ended_without_a_record_of_its_key_stays_open_until_the_keys_next_one():
    eps = Episodes.of_events([
        event("firing", "a", 12, started=10),
        event("resolved", "a", -1, reason="revoked"),
        event("firing", "a", 40, started=38),
        event("resolved", "a", 45),
    ], "fleet")
    assert [o for o in range(60) if eps.covers("m", 0, "a", o)] == list(range(10, 46))


def test_episodes_marked_as_false_alarms_on_the_feedback_topic_are_kept():
    first = event("firing", "a", 12, started=10)
    feedback = [
        {**first, "verdict": "false_alarm", "by": "alice"},  # the episode's alert event, marked
        {**event("firing", "a", 40, started=38), "verdict": "real"},  # not a false alarm
        {**event("firing", "a", 12, started=10, pipeline="other"), "verdict": "false_alarm"},
        {"verdict": "false_alarm", "pipeline": "fleet"},  # names no episode
    ]
    marked = retrain.false_alarms(feedback, "fleet")
    assert marked == {("m", 0, "a", 10)}
    eps = Episodes.of_events([
        first, event("resolved", "a", 20), event("firing", "a", 40, started=38), event("resolved", "a", 45),
    ], "fleet", marked)
    assert not eps.covers("m", 0, "a", 15) and eps.covers("m", 0, "a", 40)
    assert (eps.count(), eps.false_alarms) == (1, 1)


def test_stretches_are_cut_at_the_episodes_so_no_window_spans_one():
    records = [Record("m", 0, o, 0, "a" if o % 2 else "b", [float(o)]) for o in range(20)]
    eps = Episodes.of_events([event("firing", "a", 7, started=5), event("resolved", "a", 9)], "fleet")
    parts, left_out = retrain.stretches(records, eps)
    assert left_out == 3  # a's records 5, 7, 9
    assert sorted((k, [r.offset for r in rs]) for k, rs in parts) == [
        ("a", [1, 3]), ("a", [11, 13, 15, 17, 19]), ("b", list(range(0, 20, 2))),
    ]


def test_records_the_daemon_would_not_score_are_not_decoded():
    src = retrain.Source("p", "b", {}, ["m"], None, None, "host", {"cpu": "cpu.util"}, "")
    ok = json.dumps({"host": "h1", "cpu.util": 3, "mem": 2.5}).encode()
    assert retrain.decode(ok, src, ["cpu", "mem"], image=False) == ("h1", [3.0, 2.5])
    for bad in (b"not json", b"[1]", b'{"cpu.util": 1, "mem": 2}', b'{"host": "h", "cpu.util": "x", "mem": 2}',
                b'{"host": "h", "cpu.util": true, "mem": 2}', b'{"host": "h", "cpu.util": 1}', None):
        assert retrain.decode(bad, src, ["cpu", "mem"], image=False) is None, bad


def test_a_candidate_is_fitted_like_the_serving_model(sensors_csv, tmp_path):
    serving = fit(FitOptions(
        kind="lstm", data=str(sensors_csv), features=list(FEATURES[:3]), out=str(tmp_path / "s.onnx"),
        key="entity", window=6, epochs=2, hidden=12, latent=3, lr=2e-3, batch_size=32, seed=4,
        baseline=[FEATURES[0]], baseline_half_life=50, quiet=True, plot=False,
    ))
    opts = retrain.fit_options(export.metadata(serving.path), "data.ndjson", "c.onnx", "1.0.1", quiet=True)
    assert (opts.kind, opts.features, opts.window, opts.hidden, opts.latent) == ("lstm", list(FEATURES[:3]), 6, 12, 3)
    assert (opts.lr, opts.batch_size, opts.seed, opts.epochs, opts.decoder) == (2e-3, 32, 4, 2, "position")
    assert (opts.baseline, opts.baseline_half_life, opts.key) == ([FEATURES[0]], 50, "stretch")
    assert opts.code == "step"
    # a model written before codes per row had one per window, and says nothing of it
    meta = export.metadata(serving.path)
    training = json.loads(meta["anomalyd.training"])
    del training["architecture"]["code"]
    older = retrain.fit_options({**meta, "anomalyd.training": json.dumps(training)}, "d", "c.onnx", "1.0.1", True)
    assert older.code == "window"


def test_a_serving_model_the_toolkit_did_not_write_is_refused_before_kafka(tmp_path):
    import onnx

    model = tmp_path / "m.onnx"
    proto = onnx.load(str(REPO / "models" / "demo-dense.onnx"))
    del proto.metadata_props[:]
    onnx.save(proto, str(model))
    config = tmp_path / "c.toml"
    config.write_text(f'[kafka]\nbrokers = "127.0.0.1:1"\n[pipelines.p]\ntopics = ["m"]\nmodel = "{model}"\n')
    with pytest.raises(DataError, match="no anomalyd.kind, .*anomalyd.training metadata"):
        retrain.retrain(retrain.RetrainOptions(config=str(config), pipeline="p", records=10))
    with pytest.raises(DataError, match="--min-records"):
        retrain.retrain(retrain.RetrainOptions(config=str(config), pipeline="p", min_records=0))
