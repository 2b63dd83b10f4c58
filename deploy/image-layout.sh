#!/bin/sh
# The image's files, laid out under $1 by either binary stage of deploy/Dockerfile (run from
# the directory holding models/ and anomalyd.example.toml), then checked by running the binary:
#   /usr/local/bin/anomalyd                          the daemon (already there)
#   /usr/local/share/anomalyd/models/*.onnx          the shipped models
#   /usr/local/share/anomalyd/examples/anomalyd.toml the example configuration; its model paths
#                                                    (../models/…) resolve to the shipped models
#   /usr/lib/<arch>/libz.so.1                        zlib, which the distroless base lacks
set -eu
out="$1"
install -D -m 0644 -t "$out/usr/local/share/anomalyd/models" models/*.onnx
install -D -m 0644 anomalyd.example.toml "$out/usr/local/share/anomalyd/examples/anomalyd.toml"
for lib in /usr/lib/*/libz.so.1; do
    install -D -m 0644 "$lib" "$out$lib"
done
"$out/usr/local/bin/anomalyd" --version
"$out/usr/local/bin/anomalyd" check -c "$out/usr/local/share/anomalyd/examples/anomalyd.toml" >/dev/null
