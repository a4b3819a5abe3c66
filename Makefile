# Two commands do the whole set-up on a fresh machine:
#   make demo   venv + install, demo data, preprocess, pretrain, train 4 models x 6 folds, check, weights, infer
#   make test   venv + install, the test suite
PY      ?= .venv/bin/python
DATA    ?= data
ASSETS  ?= assets
# preprocess.py writes the fold file; every later step reads the fold count from it
FOLDS   ?= 6
JOBS    ?= 2
EPOCHS  ?= 2
# model4encdec (the encoder-decoder) learns slowest: left out of the 30-minute demo, add it here
MODELS  ?= model1mean,model2attn,model3mapd,model5gbm
BACKBONE ?= $(ASSETS)/pretrained_encoder
# The same numbers on every run and on other x86 machines: torch and MKL pick kernels by processor
# (AVX-512 sums in another order than AVX2), so make demo pins the AVX2 ones (no change on an
# AVX2-only CPU); a fold's torch threads come from --jobs alone (the thread count changes the bits)
export ATEN_CPU_CAPABILITY ?= avx2
export MKL_CBWR ?= AVX2
export ONEDNN_MAX_CPU_ISA ?= AVX2
# test files run TEST_WORKERS at a time (pytest-xdist; each file stays in one worker for its fixtures)
TEST_WORKERS ?= 2

.PHONY: demo test venv data preprocess pretrain train check config infer submission clean

venv: .venv/.installed
.venv/.installed: requirements.txt
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q torch==2.13.0
	.venv/bin/pip install -q -r requirements.txt
	touch $@

data: venv
	@if [ -f $(DATA)/train_metadata.csv ]; then echo "$(DATA)/ has a data set: kept"; \
	else $(PY) make_demo_data.py --out $(DATA) --n-train 3000 --n-test 600 --seed 0; fi

preprocess: data
	$(PY) preprocess.py --data $(DATA) --n_folds $(FOLDS)

pretrain: preprocess
	$(PY) pretrain.py --out $(BACKBONE) --data $(DATA) --threads 2

train: pretrain
	$(PY) train.py --data $(DATA) --assets $(ASSETS) --jobs $(JOBS) --epochs $(EPOCHS) --backbone $(BACKBONE) --models $(MODELS)

check: train
	$(PY) check_models.py --data $(DATA) --assets $(ASSETS) --models $(MODELS) || true

config: check
	$(PY) get_config.py --data $(DATA) --assets $(ASSETS) --models $(MODELS)

infer: config
	$(PY) infer.py --data $(DATA) --assets $(ASSETS) --out submission.csv

demo:
	@start=$$(date +%s); $(MAKE) --no-print-directory infer && \
	echo "make demo finished in $$(( $$(date +%s) - start ))s"

test: venv
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 tests

clean:
	rm -rf $(ASSETS) tts_data submission.csv submission.csv.json

submission: venv
	$(PY) make_submission.py --assets $(ASSETS) --out submission.zip
