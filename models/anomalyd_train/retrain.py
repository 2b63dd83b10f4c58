"""`retrain`: a candidate model fitted on a pipeline's own recent input, read from Kafka.

The daemon never trains; it shadows a candidate file placed beside its model and promotes or
refuses it (docs/OPERATIONS.md, "Keeping models current"). This module writes that file:

1. It reads the daemon's configuration file (TOML, with the same `ANOMALYD__SECTION__KEY`
   environment overrides) for the pipeline's brokers, input topics, fields, model and alerts topic.
2. It reads the input topics as a plain client: partitions assigned by hand, a group id of its
   own (`anomalyd-train.<pipeline>`) and nothing committed, so the daemon's group and offsets are
   never touched. It reads up to the end each partition had when it started.
3. It leaves out what the daemon judged anomalous: every record of an alert episode, read back
   from the pipeline's alerts topic. An episode's firing event names the offset of its first
   anomalous point (`episode.started_offset`) and its resolved event names its last record, so
   the key's records between the two (in that partition) are exactly the episode. The alerts
   topic is the one output every deployment keeps (scores are optional and large), and it is the
   record operators already act on. Episodes an operator marked as false alarms (the
   pipeline's feedback topic) stay in: what they flagged was normal.
   Each key's remaining records form stretches cut at the episodes, and no training window spans
   a cut.
4. It fits the serving model's kind and hyper-parameters (its `anomalyd.training` metadata) on
   those stretches and writes the candidate atomically, with the next version and the data it saw
   (topics, partition offset ranges, time range, what was left out) in `anomalyd.training_data`.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import SEQUENCE_KINDS
from .data import DataError

ENV_PREFIX = "ANOMALYD__"
DEFAULT_SINCE = "7d"
DEFAULT_MIN_RECORDS = 1000
# How long a read may make no progress before the broker is called unreachable.
STALL_SECONDS = 60.0


@dataclass
class Source:
    """What `retrain` needs of the daemon's configuration for one pipeline."""

    pipeline: str
    brokers: str
    properties: dict[str, str]
    topics: list[str]
    model: Path
    candidate: Path
    key_field: str
    field_map: dict[str, str]
    alerts_topic: str
    feedback_topic: str = ""

    def field(self, feature: str) -> str:
        return self.field_map.get(feature, feature)


def _with_env(doc: dict, environ: dict[str, str]) -> dict:
    """The daemon's overrides: `ANOMALYD__A__B=v` sets `a.b` (lowercase), as src/config.rs does."""
    for name, value in environ.items():
        if not name.upper().startswith(ENV_PREFIX):
            continue
        path = name[len(ENV_PREFIX):].lower().split("__")
        node = doc
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                break
        else:
            node[path[-1]] = value
    return doc


def _list(value) -> list[str]:
    items = value if isinstance(value, list) else str(value).split(",")
    return [str(t).strip() for t in items if str(t).strip()]


def load_source(config: str, pipeline: str, environ: dict[str, str] | None = None) -> Source:
    """The pipeline's settings from the daemon's config file, defaults as the daemon's."""
    path = Path(config)
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"config file {config} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise DataError(f"{config}: not valid TOML ({e})") from None
    doc = _with_env(doc, dict(os.environ if environ is None else environ))
    pipelines = doc.get("pipelines", {})
    if pipeline not in pipelines:
        raise DataError(f"{config}: no pipeline {pipeline!r} (pipelines: {', '.join(sorted(pipelines)) or 'none'})")
    p, kafka = pipelines[pipeline], doc.get("kafka", {})
    if "model" not in p or "topics" not in p:
        raise DataError(f"{config}: pipelines.{pipeline} needs `model` and `topics`")
    model = (path.parent / p["model"]).resolve()
    if "candidate" in p:
        candidate = (path.parent / p["candidate"]).resolve()
    else:  # as PipelineConfig::candidate_path: fleet.onnx -> fleet.candidate.onnx
        candidate = model.with_name(f"{model.stem}.candidate{model.suffix}")
    return Source(
        pipeline=pipeline,
        brokers=str(kafka.get("brokers", "localhost:9092")),
        properties={str(k): str(v) for k, v in kafka.get("properties", {}).items()},
        topics=_list(p["topics"]),
        model=model,
        candidate=candidate,
        key_field=str(p.get("key_field", "key")),  # src/config.rs default_key_field
        field_map={str(k): str(v) for k, v in p.get("field_map", {}).items()},
        alerts_topic=str(p.get("alerts_topic", "anomalyd-alerts")),
        feedback_topic=str(p.get("feedback", {}).get("topic", "")),
    )


