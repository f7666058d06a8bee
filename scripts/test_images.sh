#!/usr/bin/env bash
# `make test-images`: build the images with buildah from a Debian bookworm base made by debootstrap, as an
# air-gapped site would, then run the CPU image as uid 10001 with a read-only root filesystem (runc with
# root.readonly, as Kubernetes' readOnlyRootFilesystem; tmpfs only where the chart mounts volumes):
# `subjectops --help`, `subjectops models check` and `subjectops refine` on the bundled example.
# Prints the build time, the image size and the exit codes. 10-40 minutes, so `make test` leaves it out.
#
#   IMAGES="cpu trainer" scripts/test_images.sh   # also build the trainer image and print torch.version.cuda
#   IMAGE_STORE=/var/tmp/store scripts/test_images.sh   # keep the image store (and its layers) for the next run
#
# Everything lives in a private image store, other buildah users on the machine are untouched. By default
# it is a temporary directory removed at the end, so no layers are left behind; with IMAGE_STORE it is kept,
# the base is made only once and unchanged layers are reused (remove the directory when done).
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGES=${IMAGES:-cpu}
STORAGE_DRIVER=${STORAGE_DRIVER:-overlay}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# The site's CA bundle goes into the base (the package proxy may need it); the machine's by default.
SITE_CA_BUNDLE=${SITE_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
# The CPU wheel index when it is reachable; else PyPI, whose Linux torch is the (much larger) CUDA build.
CPU_TORCH_INDEX=https://download.pytorch.org/whl/cpu
if [ -z "${TORCH_INDEX_URL:-}" ]; then
  if curl -fsS -m 10 -o /dev/null "$CPU_TORCH_INDEX/"; then TORCH_INDEX_URL=$CPU_TORCH_INDEX
  else TORCH_INDEX_URL=https://pypi.org/simple; echo "torch index: $CPU_TORCH_INDEX unreachable, using $TORCH_INDEX_URL"; fi
fi

for tool in buildah runc debootstrap curl; do
  command -v "$tool" >/dev/null || { echo "missing $tool: run \`make image-deps\` (as root)"; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "debootstrap and runc need root"; exit 1; }

if [ -n "${IMAGE_STORE:-}" ]; then work=$IMAGE_STORE; mkdir -p "$work"; else work=$(mktemp -d /var/tmp/subjectops-images.XXXXXX); fi
export BUILDAH_ISOLATION=chroot
# The private store, for this script's buildah calls and for `make images`' script alike.
export CONTAINERS_STORAGE_CONF=$work/storage.conf
printf '[storage]\ndriver = "%s"\ngraphroot = "%s"\nrunroot = "%s"\n' "$STORAGE_DRIVER" "$work/storage" "$work/run" \
  >"$CONTAINERS_STORAGE_CONF"
cleanup() {
  buildah unmount --all >/dev/null 2>&1 || true
  buildah rm --all >/dev/null 2>&1 || true
  # whatever an interrupted debootstrap or runc left mounted there, before anything is deleted
  awk -v w="$work/" 'index($2, w) == 1 {print $2}' /proc/mounts | sort -r | xargs -r -n1 umount -l
  rm -rf "$work/rootfs" "$work"/bundle-*
  if [ -z "${IMAGE_STORE:-}" ]; then buildah rmi --all --force >/dev/null 2>&1 || true; rm -rf "$work"; fi
}
trap cleanup EXIT
seconds_since() { echo $(( $(date +%s) - $1 )); }

# 1. The base: Debian bookworm's python3, `python` linked to it, the site's CA bundle, PIP_CERT naming it.
t0=$(date +%s)
if buildah inspect --type image localhost/subjectops-base:bookworm >/dev/null 2>&1; then
  echo "base: localhost/subjectops-base:bookworm from $work"
else
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$work/rootfs" "$DEBIAN_MIRROR" \
    >"$work/debootstrap.log" 2>&1 || { tail -20 "$work/debootstrap.log"; exit 1; }
  ln -sf python3 "$work/rootfs/usr/bin/python"
  cp "$SITE_CA_BUNDLE" "$work/rootfs/etc/ssl/certs/ca-certificates.crt"
  base=$(buildah from scratch)
  cp -a "$work/rootfs/." "$(buildah mount "$base")/"
  buildah config --env PIP_CERT=/etc/ssl/certs/ca-certificates.crt "$base"
  buildah commit --quiet "$base" localhost/subjectops-base:bookworm >/dev/null
  buildah rm "$base" >/dev/null
  rm -rf "$work/rootfs"
  echo "base: debootstrap bookworm in $(seconds_since "$t0") s"
fi

# 2. The images, built by `make images`' script into this store (the trainer's build stage reuses the CPU
# image's layers when both take torch from PyPI).
declare -A build_seconds
for image in $IMAGES; do
  t0=$(date +%s)
  ENGINE=buildah IMAGES=$image IMAGE_REGISTRY=localhost IMAGE_TAG=test \
    BASE_IMAGE=localhost/subjectops-base:bookworm TORCH_INDEX_URL=$TORCH_INDEX_URL scripts/build_images.sh \
    >"$work/build-$image.log" 2>&1 || { tail -30 "$work/build-$image.log"; exit 1; }
  build_seconds[$image]=$(seconds_since "$t0")
done

# 3. Run as uid 10001 on a read-only root: runc's OCI bundle over the image's mounted root filesystem.
# /tmp, /work (outputs) and /models (the model-cache PVC) are the only writable paths, as in the chart.
run_in() {  # run_in IMAGE ARGS...: the exit code of ARGS inside IMAGE
  local image=$1; shift
  local ctr bundle
  ctr=$(buildah from "localhost/subjectops-$image:test")
  bundle="$work/bundle-$ctr"
  mkdir -p "$bundle"
  buildah inspect --type container "$ctr" >"$bundle/container.json"
  python3 - "$bundle" "$(buildah mount "$ctr")" "$PWD/examples/subjects" "$@" <<'EOF'
import json, sys
bundle, rootfs, subjects, args = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
image = json.load(open(f"{bundle}/container.json"))["OCIv1"]["config"]
# owned by the user, as the chart's volumes are through fsGroup
tmpfs = lambda path: {"destination": path, "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777", "uid=10001", "gid=10001"]}
spec = {
    "ociVersion": "1.0.2",
    "root": {"path": rootfs, "readonly": True},
    "process": {"user": {"uid": 10001, "gid": 10001}, "args": args, "env": image["Env"], "cwd": image.get("WorkingDir") or "/",
                "noNewPrivileges": True, "capabilities": {"bounding": [], "effective": [], "permitted": []}},
    "hostname": "subjectops-test",
    "mounts": [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=268435456"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
        tmpfs("/tmp"), tmpfs("/work"), tmpfs("/models"),
        {"destination": "/data/subjects", "type": "bind", "source": subjects, "options": ["rbind", "ro"]},
    ],
    # A network namespace of its own with nothing in it: the commands must not need the network.
    "linux": {"namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")],
              "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
              "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]},
}
json.dump(spec, open(f"{bundle}/config.json", "w"), indent=1)
EOF
  local rc=0
  runc run --bundle "$bundle" "subjectops-test-$ctr" </dev/null >"$bundle/out.log" 2>&1 || rc=$?
  if [ "$rc" != 0 ]; then tail -15 "$bundle/out.log" >&2; fi
  buildah unmount "$ctr" >/dev/null; buildah rm "$ctr" >/dev/null
  echo "$rc"
}

