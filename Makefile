# subjectops: `make demo` (set up + run the example subject on the tiny model), `make test` (the test suite).
SHELL := /bin/bash
VENV ?= .venv
BIN := $(VENV)/bin
# Real weights cannot be downloaded here, and an unreachable hub hangs for minutes: stay offline.
export HF_HUB_OFFLINE ?= 1
export MLFLOW_DISABLE_TELEMETRY ?= true
export DO_NOT_TRACK ?= 1
export DVC_NO_ANALYTICS ?= 1

.PHONY: install system-deps image-deps demo world generate test test-images images bench scan clean

$(BIN)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, exactly pinned: pip takes it from this machine's wheel cache.
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[test,kube]'
	touch $@

install: $(BIN)/.installed

# What the tests drive as a user would: Debian's Chromium (report rendering), unzip (helm from PyPI), git,
# PostgreSQL (MLflow's backend store in the tracking tests; the tests start their own cluster).
TEST_PACKAGES := chromium unzip git postgresql
# What `make test-images` builds and runs the images with.
IMAGE_PACKAGES := buildah runc debootstrap curl

system-deps:
	scripts/apt_install.sh $(TEST_PACKAGES)
	scripts/get_helm.sh

image-deps:
	scripts/apt_install.sh $(IMAGE_PACKAGES)

# Both images with docker, podman or buildah (whichever works here); see scripts/build_images.sh for the settings.
images:
	scripts/build_images.sh

# 10-40 minutes (debootstrap, a torch install, a read-only run as uid 10001), so not part of `make test`.
test-images: image-deps
	scripts/test_images.sh

# The miniature world's pretrained models, trained from scratch on this machine (about an hour on 2 cores; resumes
# where it stopped). The shipped weights in src/subjectops/world/weights came from this command (their manifest.json).
world: install
	$(BIN)/subjectops world build

# The demo personalizes a world subject (a teapot with a decal no caption of the world describes) on world-sd15,
# the Stable-Diffusion-shaped model pretrained on the miniature world (src/subjectops/world), with DreamBooth at the
# paper's steps and a learning rate scaled to the world (examples/world-dreambooth.set says why), and draws
# DreamBench's 8 contexts the world knows, each beside the base model's "a teapot ...".
DEMO_SUBJECT := src/subjectops/world/shipped_subjects/world-teapot-3
DEMO_SET := $(addprefix --set ,$(shell grep -v '^\#' examples/world-dreambooth.set))

demo: install
	$(BIN)/subjectops run $(DEMO_SUBJECT)/photos --class teapot --model world-sd15 --out runs/demo $(DEMO_SET)

# One pytest worker per core, tests grouped by module so a module's fixtures are built once, the slowest modules
# first (tests/conftest.py); conftest gives each worker one torch thread (workers of two threads each on two cores
# spin against each other). A third worker on this 2-core machine measured no faster (9 min 34 s vs 9 min 36 s for
# two, back to back on 105be8c).
TEST_WORKERS ?= $(shell nproc)
test: install system-deps
	$(BIN)/ruff check src tests components pipelines bench scripts
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder

# What the stage registry generates: dvc.yaml (for the example subject) and the compiled Kubeflow pipelines. Run it
# after adding or changing a stage; tests/test_plan.py and tests/test_pipelines_compiled.py fail until it is run.
generate: install
	$(BIN)/subjectops dvc-yaml examples/subjects/teapot --class teapot --out dvc.yaml
	$(BIN)/python -m pipelines.compile

bench: install
	$(BIN)/python bench/train_step.py
	$(BIN)/python bench/eval_throughput.py

# Policy scan of the rendered chart (every optional feature on) and the Dockerfiles. checkov lives in its own venv:
# its pins would fight the project's. Exceptions are annotated inline with their reasons (docs/reliability.md).
SCAN_VENV ?= .venv-scan
CHECKOV_VERSION ?= 3.3.30
HELM ?= $(shell test -x tools/helm && echo tools/helm || command -v helm)

$(SCAN_VENV)/.installed:
	python3 -m venv $(SCAN_VENV)
	$(SCAN_VENV)/bin/pip install -q checkov==$(CHECKOV_VERSION)
	touch $@

scan: $(SCAN_VENV)/.installed
	@mkdir -p $(SCAN_VENV)/rendered
	$(HELM) template subjectops charts/subjectops --namespace subjectops \
	  --set benchmark.cronJob.enabled=true --set modelCache.fill.enabled=true > $(SCAN_VENV)/rendered/chart.yaml
	$(SCAN_VENV)/bin/checkov --quiet --compact --skip-download --framework kubernetes -f $(SCAN_VENV)/rendered/chart.yaml
	$(SCAN_VENV)/bin/checkov --quiet --compact --skip-download --framework dockerfile -d images

clean:
	rm -rf runs cache mlruns mlruns.db
