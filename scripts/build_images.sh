#!/usr/bin/env bash
# `make images`: build the CPU and trainer images with the first engine that works here: a docker or podman
# that answers `info` (a docker client without a daemon does not count), else buildah.
#
#   make images [ENGINE=docker|podman|buildah] [IMAGE_REGISTRY=registry.example.org/team] [IMAGE_TAG=0.1.0]
#               [BASE_IMAGE=localhost/py311-site:bookworm] [TORCH_INDEX_URL=https://pypi.example.org/simple]
#               [IMAGES="cpu trainer"]
#
# buildah and podman keep images where containers/storage says (CONTAINERS_STORAGE_CONF names another store:
# `make test-images` builds through this script into its private one).
# BASE_IMAGE and TORCH_INDEX_URL are passed on only when set (the Dockerfiles' defaults apply otherwise).
set -euo pipefail
cd "$(dirname "$0")/.."

engine=${ENGINE:-}
if [ -z "$engine" ]; then
  for candidate in docker podman; do
    if command -v "$candidate" >/dev/null && timeout 20 "$candidate" info >/dev/null 2>&1; then engine=$candidate; break; fi
  done
fi
if [ -z "$engine" ]; then
  command -v buildah >/dev/null || { echo "no working docker or podman, and no buildah: install one (\`make image-deps\` installs buildah)" >&2; exit 1; }
  engine=buildah
fi
case $engine in docker|podman|buildah) ;; *) echo "ENGINE must be docker, podman or buildah, not $engine" >&2; exit 1 ;; esac
registry=${IMAGE_REGISTRY:-localhost}
tag=${IMAGE_TAG:-$(python3 -c "import tomllib; print(tomllib.load(open('pyproject.toml', 'rb'))['project']['version'])")}

args=()
[ -n "${BASE_IMAGE:-}" ] && args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
[ -n "${TORCH_INDEX_URL:-}" ] && args+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
for image in ${IMAGES:-cpu trainer}; do
  dockerfile="images/$image.Dockerfile"
  echo "$engine: building $registry/subjectops-$image:$tag"
  case $engine in
    docker) DOCKER_BUILDKIT=1 docker build -f "$dockerfile" "${args[@]}" -t "$registry/subjectops-$image:$tag" . ;;
    podman) podman build --layers --network host -f "$dockerfile" --ignorefile "$dockerfile.dockerignore" "${args[@]}" \
              -t "$registry/subjectops-$image:$tag" . ;;
    buildah) buildah bud --layers --network host -f "$dockerfile" --ignorefile "$dockerfile.dockerignore" "${args[@]}" \
              -t "$registry/subjectops-$image:$tag" . ;;
  esac
done
