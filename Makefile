# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1

.PHONY: install demo test lint bench bench-quick clean-demo

install: $(VENV)/.installed

# constraints.txt pins every version we test with; torch==2.13.0 is the CPU build on local disk.
$(VENV)/.installed: pyproject.toml constraints.txt requirements-demo.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,eval]'
	$(PY) -m pip install -q --no-deps -r requirements-demo.txt
	# DeepSpeed compiles its CPU kernels (cpu_adam, fused_adam, shared-memory comm) on first use, minutes on
	# two cores: once here, into torch's extension cache, rather than inside the first test that needs one;
	# with the ninja the tests use (tests/conftest.py puts the venv first: another ninja rebuilds them all)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" DS_ACCELERATOR=cpu $(PY) -c "from deepspeed.accelerator import get_accelerator as acc; \
	  [acc().create_op_builder(op).load() for op in ('CPUAdamBuilder', 'FusedAdamBuilder', 'ShareMemCommBuilder')]"
	touch $@

demo: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash launch/demo.sh

lint: install
	$(VENV)/bin/ruff check pretrain tests benchmarks

test: install lint
	$(PY) -m pytest -q -p no:cacheprovider --durations=25

# the full suite (hours on two CPU cores: benchmarks/quality.py is most of it) writes benchmarks/*.md
bench: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 \
		$(PY) -m deepspeed.launcher.runner --num_gpus 2 benchmarks/migu_overhead.py
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) benchmarks/method_cost.py
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) benchmarks/stack_cost.py
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) benchmarks/zero3_eval_effect.py --rounds 2
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) benchmarks/config_effect.py --key train.prefetch --values 0 2 --stages 2 3 --rounds 2
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) benchmarks/quality.py
	$(PY) benchmarks/cost_model.py

# minutes: each benchmark's short variant, written under benchmarks/quick/ (not committed)
bench-quick: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) benchmarks/stack_cost.py --quick
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) benchmarks/quality.py --quick
	$(PY) benchmarks/cost_model.py --out benchmarks/quick/cost_model.md
