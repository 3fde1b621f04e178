# make demo: the whole pipeline offline, on this machine, against a local S3 server.
# make test: the test suite (offline; starts its own S3 server).
# make bench: every benchmark (bench/gpu_train.py only where a CUDA GPU is), then one table
# of their results (bench/table.py prints it from bench/results/ alone).
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: demo test bench clean

$(INSTALLED): requirements.txt requirements-dev.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	# SkyPilot parses the YAMLs in tests; it lives in a venv of its own, since its click pin
	# conflicts with huggingface_hub's, and never on the GPU node.
	test -x $(VENV)/sky/bin/python || python3 -m venv $(VENV)/sky
	$(VENV)/sky/bin/python -m pip install -q skypilot==0.14.1
	touch $(INSTALLED)

demo: $(INSTALLED)
	$(PY) demo/run.py

test: $(INSTALLED)
	$(PY) -m pytest

bench: $(INSTALLED)
	$(PY) bench/import_memory.py
	$(PY) bench/import_throughput.py
	$(PY) bench/pretokenize_throughput.py
	$(PY) bench/rerun.py
	$(PY) bench/transfer.py
	$(PY) bench/export_memory.py
	if $(PY) -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then \
		$(PY) bench/gpu_train.py; fi
	$(PY) bench/table.py

clean:
	rm -rf $(VENV) .demo
