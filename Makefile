# Two commands do the whole set-up on a fresh machine:
#   make demo   venv + install, demo data, preprocess, train the default ensemble x 6 folds, check, weights, infer
#   make test   venv + install, the test suite
PY      ?= .venv/bin/python
DATA    ?= data
ASSETS  ?= assets
# preprocess.py writes the fold file; every later step reads the fold count from it
FOLDS   ?= 6
JOBS    ?= 2
# the demo set: the default ensemble's members read every clip with two pretrained Whispers, so
# the 30-minute budget on 2 cores holds 900 training clips (the from-scratch demo had 3000; 1000 before
# model6asr also decoded over the task words)
N_TRAIN ?= 900
N_TEST  ?= 600
# empty: each variant's own epochs, and the default ensemble (readaloud/variants.py default_variants:
# model6asr, model8decoder, on real Whisper weights); MODELS=all or a list for others
EPOCHS  ?=
MODELS  ?=
# the pair variants (model1mean .. model4encdec) read Whisper tiny.en by default; for a language with
# no pretrained Whisper they run on a small encoder pretrained on synthetic speech:
# BACKBONE=$(ASSETS)/pretrained_encoder runs pretrain.py first and switches them to their from-scratch
# settings, e.g. make demo MODELS=model1mean,model2attn,model3mapd,model5gbm EPOCHS=2 \
#   BACKBONE=assets/pretrained_encoder N_TRAIN=3000 (the earlier demo)
BACKBONE ?=
# The same numbers on every run and on other x86 machines: torch and MKL pick kernels by processor
# (AVX-512 sums in another order than AVX2), so make demo pins the AVX2 ones (no change on an
# AVX2-only CPU); a fold's torch threads come from --jobs alone (the thread count changes the bits)
export ATEN_CPU_CAPABILITY ?= avx2
export MKL_CBWR ?= AVX2
export ONEDNN_MAX_CPU_ISA ?= AVX2
# test files run TEST_WORKERS at a time (pytest-xdist; each file stays in one worker for its fixtures);
# a run writes about 3 GB of models and caches under pytest's temp folder: only failed tests' folders
# are kept afterwards (pip keeps no wheel cache either: a full disk failed CI once)
TEST_WORKERS ?= 2

.PHONY: demo test venv data preprocess pretrain train check config infer submission clean

venv: .venv/.installed
.venv/.installed: requirements.txt
	python3 -m venv .venv
	.venv/bin/pip install -q --no-cache-dir --upgrade pip
	.venv/bin/pip install -q --no-cache-dir torch==2.13.0
	.venv/bin/pip install -q --no-cache-dir -r requirements.txt
	touch $@

data: venv
	@if [ -f $(DATA)/train_metadata.csv ]; then echo "$(DATA)/ has a data set: kept"; \
	else $(PY) make_demo_data.py --out $(DATA) --n-train $(N_TRAIN) --n-test $(N_TEST) --seed 0; fi

preprocess: data
	$(PY) preprocess.py --data $(DATA) --n_folds $(FOLDS)

pretrain: preprocess
	$(PY) pretrain.py --out $(or $(BACKBONE),$(ASSETS)/pretrained_encoder) --data $(DATA) --threads 2

train: preprocess $(if $(BACKBONE),pretrain)
	$(PY) train.py --data $(DATA) --assets $(ASSETS) --jobs $(JOBS) $(if $(EPOCHS),--epochs $(EPOCHS)) \
		$(if $(BACKBONE),--backbone $(BACKBONE)) $(if $(MODELS),--models $(MODELS))

check: train
	$(PY) check_models.py --data $(DATA) --assets $(ASSETS) $(if $(MODELS),--models $(MODELS)) || true

config: check
	$(PY) get_config.py --data $(DATA) --assets $(ASSETS) $(if $(MODELS),--models $(MODELS))

infer: config
	$(PY) infer.py --data $(DATA) --assets $(ASSETS) --out submission.csv

demo:
	@start=$$(date +%s); $(MAKE) --no-print-directory infer && \
	echo "make demo finished in $$(( $$(date +%s) - start ))s"

test: venv
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 \
		-o tmp_path_retention_policy=failed tests

clean:
	rm -rf $(ASSETS) tts_data submission.csv submission.csv.json

submission: venv
	$(PY) make_submission.py --assets $(ASSETS) --out submission.zip
