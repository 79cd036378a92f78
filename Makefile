# One-command set-up and entry points:
#   make demo   the main job (installs what is missing on the way)
#   make test   the whole test suite (what .ci/run runs)
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
# the set-up's pins, from their one source (requirements.txt)
MMCV_VERSION := $(shell sed -n 's/^mmcv==//p' requirements.txt)
TORCH_VERSION := $(shell sed -n 's/^torch==//p' requirements.txt)
MMDET_TOOLS = $$($(VPY) -c "import mmdet, os; print(os.path.join(os.path.dirname(mmdet.__file__), '.mim', 'tools'))")
DATA := data/shapes/annotations/instances_val.json
CKPT := checkpoints/detr_tiny_shapes.pth

.PHONY: demo test data train eval venv detr-reference train-dino \
	train-deformable

venv: $(VENV)/.stamp $(VENV)/.quiet

# The stamp is written only once everything imports, so a second run does
# nothing. torch is pinned here (CPU build), not in setup.py: GPU users bring
# their own. mmcv 2.1.0 has no wheel for this platform: it builds from the
# sdist once (~10-15 min on 2 cores) and pip caches the wheel. The build needs
# torch and pkg_resources (setuptools < 81; torch asks for >= 77).
$(VENV)/.stamp: requirements.txt setup.py
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip wheel ninja
	$(VPY) -m pip install --quiet torch==$(TORCH_VERSION) numpy
	$(VPY) -m pip install --quiet 'setuptools>=77,<81'
	$(VPY) -c "import mmcv.ops" 2>/dev/null || \
	  MMCV_WITH_OPS=1 MAX_JOBS=2 $(VPY) -m pip install --no-build-isolation mmcv==$(MMCV_VERSION)
	$(VPY) -m pip install --quiet -r requirements.txt
	$(VPY) -m pip install --quiet --no-build-isolation -e '.[openvino]'
	$(VPY) -c "import mmcv.ops, mmdet, mmdet_hawq, scipy, matplotlib, pycocotools"
	touch $@

# setuptools < 81 (pinned above for mmcv's build) warns 'pkg_resources is
# deprecated' whenever mmengine imports it: noise at the top of every command,
# mmdet's own tools included. A .pth file in the venv's site-packages filters
# that one warning at interpreter start-up.
$(VENV)/.quiet: | $(VENV)/.stamp
	echo "import warnings; warnings.filterwarnings('ignore', message='pkg_resources is deprecated', category=UserWarning)" \
	  > "$$($(VPY) -c 'import site; print(site.getsitepackages()[0])')/quiet_pkg_resources.pth"
	touch $@

data: $(DATA)
$(DATA): | $(VENV)/.stamp
	$(VPY) tools/make_shapes_dataset.py --out-dir data/shapes

# Evaluate the shipped small DETR with mmdet's own test script.
eval: venv data
	$(VPY) $(MMDET_TOOLS)/test.py configs/detr/detr_tiny_shapes.py $(CKPT) --work-dir work_dirs/eval_float

# The main job: Out Sen Quant at 5 bits on the small DETR, beside float and
# uniform 5-bit (sensitivity cached in work_dirs/demo/hawq/cache).
demo: venv data
	$(VPY) tools/ptq.py configs/detr/detr_tiny_shapes_outquant_5bit.py --float --uniform-baseline --work-dir work_dirs/demo

# The test suite; it installs the DETR reference first where it can (a failed
# install is reported and its one test is skipped, the rest runs). Two
# pytest-xdist workers of one torch thread each, one per core (tests/conftest.py);
# `pytest -m "not slow" tests` leaves out the integration tests. The second
# line dry-runs the CPU-against-CUDA tests with the CPU in the GPU's place,
# so that they cannot rot between the sessions lent a GPU (docs/gpu.md).
test: venv data
	-$(MAKE) detr-reference
	$(VPY) -m pytest -q -n 2 tests
	$(VPY) -m pytest -q -n 2 -m cuda --gpu-device cpu tests/test_engine/test_cuda.py

# The original facebookresearch DETR code (PyPI detr 0.1.4) in a venv of its
# own, the reference of tests/test_models/test_official_detr.py: torch 2.14.1
# and torchvision 0.29.1 (a CUDA build, run on the CPU; pip takes both from
# this machine's disk), 5.6 GB, about 2.5 min once. detr installs top-level
# packages named models, util and datasets: never into .venv.
REF := .venv-detr-ref
detr-reference: $(REF)/.stamp
$(REF)/.stamp:
	test -x $(REF)/bin/python || $(PY) -m venv $(REF)
	echo '*' > $(REF)/.gitignore
	$(REF)/bin/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1 scipy pycocotools
	$(REF)/bin/python -m pip install --quiet --no-deps detr==0.1.4
	$(REF)/bin/python tests/test_models/detr_reference.py keys $(REF)/keys.json
	touch $@

# Reproduce checkpoints/detr_tiny_shapes.pth (about 70 min on 2 CPU cores):
# pretrain the backbone on the train split, then train DETR from it.
train: venv data
	$(VPY) $(MMDET_TOOLS)/train.py configs/shapes/shapes_backbone_pretrain.py --work-dir work_dirs/shapes_backbone_pretrain --resume
	$(VPY) tools/export_checkpoint.py work_dirs/shapes_backbone_pretrain checkpoints/shapes_backbone.pth --fp32
	$(VPY) $(MMDET_TOOLS)/train.py configs/detr/detr_tiny_shapes.py --work-dir work_dirs/detr_tiny_shapes --resume
	$(VPY) tools/export_checkpoint.py work_dirs/detr_tiny_shapes $(CKPT)

# The small DETR-family models (configs/<name>/<name>_tiny_shapes.py), trained with
# mmdet's own loop from checkpoints/shapes_backbone.pth. Resumable: run the
# same target again after an interruption and it continues from the last
# epoch saved in $(TRAIN_DIR)/<name> (checkpoints every epoch). Then the
# checkpoint is exported (fp16) and its training log summarised.
TRAIN_DIR ?= work_dirs
train-%-family: venv data
	$(VPY) $(MMDET_TOOLS)/train.py configs/$*/$*_tiny_shapes.py --work-dir $(TRAIN_DIR)/$*_tiny_shapes --resume
	$(VPY) tools/export_checkpoint.py $(TRAIN_DIR)/$*_tiny_shapes checkpoints/$*_tiny_shapes.pth
	$(VPY) tools/train_log_summary.py $(TRAIN_DIR)/$*_tiny_shapes --config configs/$*/$*_tiny_shapes.py \
	    --command "make $(or $(TRAIN_TARGET),train-$*)" > checkpoints/$*_tiny_shapes_train_log.md
train-dino: train-dino-family
train-deformable: TRAIN_TARGET = train-deformable
train-deformable: train-deformable_detr-family
