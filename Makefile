# Two entry points: `make demo` and `make test`. Both create .venv from requirements.lock.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean

# The fidelity tests run twice: on this host's own ISA, and as on an AVX2-only host (oneDNN, MKL and
# ATen capped), so that green here means green on either kind of CPU (docs/fidelity.md). The planes
# do not depend on the ISA: under the cap, shared memory stands for all of them. Left to the first
# run: seeded sampling (the sampler's), otp through the split (integers: test_otp_exactness covers
# the ring under the cap) and the 32-token greedy run (the logits test covers its products).
AVX2_HOST := ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2
FIDELITY := tests/test_split_equals_in_process.py tests/test_products_agree_across_kernels.py \
	tests/test_reduced_precision_matches_reference.py tests/test_split_matches_reference.py \
	tests/test_otp_exactness.py
AVX2_SKIP := not tcp and not ipc and not sampling and not otp-shm and not greedy_32

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-deps -r requirements.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/teegpu generate --chat "What is the capital of France?" --max-new-tokens 20

test: setup
	$(PY) -m pytest -q tests --durations=15
	@if [ "$$($(PY) -c 'from teegpu.model.products import cpu_isa; print(cpu_isa())')" = avx2 ]; then \
		echo "this CPU's own ISA is AVX2: the fidelity tests above ran as on an AVX2-only host"; \
	else \
		echo "$(AVX2_HOST) $(PY) -m pytest -q $(FIDELITY) -k \"$(AVX2_SKIP)\""; \
		$(AVX2_HOST) $(PY) -m pytest -q $(FIDELITY) -k "$(AVX2_SKIP)"; \
	fi

clean:
	rm -rf $(VENV)