rc_help=$(run_in cpu subjectops --help)
rc_check=$(run_in cpu subjectops models check --model tiny-sd15)  # exit 1 when a weight the plan needs is missing
rc_refine=$(run_in cpu subjectops refine /data/subjects/teapot --class teapot --model tiny-sd15 --out /work/refine)
cuda=""
if [[ " $IMAGES " == *" trainer "* ]]; then
  ctr=$(buildah from localhost/subjectops-trainer:test)
  cuda=$(buildah run --user 10001:10001 "$ctr" -- python -c "import torch; print(torch.version.cuda)")
  buildah rm "$ctr" >/dev/null
fi

echo
echo "images built with buildah ($STORAGE_DRIVER) from debootstrap bookworm; torch from $TORCH_INDEX_URL"
for image in $IMAGES; do
  echo "  subjectops-$image: build ${build_seconds[$image]} s, size $(buildah images --format '{{.Size}}' "localhost/subjectops-$image:test")"
done
[ -n "$cuda" ] && echo "  trainer: torch.version.cuda = $cuda"
echo "inside subjectops-cpu as uid 10001, read-only root filesystem:"
echo "  subjectops --help                   exit $rc_help"
echo "  subjectops models check (tiny)      exit $rc_check"
echo "  subjectops refine (bundled teapot)  exit $rc_refine"
[ "$rc_help$rc_check$rc_refine" = 000 ]
