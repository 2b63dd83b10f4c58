"""Writes the replay benchmark's data: 8 correlated features driven by 2 latent factors.

    python benches/replay_data.py --rows 1000000 --keys 1000 --out target/perf/replay.ndjson
    python benches/replay_data.py --rows 20000 --keys 50 --csv --out target/perf/train.csv

NDJSON records look like what a metrics pipeline sends: a key, a timestamp and the features.
"""
import argparse
import json

import numpy as np

FEATURES = [f"f{i}" for i in range(8)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, required=True)
    ap.add_argument("--keys", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--csv", action="store_true", help="write CSV (for training) instead of NDJSON")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    rng = np.random.default_rng(a.seed)
    mix = rng.normal(size=(2, 8))
    offset = rng.uniform(10, 100, size=8)
    with open(a.out, "w") as out:
        if a.csv:
            out.write("key,ts," + ",".join(FEATURES) + "\n")
        chunk = 100_000
        for start in range(0, a.rows, chunk):
            n = min(chunk, a.rows - start)
            t = np.arange(start, start + n)
            latent = np.stack([np.sin(t / 50.0 + t % 7), np.cos(t / 80.0)], axis=1)
            values = offset + 10 * latent @ mix + rng.normal(scale=0.5, size=(n, 8))
            keys = t % a.keys
            for i in range(n):
                v = values[i]
                if a.csv:
                    out.write(f"k{keys[i]},{t[i]}," + ",".join(f"{x:.4f}" for x in v) + "\n")
                else:
                    rec = {"key": f"k{keys[i]}", "ts": int(t[i])}
                    rec.update({f: round(float(x), 4) for f, x in zip(FEATURES, v)})
                    out.write(json.dumps(rec, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main()
