#!/usr/bin/env python3
"""The baseline: what a user would otherwise write instead of anomalyd.

A confluent-kafka consumer group + onnxruntime, batched: read JSON records, run the same model
(both outputs, as the daemon does), score = mean of the `error` output over features, compare to a
threshold (the model's calibration quantile 0.999, static: simpler than the daemon's per-key
adaptive thresholds and hysteresis), produce an alert JSON with the top features for every
anomalous record, and commit offsets at least once (every second: flush the alerts, then commit).

Stops after --count records and prints one JSON line: records, seconds (first record consumed to
the last one scored, its alerts delivered and its offset committed), records_per_s, cpu_s (this
process, librdkafka's threads included, over the same span), max_rss_mb, anomalies.

Run by benches/kafka_e2e.rs (scripts/bench.sh); by hand:
    target/venv/bin/python benches/python_consumer.py --bootstrap 127.0.0.1:9092 \
        --topic bench-in --group py --alerts-topic py-alerts --model models/demo-dense.onnx \
        --count 300000
"""

import argparse
import json
import resource
import sys
import time

import numpy as np
import onnxruntime as ort
from confluent_kafka import Consumer, KafkaException, Producer


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--group", required=True)
    ap.add_argument("--alerts-topic", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--count", type=int, required=True, help="stop after this many records")
    ap.add_argument("--batch", type=int, default=256, help="records per inference call")
    ap.add_argument("--key-field", default="host")
    ap.add_argument("--timestamp-field", default="ts")
    ap.add_argument("--threshold", type=float, help="default: the model's calibration q0.999")
    ap.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds")
    args = ap.parse_args()

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(args.model, opts, providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    features = json.loads(meta["anomalyd.features"])
    if int(meta["anomalyd.window"]) != 1:
        print("this baseline scores point models (anomalyd.window = 1) only", file=sys.stderr)
        return 2
    threshold = args.threshold
    if threshold is None:
        threshold = float(json.loads(meta["anomalyd.calibration"])["quantiles"]["0.999"])
    n_features = len(features)

    consumer = Consumer(
        {
            "bootstrap.servers": args.bootstrap,
            "group.id": args.group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    producer = Producer(
        {
            "bootstrap.servers": args.bootstrap,
            "linger.ms": 5,
            "acks": "all",
            "compression.type": "lz4",
        }
    )
    failed = []
    consumer.subscribe([args.topic])

    processed = anomalies = dead = 0
    first = cpu0 = None
    last_commit = time.monotonic()
    deadline = time.monotonic() + args.timeout

    def on_delivery(err, _msg):
        if err is not None:
            failed.append(err)

    while processed < args.count:
        if time.monotonic() > deadline:
            print(f"timed out after {processed} of {args.count} records", file=sys.stderr)
            return 1
        msgs = consumer.consume(num_messages=min(args.batch, args.count - processed), timeout=1.0)
        if not msgs:
            continue
        if first is None:
            first, cpu0 = time.monotonic(), time.process_time()
        rows, kept = [], []
        for m in msgs:
            if m.error() is not None:
                raise KafkaException(m.error())
            try:
                rec = json.loads(m.value())
                rows.append([float(rec[f]) for f in features])
                kept.append((m, rec))
            except (ValueError, KeyError, TypeError):
                dead += 1
        processed += len(msgs)
        if rows:
            x = np.asarray(rows, dtype=np.float32).reshape(len(rows), 1, n_features)
            error, recon = sess.run(["error", "reconstruction"], {"input": x})
            scores = error.mean(axis=1)
            for i in np.flatnonzero(scores > threshold):
                m, rec = kept[i]
                top = np.argsort(-error[i])[:3]
                alert = {
                    "event": "anomaly",
                    "key": rec.get(args.key_field),
                    "timestamp": rec.get(args.timestamp_field),
                    "score": float(scores[i]),
                    "threshold": threshold,
                    "top_features": [
                        {
                            "name": features[j],
                            "error": float(error[i, j]),
                            "value": float(x[i, 0, j]),
                            "expected": float(recon[i, 0, j]),
                        }
                        for j in top
                    ],
                    "source": {"topic": m.topic(), "partition": m.partition(), "offset": m.offset()},
                }
                producer.produce(
                    args.alerts_topic, key=m.key(), value=json.dumps(alert), on_delivery=on_delivery
                )
                anomalies += 1
        producer.poll(0)
        now = time.monotonic()
        if now - last_commit >= 1.0:
            # At least once: the alerts of every record up to here are acknowledged first.
            producer.flush()
            consumer.commit(asynchronous=True)
            last_commit = now
    producer.flush()
    consumer.commit(asynchronous=False)
    seconds = time.monotonic() - first
    cpu = time.process_time() - cpu0
    consumer.close()
    if failed:
        print(f"{len(failed)} alerts failed delivery, e.g. {failed[0]}", file=sys.stderr)
        return 1
    print(
        json.dumps(
            {
                "records": processed,
                "seconds": seconds,
                "records_per_s": processed / seconds,
                "cpu_s": cpu,
                "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
                "anomalies": anomalies,
                "dead_letters": dead,
                "threshold": threshold,
                "batch": args.batch,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