def parse_duration(text: str, option: str = "--since") -> float:
    """`90s`, `30m`, `12h`, `7d`, `2w` -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if not m or float(m.group(1)) <= 0:
        raise DataError(f"{option} must be a positive duration like 90s, 30m, 12h, 7d or 2w, got {text!r}")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]


def next_version(version: str) -> str:
    """The serving model's version with its last number raised: 1.0.0 -> 1.0.1, v7 -> v8;
    a version without a trailing number gets `.1` (`nightly` -> `nightly.1`)."""
    m = re.fullmatch(r"(.*?)(\d+)", version)
    return f"{m.group(1)}{int(m.group(2)) + 1}" if m else f"{version}.1"


# --- what the daemon judged anomalous -------------------------------------------------------


@dataclass
class Episodes:
    """Alert episodes as offset ranges per (topic, partition, key); `end` None: still open."""

    spans: dict[tuple[str, int, str], list[list]] = field(default_factory=dict)
    false_alarms: int = 0

    @staticmethod
    def of_events(events: list[dict], pipeline: str, false_alarms: frozenset = frozenset()) -> "Episodes":
        """From alert events in topic order. `false_alarms`: the episodes an operator marked as
        normal, as `episode_id`s; they are not left out."""
        eps = Episodes()
        for e in events:
            if e.get("pipeline") != pipeline or "source" not in e or "key" not in e:
                continue
            src, ep = e["source"], e.get("episode", {})
            where = (str(src.get("topic")), int(src.get("partition", -1)), str(e["key"]))
            spans = eps.spans.setdefault(where, [])
            if e.get("event") == "firing":
                start = ep.get("started_offset", src.get("offset"))
                if spans and spans[-1][1] is None:
                    spans[-1][1] = start - 1  # the one before ended without a record of its own
                marked = (*where, start) in false_alarms
                eps.false_alarms += marked
                spans.append([start, None, marked])
            elif e.get("event") == "resolved" and spans and spans[-1][1] is None:
                end = int(src.get("offset", -1))
                # Evicted or revoked: no record of the key ended it; it stays open until the
                # key's next episode or the end of what was read.
                if end >= 0 and e.get("reason") not in ("evicted", "revoked"):
                    spans[-1][1] = end
        for where in list(eps.spans):
            eps.spans[where] = [s for s in eps.spans[where] if not s[2]]
        return eps

    def covers(self, topic: str, partition: int, key: str, offset: int) -> bool:
        return any(start <= offset and (end is None or offset <= end)
                   for start, end, _ in self.spans.get((topic, partition, key), ()))

    def count(self) -> int:
        return sum(len(s) for s in self.spans.values())


@dataclass
class Record:
    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: str
    values: list


def decode(value: bytes | None, source: Source, features: list[str], image: bool) -> tuple[str, list] | None:
    """(key, feature values) of a record the daemon would score, else None (a dead letter)."""
    try:
        obj = json.loads(value or b"")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(obj, dict) or source.key_field not in obj:
        return None
    out = []
    for f in features:
        v = obj.get(source.field(f))
        if image:
            if not isinstance(v, list):
                return None
            out.append(v)
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return None
        else:
            out.append(float(v))
    return str(obj[source.key_field]), out


def stretches(records: list[Record], episodes: Episodes) -> tuple[list[tuple[str, list[Record]]], int]:
    """Each key's records outside its episodes, cut into stretches at the episodes (in offset
    order per partition); and how many records the episodes covered."""
    by_key: dict[tuple[str, int, str], list[Record]] = {}
    for r in records:
        by_key.setdefault((r.topic, r.partition, r.key), []).append(r)
    out, left_out = [], 0
    # In a fixed order, whatever order the partitions were read in: the same data, the same model.
    for (topic, partition, key), rs in sorted(by_key.items()):
        rs.sort(key=lambda r: r.offset)
        current: list[Record] = []
        for r in rs:
            if episodes.covers(topic, partition, key, r.offset):
                left_out += 1
                if current:
                    out.append((key, current))
                    current = []
            else:
                current.append(r)
        if current:
            out.append((key, current))
    return out, left_out


def episode_id(event: dict) -> tuple[str, int, str, int] | None:
    """(topic, partition, key, started_offset): how an alert event or a feedback message names
    its episode (as src/feedback.rs does)."""
    try:
        src = event["source"]
        return (str(src["topic"]), int(src["partition"]), str(event["key"]), int(event["episode"]["started_offset"]))
    except (KeyError, TypeError, ValueError):
        return None


def false_alarms(messages: list[dict], pipeline: str) -> frozenset:
    """The episodes of `pipeline` marked as false alarms on its feedback topic."""
    return frozenset(i for m in messages if m.get("pipeline") == pipeline and m.get("verdict") == "false_alarm"
                     and (i := episode_id(m)) is not None)


# --- Kafka ----------------------------------------------------------------------------------


def _consumer(source: Source):
    from confluent_kafka import Consumer

    conf = {
        # librdkafka's own log repeats every failed connection on stderr; what matters reaches
        # the user as the error the read ends with (properties can set it back).
        "log_level": 0,
        **source.properties,
        "bootstrap.servers": source.brokers,
        # A group id of its own, never joined (partitions are assigned) and never committed: the
        # daemon's consumer group and its offsets are not touched.
        "group.id": f"anomalyd-train.{source.pipeline}",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
    }
    return Consumer(conf)


def _partitions(consumer, topic: str, brokers: str) -> list[int]:
    from confluent_kafka import KafkaException

    try:
        md = consumer.list_topics(topic, timeout=10)
    except KafkaException as e:
        raise DataError(f"Kafka at {brokers}: cannot read the metadata of topic {topic!r}: {e}") from None
    t = md.topics.get(topic)
    if t is None or t.error is not None:
        raise DataError(f"topic {topic!r} cannot be read: {t.error if t is not None else 'not found'}")
    return sorted(t.partitions)


def read_topics(source: Source, topics: list[str], start, log=lambda _m: None) -> list:
    """Every message of `topics` from `start(consumer, topic, partition, low, high, partitions)`
    (an offset; `partitions`: how many the topics have in all) to at least the end each partition
    had when the read began, as confluent-kafka messages."""
    from confluent_kafka import KafkaException, TopicPartition

    consumer = _consumer(source)
    try:
        assign, ends = [], {}
        partitions = [(topic, p) for topic in topics for p in _partitions(consumer, topic, source.brokers)]
        for topic, p in partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            first = max(low, start(consumer, topic, p, low, high, len(partitions)))
            if first < high:
                assign.append(TopicPartition(topic, p, first))
                ends[(topic, p)] = high
        consumer.assign(assign)
        messages, idle_since = [], time.monotonic()
        while ends:
            batch = consumer.consume(num_messages=1000, timeout=1.0)
            if batch:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > STALL_SECONDS:
                raise DataError(f"reading {', '.join(f'{t}[{p}]' for t, p in ends)} from {source.brokers} "
                                f"made no progress for {STALL_SECONDS:.0f} s")
            for m in batch:
                if m.error():
                    raise DataError(f"reading {m.topic()}[{m.partition()}]: {m.error()}")
                # Kept even past a partition's end: records that arrived since are as good.
                messages.append(m)
                where = (m.topic(), m.partition())
                if where in ends and m.offset() >= ends[where] - 1:
                    del ends[where]
            log(f"read {len(messages)} messages")
        return messages
    except KafkaException as e:
        raise DataError(f"Kafka ({source.brokers}): {e}") from None
    finally:
        consumer.close()


def _start_since(seconds: float):
    from confluent_kafka import TopicPartition

    at_ms = int((time.time() - seconds) * 1000)

    def start(consumer, topic, p, low, high, _partitions):
        (found,) = consumer.offsets_for_times([TopicPartition(topic, p, at_ms)], timeout=10)
        return high if found.offset < 0 else found.offset

    return start


def _start_last(records: int):
    return lambda _c, _t, _p, _low, high, partitions: high - math.ceil(records / partitions)


# --- the command ----------------------------------------------------------------------------


@dataclass
class RetrainOptions:
    config: str
    pipeline: str
    since: str | None = None
    records: int | None = None
    min_records: int = DEFAULT_MIN_RECORDS
    out: str | None = None  # default: the pipeline's candidate path
    version: str | None = None
    quiet: bool = False


def fit_options(meta: dict, data: str, out: str, version: str, quiet: bool):
    """The serving model's kind and hyper-parameters (its metadata) as `fit` options."""
    from .fit import FitOptions

    training = json.loads(meta["anomalyd.training"])
    arch = training.get("architecture", {})
    baseline = json.loads(meta["anomalyd.baseline"]) if "anomalyd.baseline" in meta else None
    shape = json.loads(meta["anomalyd.shape"]) if "anomalyd.shape" in meta else None
    opts = FitOptions(
        kind=meta["anomalyd.kind"], data=data, features=json.loads(meta["anomalyd.features"]), out=out,
        key="stretch", window=None if shape else int(meta["anomalyd.window"]),
        shape=tuple(shape) if shape else None,
        epochs=None if training.get("early_stopping", True) else int(training["epochs"]) or None,
        batch_size=int(training.get("batch_size", 64)), lr=float(training.get("lr", 1e-3)),
        val_fraction=float(training.get("val_fraction", 0.2)), seed=int(training.get("seed", 0)),
        version=version, name=meta.get("anomalyd.name"), quiet=quiet, plot=False,
        latent=arch.get("latent"), hidden=int(arch.get("hidden", 32)),
        baseline=baseline["features"] if baseline else [],
    )
    for name in ("sparsity", "sparsity_weight", "rho", "noise_std", "mask_prob", "beta", "decoder", "unroll",
                 "variance", "code"):
        if name in arch:
            setattr(opts, name, arch[name])
    if opts.kind in SEQUENCE_KINDS and not shape and "code" not in arch:
        opts.code = "window"  # written before per-row codes: the design it was trained with
    if baseline:
        opts.baseline_half_life = float(baseline["half_life"])
    return opts


