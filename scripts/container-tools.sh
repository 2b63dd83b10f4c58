#!/usr/bin/env bash
# What the container image test (tests/deploy.rs, "the container image") needs, from nothing:
#   - podman, buildah, runc and debootstrap from Debian's packages;
#   - a podman configuration whose state all lives under target/podman (containers.conf and
#     storage.conf there; the test points CONTAINERS_CONF and CONTAINERS_STORAGE_CONF at them);
#   - two local base images made from Debian's packages, since no container registry is
#     reachable here: the build stage's (a debootstrap minbase, with a shell, zlib and libssl)
#     and the runtime stage's (a look-alike of gcr.io/distroless/cc-debian12:nonroot: the same
#     Debian packages unpacked, no shell, the nonroot user 65532).
# The image itself is built by the test, from deploy/Dockerfile with these bases as build args.
# Cached: the bases are rebuilt only when this script changes. Prints the podman configuration.
#
# Why these settings (measured on this machine, docs/NOTES.md): crun refuses this host's hybrid
# cgroup v1/v2 layout, runc works; podman's default ulimits exceed what the sandbox may set.
set -euo pipefail
script="$(realpath "${BASH_SOURCE[0]}")"
cd "$(dirname "$script")/.."
state="$PWD/target/podman"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
release=bookworm
version="$(sha256sum "$script" | cut -c1-12)"
build_base="localhost/anomalyd-build-base:$version"
runtime_base="localhost/anomalyd-runtime-base:$version"

missing=()
for tool in podman buildah runc debootstrap; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ((${#missing[@]})); then
    echo "installing ${missing[*]} (Debian packages)" >&2
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        podman buildah runc catatonit debootstrap >/dev/null
fi

mkdir -p "$state/tmp"
cat >"$state/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$state/storage"
runroot = "$state/run"
EOF
cat >"$state/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$(ulimit -Hn):$(ulimit -Hn)", "nproc=4096:4096"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$state/events.log"
tmp_dir = "$state/libpod-tmp"
volume_path = "$state/volumes"
static_dir = "$state/storage/libpod"
[network]
network_config_dir = "$state/networks"
EOF
export CONTAINERS_CONF="$state/containers.conf" CONTAINERS_STORAGE_CONF="$state/storage.conf" TMPDIR="$state/tmp"

# Bases of an older version of this script.
old="$(podman images --format '{{.Repository}}:{{.Tag}}' | grep -E '^localhost/anomalyd-(build|runtime)-base:' |
    grep -v ":$version\$" || true)"
[[ -z "$old" ]] || podman rmi -f $old >/dev/null

if ! podman image exists "$build_base"; then
    echo "making $build_base (debootstrap $release minbase)" >&2
    root="$state/rootfs-build"
    rm -rf "$root"
    debootstrap --variant=minbase --include=libssl3 "$release" "$root" "$mirror" >"$state/debootstrap.log" 2>&1 ||
        { tail -20 "$state/debootstrap.log" >&2; exit 1; }
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" -c . | podman import -q \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["/bin/bash"]' - "$build_base" >/dev/null
    rm -rf "$root"
fi

if ! podman image exists "$runtime_base"; then
    echo "making $runtime_base (distroless/cc-debian12 look-alike from Debian packages)" >&2
    root="$state/rootfs-runtime"
    debs="$state/debs"
    rm -rf "$root" "$debs"
    mkdir -p "$root" "$debs"
    # The packages of gcr.io/distroless/cc-debian12 (no zlib: the Dockerfile copies libz.so.1
    # from its build stage, as it must for the real base too).
    (cd "$debs" && apt-get download -q -o APT::Sandbox::User=root base-files netbase tzdata \
        ca-certificates libc6 libssl3 libgcc-s1 libgomp1 libstdc++6 >/dev/null)
    for deb in "$debs"/*.deb; do dpkg-deb -x "$deb" "$root"; done
    mkdir -p "$root/etc/ssl/certs" # the bundle ca-certificates' postinst would make
    cat "$root"/usr/share/ca-certificates/mozilla/*.crt >"$root/etc/ssl/certs/ca-certificates.crt"
    printf '%s\n' 'root:x:0:0:root:/root:/sbin/nologin' 'nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin' \
        'nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin' >"$root/etc/passwd"
    printf '%s\n' root:x:0: tty:x:5: staff:x:50: nogroup:x:65534: nonroot:x:65532: >"$root/etc/group"
    printf '%s\n' 'passwd: files' 'group: files' 'hosts: files dns' 'networks: files' 'protocols: files' \
        'services: files' >"$root/etc/nsswitch.conf"
    install -d -m 1777 "$root/tmp"
    install -d -m 0700 "$root/root"
    install -d -m 0700 -o 65532 -g 65532 "$root/home/nonroot"
    ln -sf /usr/share/zoneinfo/Etc/UTC "$root/etc/localtime"
    # No shell, no package tools, no documentation: what distroless leaves out.
    rm -rf "$root"/usr/share/{doc,man,info,lintian,locale,common-licenses,base-files,gcc,gdb} \
        "$root"/usr/share/ca-certificates "$root"/usr/share/zoneinfo/{right,posix} \
        "$root"/bin "$root"/sbin "$root"/usr/bin "$root"/usr/sbin "$root"/usr/lib/x86_64-linux-gnu/gconv \
        "$root"/etc/{profile,dot.bashrc,dot.profile,dot.profile.md5sums,motd,update-motd.d,legal,skel}
    tar -C "$root" -c . | podman import -q \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
        --change 'USER 65532:65532' --change 'WORKDIR /home/nonroot' - "$runtime_base" >/dev/null
    rm -rf "$root" "$debs"
fi

# The test reads these (KEY=VALUE lines).
cat >"$state/bases.env" <<EOF
BUILD_BASE=$build_base
RUNTIME_BASE=$runtime_base
EOF
echo "podman $(podman --version | awk '{print $NF}'): $build_base, $runtime_base ($state)"
