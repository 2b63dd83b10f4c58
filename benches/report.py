#!/usr/bin/env python3
"""Prints the markdown tables of scripts/bench.sh from its raw outputs (results.jsonl, machine.txt).

    python3 benches/report.py target/bench [--command-tract CMD] [--command-kafka CMD]
"""

import argparse
import json
import statistics
from pathlib import Path


def fmt(v, digits=1):
    if v is None or v != v:
        return "n/a"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def runs(values, digits=0):
    return ", ".join(fmt(v, digits) for v in values)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir", type=Path)
    ap.add_argument("--command-replay", default="")
    ap.add_argument("--command-memory", default="")
    ap.add_argument("--command-tract", default="")
    ap.add_argument("--command-kafka", default="")
    ap.add_argument("--command-lstm", default="")
    ap.add_argument("--command-threshold", default="")
    a = ap.parse_args()
    results = [json.loads(l) for l in (a.dir / "results.jsonl").read_text().splitlines() if l.strip()]
    machine = (a.dir / "machine.txt").read_text().splitlines()
    info = dict(l.split(":", 1) for l in machine if ":" in l)
    get = lambda k: info.get(k, "?").strip()

    print("## Figures (scripts/bench.sh)\n")
    print(
        f"Machine: {get('Model name')}, nproc {get('nproc')}, load average at start {get('load average')}; "
        f"commit {get('commit')}, {get('date')}. onnxruntime {Path(get('onnxruntime')).name}, "
        f"confluent-kafka {get('confluent-kafka')}, {get('tansu')}. The machine is shared and noisy "
        "(other builds and tests run on the same two cores): compare the ratios, which were "
        "measured side by side, rather than absolute times across runs.\n"
    )

    rep = [r for r in results if r["bench"] == "replay"]
    if rep:
        print("### Replay throughput: `anomalyd score`, 8 features, dense model, one core\n")
        print(f"`{a.command_replay}`\n")
        print(
            f"{rep[0]['rows']:,} NDJSON rows (8 features, 1000 keys), the quantile threshold, CSV output; "
            "time from the first row read to the last row written, as `anomalyd score` reports it. "
            "Target: 1,000,000 records/s/core.\n"
        )
        print("| binary | runs, records/s | median records/s | target |")
        print("|---|---|---|---|")
        medians = {}
        for binary in ("before", "after"):
            rs = [r["rows"] / r["seconds"] for r in rep if r["binary"] == binary]
            if not rs:
                continue
            medians[binary] = statistics.median(rs)
            met = "met" if medians[binary] >= 1e6 else "**not met**"
            label = "this commit" if binary == "after" else "baseline (`BENCH_BASELINE`)"
            print(f"| {label} | {runs(rs)} | {fmt(medians[binary])} | {met} |")
        if len(medians) == 2:
            print(f"\nafter/before: **{medians['after'] / medians['before']:.2f}×** (runs interleaved).")
        print()

    mem = [r for r in results if r["bench"] == "memory"]
    if mem:
        print("### Memory per tracked key\n")
        print(f"`{a.command_memory}`\n")
        print(
            "Keys created through the detector (window, threshold and alert state, the LRU entry); "
            "each row in a fresh process: RSS after, and its growth over the process before the "
            "keys, divided by the keys.\n"
        )
        print("| model | threshold | keys | rows per key | RSS MB | growth MB | bytes per key |")
        print("|---|---|---|---|---|---|---|")
        for r in mem:
            print(
                f"| {r['model']} | {r['threshold']} | {r['keys']:,} | {r['rows_per_key']} | "
                f"{fmt(r['rss_mb'], 0)} | {fmt(r['growth_mb'], 0)} | {fmt(r['bytes_per_key'], 0)} |"
            )
        print()

    tvo = [r for r in results if r["bench"] == "tract_vs_ort"]
    if tvo:
        rounds = tvo[0]["rounds"]
        print("### tract vs onnxruntime (one thread each, same process, same inputs)\n")
        print(f"`{a.command_tract}`\n")
        print(
            f"Median over {rounds} rounds of the mean time per call; ratio = median of the per-round "
            "ratios. `tract` is `Model::infer` as the daemon calls it (a fresh tract state per call); "
            "`tract-state` reuses one state. Target: ORT/tract ≥ 1 (tract no slower).\n"
        )
        print(
            "| model | batch | tract µs/call | tract-state µs/call | onnxruntime µs/call | ORT/tract | ORT/tract-state | target | max abs diff of `error` |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for r in tvo:
            met = "met" if r["ort_over_tract"] >= 1.0 else "**not met**"
            print(
                f"| {r['model']} | {r['batch']} | {fmt(r['tract_us'])} | {fmt(r['tract_state_us'])} | "
                f"{fmt(r['ort_us'])} | {r['ort_over_tract']:.2f} | {r['ort_over_tract_state']:.2f} | {met} | "
                f"{r['max_abs_diff_error']:.1e} |"
            )
        print()
    loads = [r for r in results if r["bench"] == "model_load"]
    if loads:
        print(
            "Model load (parse, type, optimise; same command, median of 5): what a model swap costs "
            "the daemon before the new version serves (`anomalyd_model_swap_seconds` reports each swap), "
            "and the `models_loaded` step of its cold start.\n"
        )
        print("| model | load ms |\n|---|---|")
        for r in loads:
            print(f"| {r['model']} | {fmt(r['load_ms'])} |")
        print()

    lstm = [r for r in results if r["bench"] == "replay_lstm"]
    if lstm:
        print("### The recurrent model through `anomalyd score`, one core\n")
        print(f"`{a.command_lstm}`\n")
        rates = [r["rows"] / r["seconds"] for r in lstm]
        met = "met" if statistics.median(rates) >= 1e5 else "**not met**"
        print(
            f"{lstm[0]['rows']:,} CSV rows (the demo fleet's hosts copied under new names), the shipped "
            f"demo-lstm (window 16), CSV output: runs {runs(rates)} records/s, median "
            f"**{fmt(statistics.median(rates))}** (target ≥ 100,000: {met}).\n"
        )

    spot = [r for r in results if r["bench"] == "threshold"]
    if spot:
        print("### SPOT's judge against the quantile's\n")
        print(f"`{a.command_threshold}`\n")
        print(
            "Criterion's median time to judge the case's scores (a fresh copy of the threshold each "
            "iteration); target: SPOT at the quantile's cost, amortised (≤ 1.1×).\n"
        )
        print("| case | scores | SPOT µs | quantile µs | SPOT/quantile | target |")
        print("|---|---|---|---|---|---|")
        by = {(r["method"], r["case"]): r for r in spot}
        for case in sorted({r["case"] for r in spot}):
            s, q = by.get(("spot", case)), by.get(("quantile", case))
            if not (s and q):
                continue
            ratio = s["ns"] / q["ns"]
            met = "met" if ratio <= 1.1 else "**not met**"
            print(f"| {case} | {s['scores']:,} | {fmt(s['ns'] / 1e3)} | {fmt(q['ns'] / 1e3)} | {ratio:.2f}× | {met} |")
        print()

    thr = next((r for r in results if r["bench"] == "kafka_throughput"), None)
    if thr:
        print("### Kafka end to end: throughput, anomalyd vs the Python baseline (tansu broker)\n")
        print(f"`{a.command_kafka}`\n")
        print(
            f"{thr['records']:,} demo-fleet records ({thr['hosts']} hosts, {thr['partitions']} partitions) "
            f"produced first (at {fmt(thr['produce_records_per_s'])} records/s); each run is a fresh "
            "consumer group from the start of the topic, timed from its first record consumed "
            "(group join and model load excluded). anomalyd: until `anomalyd_records_total` reaches "
            f"{thr['records']:,} (the rate over its first {thr['python_records']:,} is the column used "
            f"for the ratio); Python: {thr['python_records']:,} records scored, alerted and committed. "
            f"CPU: {thr['pinning']}; tansu, producer and readers on the other core. "
            "CPU µs/record is the consumer process's user + system time over the same span.\n"
        )
        print("| consumer | records/s, each run | median records/s | CPU µs/record (median) | peak RSS MB (median) |")
        print("|---|---|---|---|---|")
        med = lambda k: statistics.median(thr[k]) if thr[k] else float("nan")
        print(
            f"| anomalyd (all {thr['records']:,}) | {runs(thr['anomalyd_records_per_s'])} | "
            f"{fmt(med('anomalyd_records_per_s'))} | {fmt(med('anomalyd_cpu_us_per_record'), 2)} | "
            f"{fmt(med('anomalyd_peak_rss_mb'))} |"
        )
        print(
            f"| anomalyd (first {thr['python_records']:,}) | {runs(thr['anomalyd_prefix_records_per_s'])} | "
            f"{fmt(med('anomalyd_prefix_records_per_s'))} | | |"
        )
        if thr.get("anomalyd_startup_s"):
            print(
                f"\nCold start: from spawning `anomalyd run` to its first record counted on `/metrics` "
                f"(model load, group join, state restore; polled every 50 ms): "
                f"{', '.join(f'{v:.2f}' for v in thr['anomalyd_startup_s'])} s, median "
                f"**{med('anomalyd_startup_s'):.2f} s**."
            )
            phases = thr.get("anomalyd_startup_phases", [])
            if phases:
                steps = ", ".join(f"{p['phase']} {statistics.median(p['seconds']):.3f} s" for p in phases)
                print(
                    "The daemon's own account (`anomalyd_startup_seconds`, from its start, medians): "
                    f"{steps}; the group join is `assigned` − `models_loaded`, the state restore "
                    "`restored` − `assigned`.\n"
                )
        if thr["python_records_per_s"]:
            print(
                f"| Python (confluent-kafka + onnxruntime, batch 256) | {runs(thr['python_records_per_s'])} | "
                f"{fmt(med('python_records_per_s'))} | {fmt(med('python_cpu_us_per_record'), 2)} | "
                f"{fmt(med('python_peak_rss_mb'))} |"
            )
            met = "met" if thr["ratio_throughput"] >= 10 else "**not met**"
            print(
                f"\nRatios (median of the side-by-side pairs): throughput anomalyd/Python "
                f"**{thr['ratio_throughput']:.2f}×** (target ≥ 10×: {met}); CPU per record "
                f"Python/anomalyd **{thr['ratio_cpu']:.2f}×**.\n"
            )

    lats = [r for r in results if r["bench"] == "kafka_latency"]
    if lats:
        med = statistics.median
        print("### Kafka end to end: record-to-alert latency at half the throughput\n")
        print(
            f"Same command. Records sent at {fmt(med(lats[0]['achieved_rate']))} records/s (target "
            f"{fmt(lats[0]['target_rate'])}: half the median anomalyd throughput) for {lats[0]['seconds']} s "
            "per run by a producer with librdkafka's `linger.ms = 5`, 4 % of them latency spikes, "
            "`fire_after = 1`, `resolve_after = 1` (every spike fires, the next point resolves), the "
            "daemon's shipped defaults unless a row says otherwise; latency = arrival of the alert event "
            "on the alerts topic (read with `fetch.wait.max.ms = 1`) − the triggering record's send time; "
            "\"to produce\" ends at the alert's CreateTime instead (the input hop and the daemon, without "
            "the alert's own hop); records of each run's first second left out. A fresh topic and daemon "
            "per run.\n"
        )
        print(
            "| daemon settings | runs | alert events matched per run | p50 ms, each run | "
            "**median p50 ms** | p99 ms, each run | **median p99 ms** | to produce: median p50 / p99 ms "
            "| max ms, each run |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for lat in lats:
            settings = [f"`{k} = {v}`" for k, v in lat.get("daemon_properties", {}).items()]
            settings += [f"`{line}`" for line in lat.get("pipeline_toml", "").splitlines() if line]
            produced = (
                f"{fmt(med(lat['produced_p50_ms']))} / {fmt(med(lat['produced_p99_ms']))}"
                if "produced_p50_ms" in lat
                else ""
            )
            print(
                f"| {', '.join(settings) or 'defaults'} | {len(lat['p50_ms'])} | {runs(lat['matched'])} | "
                f"{runs(lat['p50_ms'], 1)} | **{fmt(med(lat['p50_ms']))}** | {runs(lat['p99_ms'], 1)} | "
                f"**{fmt(med(lat['p99_ms']))}** | {produced} | {runs(lat['max_ms'], 1)} |"
            )
        p99 = med(lats[0]["p99_ms"])
        print(f"\nTarget p99 ≤ 50 ms with the defaults: {'met' if p99 <= 50 else '**not met**'} ({fmt(p99)} ms).\n")

if __name__ == "__main__":
    main()
