# syntax=docker/dockerfile:1
# CPU image: the CPU stages (configure, fetch-subject, refine, register, benchmark aggregation), the
# MLflow server of the Helm chart and the model-cache fill Job run here.
#
#   docker build -f images/cpu.Dockerfile -t REGISTRY/subjectops-cpu:0.1.0 .
#
# torch comes from the CPU-only wheel index (a tenth of the CUDA build's size). BASE_IMAGE lets an
# air-gapped build use a local base (for instance one made with debootstrap and buildah, as
# scripts/test_images.sh does); a site whose package proxy needs its own CA puts the bundle in that base
# and sets PIP_CERT (and PIP_INDEX_URL) there as ENV: every pip step here reads them.
ARG BASE_IMAGE=python:3.11.14-slim-bookworm
# Policy-scanner (checkov) exceptions, with their reasons:
#checkov:skip=CKV_DOCKER_7:FROM takes the BASE_IMAGE argument, whose default above is a pinned version tag; checkov does not expand ARGs
#checkov:skip=CKV_DOCKER_2:Kubernetes ignores HEALTHCHECK; the chart probes the MLflow server over HTTP, and the stage containers are batch jobs with nothing to probe

FROM ${BASE_IMAGE} AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
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
LABEL org.opencontainers.image.title="subjectops-cpu" \
      org.opencontainers.image.description="subjectops CPU stages, MLflow server and model-cache tools" \
      org.opencontainers.image.licenses="Apache-2.0"
# /gcs, /minio and /s3 are where the KFP v2 launcher puts artifacts; older backends do not mount them,
# and a non-root user could not create them.
RUN groupadd --system --gid 10001 subjectops \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/subjectops --create-home \
        --shell /usr/sbin/nologin subjectops \
 && mkdir -p /models /work /gcs /minio /s3 \
 && chown 10001:10001 /models /work /gcs /minio /s3
COPY --from=build /opt/venv /opt/venv
# `subjectops submit` and `benchmark submit|schedule` (the chart's CronJob) compile the pipelines from these.
COPY components/ /opt/subjectops/components/
COPY pipelines/ /opt/subjectops/pipelines/
# Caches go to /models (the model-cache PVC), never to the read-only root filesystem.
ENV PATH=/opt/venv/bin:$PATH \
    SUBJECTOPS_KFP_HOME=/opt/subjectops \
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
    DVC_NO_ANALYTICS=1
WORKDIR /work
USER 10001:10001
ENTRYPOINT ["subjectops"]
CMD ["--help"]
