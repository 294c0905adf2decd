# The README's two commands: `make demo` and `make test`. Each does all the set-up it
# needs (virtualenv, pinned dependencies, Docker Engine, gVisor, sandbox image,
# PostgreSQL and Chromium for the tests), and is
# quick the second time.

VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt requirements-model.txt | sha256sum | cut -c1-16)

.PHONY: demo fleet-demo test setup engine image browser postgres model lint unit bench clean-containers

demo: image
	$(VENV)/bin/callward demo

# Three gateway replicas on one PostgreSQL: one verified log, a shared rate limit, a raced
# approval, a replica killed with SIGKILL mid-call (issue #16).
fleet-demo: image postgres
	$(VENV)/bin/callward demo --fleet

test: image browser postgres model lint
	CALLWARD_TEST_MODEL_CACHE=$(abspath $(MODELS)) $(PY) -m pytest

unit: setup browser
	$(PY) -m pytest tests/unit

lint: setup
	$(VENV)/bin/ruff check core policies sandbox audit tests bench
	scripts/typecheck.sh

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt requirements-model.txt
	scripts/setup-venv.sh
	rm -f $(VENV)/.installed-*
	touch $@

engine:
	scripts/ensure-engine.sh

# callward's own PostgreSQL on 127.0.0.1:54329, for the fleet's tests and demo.
postgres:
	scripts/ensure-postgres.sh >/dev/null

# The demo model's verified safetensors copy, converted once from the pinned GGUF chunks
# (about a minute on 2 cores); the model tests load it instead of converting their own.
# Every load checks its manifest and the chunks' SHA-256, so a stale copy is remade.
MODELS := $(VENV)/callward-models
model: setup
	$(PY) -c 'import sys, pathlib; from callward.core.models._gguf import prepare_demo_model; prepare_demo_model(pathlib.Path(sys.argv[1]))' $(MODELS)

# The audit report test renders the report in Debian's headless chromium.
browser:
	scripts/ensure-chromium.sh

image: setup engine
	$(VENV)/bin/callward sandbox build-image >/dev/null

bench: image
	$(PY) -m bench.governance
	$(PY) -m bench.audit_append
	$(PY) -m bench.audit_verify

clean-containers:
	docker ps -aq --filter label=callward | xargs -r docker rm -f
