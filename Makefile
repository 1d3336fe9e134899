# gradcam-node: `make run` starts the node, `make test` runs lint and the whole test suite.
# Both do all set-up on a fresh machine (virtual environment in .venv; DICOM peers from Debian for tests).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Debian packages the tests talk to, as "file:package"; the file may be a shell glob (PostgreSQL's
# programs are under a folder named after its version; tests/postgres.py starts a server of its own).
PEERS  := /usr/bin/storescu:dcmtk /usr/bin/dciodvfy:dicom3tools /usr/sbin/Orthanc:orthanc /usr/bin/chromium:chromium \
          '/usr/lib/postgresql/*/bin/initdb:postgresql'

.PHONY: run test lint venv peers demo clean demo-data demo-checkpoints

venv: $(STAMP)

# PyTorch is installed first (without its dependencies, which then come from the default index), so that
# pyproject.toml's "torch" is already satisfied by the build chosen here:
#   TORCH_WHEELS=DIR  torch and torchvision wheel files from DIR
#   TORCH_INDEX=URL   a PyTorch wheel index; the default, PyTorch's CPU builds, is used only on a Linux host
#                     without an NVIDIA GPU (no nvidia-smi) and only if the index answers within 5 s
#   TORCH_INDEX=      (empty) the default index: on Linux its wheels are CUDA builds (about 4 GB more)
# An existing .venv keeps its PyTorch: `rm -rf .venv` before choosing another build.
TORCH_PINS   := torch==2.14.1 torchvision==0.29.1
TORCH_INDEX  ?= https://download.pytorch.org/whl/cpu
TORCH_WHEELS ?=

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@set -e; pip="$(BIN)/python -m pip install -q"; \
	if [ -n "$(TORCH_WHEELS)" ]; then \
		echo "PyTorch: wheel files in $(TORCH_WHEELS)"; \
		$$pip --no-deps --no-index --find-links "$(TORCH_WHEELS)" $(TORCH_PINS); \
	elif [ -z "$(TORCH_INDEX)" ]; then \
		echo "PyTorch: default index (TORCH_INDEX is empty)"; \
	elif command -v nvidia-smi >/dev/null; then \
		echo "PyTorch: default index (nvidia-smi found: its CUDA build)"; \
	elif [ "$$(uname -s)" != Linux ]; then \
		echo "PyTorch: default index (not Linux: its wheels have no CUDA libraries)"; \
	elif $(BIN)/python -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)' \
			"$(patsubst %/,%,$(TORCH_INDEX))/torch/" 2>/dev/null; then \
		echo "PyTorch: CPU build from $(TORCH_INDEX) (no NVIDIA GPU here)"; \
		$$pip --no-deps --index-url "$(TORCH_INDEX)" $(TORCH_PINS); \
	else \
		echo "PyTorch: $(TORCH_INDEX) does not answer: default index (a CUDA build, about 4 GB more;"; \
		echo "  for the CPU build see README.md, 'PyTorch: CPU or CUDA build')"; \
	fi; \
	$$pip $(TORCH_PINS)
	$(BIN)/python -m pip install -q -e '.[test]'
	@# pytorch-grad-cam is only a test reference; --no-deps keeps its GUI OpenCV out (see pyproject.toml).
	$(BIN)/python -m pip install -q --no-deps grad-cam==1.5.7
	@touch $(STAMP)

peers:
	@missing=""; for p in $(PEERS); do \
		ls $${p%%:*} >/dev/null 2>&1 || missing="$$missing $${p##*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing test peers:$$missing"; \
		$(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q $$missing; \
	fi

run: $(STAMP)
	$(BIN)/gradcam-node serve

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: $(STAMP) peers lint
	$(BIN)/python -m pytest -q

demo: $(STAMP) peers
	$(BIN)/gradcam-node demo

clean:
	rm -rf var out .pytest_cache .ruff_cache

# The demo checkpoints' recipe (CPU, about an hour): phantoms with seeds 1 (train), 2 (threshold
# calibration) and 3 (held out), the three default models trained with CAM guidance. The files land in
# var/lab/ (var/demo/ is `make demo`'s); checkpoints/README.md says which ones were committed and with what
# figures.
LAB := var/lab
demo-data: $(STAMP)
	$(BIN)/gradcam-node phantoms --out $(LAB)/train --count 2400 --seed 1 --format png
	$(BIN)/gradcam-node phantoms --out $(LAB)/val --count 400 --seed 2 --format png
	$(BIN)/gradcam-node phantoms --out $(LAB)/test --count 400 --seed 3 --format png

demo-checkpoints: demo-data
	$(BIN)/gradcam-node train --data $(LAB)/train --model ResNet18 --epochs 6 --seed 0 \
		--val-fraction 0.1 --cam-guidance 1.0 --out $(LAB)/resnet18.pt
	@# EfficientNet-B0 and DenseNet121 did not learn at 224 px on the CPU in the time we had (val AUC
	@# < 0.75 after 2-4 epochs at 1e-3): 160 px input (about half the compute per image), a lower
	@# learning rate, smaller batches (twice the steps), lighter guidance. EfficientNet-B0 stayed at
	@# chance for 3 epochs even so, with augmentation and guidance: it is trained without either.
	$(BIN)/gradcam-node train --data $(LAB)/train --model EfficientNet-B0 --epochs 8 --seed 0 \
		--input-size 160 --batch-size 16 --lr 3e-4 --val-fraction 0.1 --cam-guidance 0 --no-augment \
		--out $(LAB)/efficientnet_b0_base.pt
	@# ...then fine-tuned from there with augmentation and CAM guidance, so that its maps point at lesions.
	$(BIN)/gradcam-node train --data $(LAB)/train --model EfficientNet-B0 --epochs 3 --seed 0 \
		--input-size 160 --batch-size 16 --lr 1e-4 --val-fraction 0.1 --cam-guidance 1.0 \
		--init $(LAB)/efficientnet_b0_base.pt --out $(LAB)/efficientnet_b0_ft.pt
	$(BIN)/gradcam-node train --data $(LAB)/train --model EfficientNet-B0 --epochs 3 --seed 0 \
		--input-size 160 --batch-size 16 --lr 1e-4 --val-fraction 0.1 --cam-guidance 2.0 \
		--init $(LAB)/efficientnet_b0_ft.pt --out $(LAB)/efficientnet_b0.pt
	$(BIN)/gradcam-node train --data $(LAB)/train --model DenseNet121 --epochs 5 --seed 0 \
		--input-size 160 --batch-size 16 --lr 3e-4 --val-fraction 0.1 --cam-guidance 0.5 --out $(LAB)/densenet121.pt