def retrain(opts: RetrainOptions, log=print) -> dict:
    """Writes the candidate; returns a summary (what `anomalyd.training_data` says, and where)."""
    from . import export
    from .fit import fit

    if opts.since is not None and opts.records is not None:
        raise DataError("give --since or --records, not both")
    if opts.records is not None and opts.records < 1:
        raise DataError(f"--records must be at least 1, got {opts.records}")
    if opts.min_records < 1:
        raise DataError(f"--min-records must be at least 1, got {opts.min_records}")
    seconds = parse_duration(opts.since or DEFAULT_SINCE) if opts.records is None else None
    source = load_source(opts.config, opts.pipeline)
    if not source.model.is_file():
        raise DataError(f"the serving model {source.model} does not exist (pipelines.{source.pipeline}.model)")
    meta = export.metadata(str(source.model))
    missing = [k for k in ("anomalyd.kind", "anomalyd.features", "anomalyd.window", "anomalyd.training") if k not in meta]
    if missing:
        raise DataError(f"the serving model {source.model} has no {', '.join(missing)} metadata: retrain fits the "
                        "serving model's kind and settings, so it needs a model written by `anomalyd-train fit`")
    features, image = json.loads(meta["anomalyd.features"]), "anomalyd.shape" in meta
    window = 1 if image else int(meta["anomalyd.window"])
    progress = (lambda _m: None) if opts.quiet else (lambda m: print(f"\r{m}", end="", file=sys.stderr))

    start = _start_last(opts.records) if opts.records is not None else _start_since(seconds)
    messages = read_topics(source, source.topics, start, progress)
    records, undecodable = [], 0
    for m in messages:
        decoded = decode(m.value(), source, features, image)
        if decoded is None:
            undecodable += 1
            continue
        records.append(Record(m.topic(), m.partition(), m.offset(), m.timestamp()[1], *decoded))

    def whole(topic: str) -> list[dict]:
        """Every JSON object on `topic` (none if it is not configured)."""
        out = []
        for m in read_topics(source, [topic], lambda _c, _t, _p, low, _h, _n: low, progress) if topic else ():
            try:
                out.append(json.loads(m.value() or b""))
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
        return [o for o in out if isinstance(o, dict)]

    events = whole(source.alerts_topic)
    marked = false_alarms(whole(source.feedback_topic), source.pipeline)
    if not opts.quiet:
        print(file=sys.stderr)
    episodes = Episodes.of_events(events, source.pipeline, marked)
    parts, left_out = stretches(records, episodes)
    usable = [(k, rs) for k, rs in parts if len(rs) >= window]
    used = sum(len(rs) for _, rs in usable)
    what = (f"{len(messages)} records read from {', '.join(source.topics)} "
            f"({'the last ' + str(opts.records) if opts.records else 'since ' + (opts.since or DEFAULT_SINCE)}): "
            f"{undecodable} not decodable, {left_out} in {episodes.count()} alert episode(s) "
            f"({episodes.false_alarms} marked as false alarms kept), "
            f"{len(records) - left_out - used} in stretches shorter than the window of {window}")
    if used < opts.min_records:
        raise DataError(f"too little clean data to retrain pipeline {source.pipeline}: {used} usable records of "
                        f"{what}; --min-records is {opts.min_records}. Read a longer stretch (--since, --records) "
                        "or wait for more normal data")

    spans: dict[str, dict[str, list[int]]] = {}
    for r in records:
        span = spans.setdefault(r.topic, {}).setdefault(str(r.partition), [r.offset, r.offset])
        span[0], span[1] = min(span[0], r.offset), max(span[1], r.offset)
    stamps = [r.timestamp_ms for _, rs in usable for r in rs]
    data_meta = {
        "kafka": {"brokers": source.brokers, "pipeline": source.pipeline, "offsets": spans,
                  "alerts_topic": source.alerts_topic},
        "from": _iso(min(stamps)), "to": _iso(max(stamps)),
        "records_read": len(messages), "undecodable": undecodable,
        "left_out_in_episodes": left_out, "episodes": episodes.count(),
        "false_alarms_kept": episodes.false_alarms, "rows": used,
        "retrained_from": {"name": meta.get("anomalyd.name"), "version": meta.get("anomalyd.version")},
    }
    version = opts.version or next_version(meta.get("anomalyd.version", "1.0.0"))
    out = Path(opts.out) if opts.out else source.candidate
    with tempfile.TemporaryDirectory(prefix="anomalyd-retrain-") as tmp:
        data = Path(tmp) / "data.ndjson"
        with open(data, "w") as f:
            for i, (key, rs) in enumerate(usable):
                for r in rs:
                    f.write(json.dumps({"stretch": f"{i}:{key}", **dict(zip(features, r.values))}) + "\n")
        result = fit(fit_options(meta, str(data), str(Path(tmp) / "candidate.onnx"), version, opts.quiet))
        data_meta["sha256"] = result.meta["anomalyd.training_data"]["sha256"]
        new = export.metadata(result.proto)
        new["anomalyd.training_data"] = json.dumps(data_meta, separators=(",", ":"))
        export.set_metadata(result.proto, new)
        export.save(result.proto, str(out))  # written beside, then renamed: never seen half-written
    log(f"wrote {out} ({meta['anomalyd.kind']} {version}, retrained from {meta.get('anomalyd.version')}) on "
        f"{used} records of {what}; the daemon shadows it and promotes or refuses it "
        "(anomalyd_candidates_total)")
    return {"path": str(out), "version": version, **data_meta}


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))
