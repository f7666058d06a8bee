# syntax=docker/dockerfile:1
# CUDA trainer image: every GPU stage (priors, pretrain-disc, finetune, infer, evaluate) runs here.
#
#   docker build -f images/trainer.Dockerfile -t REGISTRY/subjectops-trainer:0.1.0 .
#
# CUDA comes from torch's own nvidia-* wheels (PyPI's Linux torch wheels are CUDA builds), the driver
# from the node through the NVIDIA container toolkit, so any glibc Python base works. BASE_IMAGE lets
# an air-gapped build use a local base (for instance one made with debootstrap and buildah, as
# scripts/test_images.sh does); a site whose package proxy needs its own CA puts the bundle in that base
# and sets PIP_CERT (and PIP_INDEX_URL) there as ENV: every pip step here reads them.
ARG BASE_IMAGE=python:3.11.14-slim-bookworm
# Policy-scanner (checkov) exceptions, with their reasons:
#checkov:skip=CKV_DOCKER_7:FROM takes the BASE_IMAGE argument, whose default above is a pinned version tag; checkov does not expand ARGs
#checkov:skip=CKV_DOCKER_2:Kubernetes ignores HEALTHCHECK; the chart probes the MLflow server over HTTP, and the stage containers are batch jobs with nothing to probe

FROM ${BASE_IMAGE} AS build
ARG TORCH_INDEX_URL=https://pypi.org/simple
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the index that carries the wanted CUDA build; the rest are pinned in pyproject.toml.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"
WORKDIR /src
# The pinned dependencies next, from pyproject.toml alone, so a code change rebuilds only the last layer
# (never torch or the dependencies).
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['kube']))" > requirements.txt \
 && pip install --no-cache-dir -r requirements.txt
COPY README.md* ./
COPY src/ ./src/
RUN pip install --no-cache-dir --no-deps "." && pip check

FROM ${BASE_IMAGE}
ARG HF_HUB_OFFLINE=1
LABEL org.opencontainers.image.title="subjectops-trainer" \
      org.opencontainers.image.description="subjectops GPU stages: priors, pretrain-disc, finetune, infer, evaluate" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed, unprivileged uid/gid: the chart's securityContext and the model-cache PVC permissions use it.
# /gcs, /minio and /s3 are where the KFP v2 launcher puts artifacts; older backends do not mount them,
# and a non-root user could not create them.
RUN groupadd --system --gid 10001 subjectops \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/subjectops --create-home \
        --shell /usr/sbin/nologin subjectops \
 && mkdir -p /models /work /gcs /minio /s3 \
 && chown 10001:10001 /models /work /gcs /minio /s3
COPY --from=build /opt/venv /opt/venv
# /models is where the chart mounts the model-cache PVC: the hub cache, the tiny presets
# (SUBJECTOPS_HOME), the priors cache and metric encoders live there, never on the read-only root
# filesystem, and pods never download weights at run time (HF_HUB_OFFLINE=1 by default; set
# HF_HUB_OFFLINE=0 at build or run time where a hub is reachable).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/subjectops \
    HF_HOME=/models/huggingface \
    HF_HUB_CACHE=/models/huggingface/hub \
    TORCH_HOME=/models/torch \
    SUBJECTOPS_HOME=/models/subjectops \
    HF_HUB_OFFLINE=${HF_HUB_OFFLINE} \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=1 \
    DVC_NO_ANALYTICS=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /work
USER 10001:10001
ENTRYPOINT ["subjectops"]
CMD ["--help"]
