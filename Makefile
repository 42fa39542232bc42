# APIForge: `make run` (development server on PORT, default 8000) and `make test` (lint, types, tests).
SHELL := /bin/bash
PORT ?= 8000
HOST ?= 127.0.0.1
WEB_CONCURRENCY ?= 2
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# make test's pytest-xdist processes (each its own test database, Redis key prefix and spool); 0 = in this process
TEST_WORKERS ?= 2
STAMP := $(VENV)/.installed-$(shell cat requirements/*.txt | sha1sum | cut -c1-12)

.PHONY: run serve test lint typecheck bench bench-micro worker beat clean fuzz

$(STAMP): requirements/base.txt requirements/prod.txt requirements/dev.txt
	@echo "==> creating the virtualenv $(VENV) (first run only)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "==> installing requirements/dev.txt into $(VENV) (about a minute the first time)"
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements/dev.txt
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

venv: $(STAMP)

# Development: embedded default (SQLite, in-process cache/limiter/channel layer, eager Celery)
# unless DATABASE_URL / REDIS_URL are set. One process.
run: $(STAMP)
	@echo "==> migrating the database"
	APP_ENV=$${APP_ENV:-development} $(BIN)/python manage.py migrate --noinput
	@echo "==> creating the development superuser and the demo model and key"
	APP_ENV=$${APP_ENV:-development} $(BIN)/python manage.py bootstrap_dev
	PORT=$(PORT) APP_ENV=$${APP_ENV:-development} $(BIN)/python manage.py bootstrap_demo
	@echo "==> serving on http://$(HOST):$(PORT)/ (admin: /admin/, docs: /docs)"
	APP_ENV=$${APP_ENV:-development} $(BIN)/uvicorn apiforge.asgi:application --host $(HOST) --port $(PORT) \
		--loop uvloop --http apiforge.server:GuardedHttpToolsProtocol --lifespan on \
		--forwarded-allow-ips "$${FORWARDED_ALLOW_IPS:-}"

# Production-style serving: uvicorn workers (uvloop + httptools), WEB_CONCURRENCY processes. The protocol is
# httptools with request limits (apiforge/server.py: MAX_REQUEST_HEADER_BYTES, REQUEST_*_TIMEOUT_S); no proxy's
# X-Forwarded-For is trusted unless FORWARDED_ALLOW_IPS names it (uvicorn's own default trusts 127.0.0.1).
# /metrics adds up the workers' values from PROMETHEUS_MULTIPROC_DIR (prometheus_client's multiprocess mode),
# emptied of the previous run's files first.
serve: $(STAMP)
	$(BIN)/python manage.py migrate --noinput
	$(BIN)/python manage.py collectstatic --noinput -v 0
	metrics_dir="$${PROMETHEUS_MULTIPROC_DIR:-/tmp/apiforge-metrics-$(PORT)}" && mkdir -p "$$metrics_dir" \
		&& rm -f "$$metrics_dir"/*.db && PROMETHEUS_MULTIPROC_DIR="$$metrics_dir" \
		$(BIN)/uvicorn apiforge.asgi:application --host $(HOST) --port $(PORT) --workers $(WEB_CONCURRENCY) \
		--loop uvloop --http apiforge.server:GuardedHttpToolsProtocol --lifespan on --no-access-log \
		--timeout-keep-alive 30 --forwarded-allow-ips "$${FORWARDED_ALLOW_IPS:-}"

worker: $(STAMP)
	$(BIN)/celery -A apiforge worker -l INFO

beat: $(STAMP)
	$(BIN)/celery -A apiforge beat -l INFO

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy .

# The machine's PostgreSQL and Redis when they answer (.ci/services.sh), as in CI; else SQLite and in-process.
test: lint typecheck
	APP_ENV=test $(BIN)/python manage.py makemigrations --check --dry-run
	source .ci/services.sh && APP_ENV=test $(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile --cov --cov-report=term

# Gateway vs direct-to-upstream on a throwaway stack (~2 min; see bench/README.md). Extra options: BENCH_ARGS="...".
bench: $(STAMP)
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# Timed micro-benchmarks of the hot path's pieces (make test runs them once, untimed).
bench-micro: $(STAMP)
	APP_ENV=test $(BIN)/pytest tests/bench -m bench --benchmark-enable --benchmark-columns=min,median,mean,ops,rounds

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .coverage staticfiles

# Schemathesis against /api/schema/ with far more cases than `make test` runs (FUZZ_EXAMPLES per operation and mode).
fuzz: $(STAMP)
	FUZZ_EXAMPLES=$${FUZZ_EXAMPLES:-200} APP_ENV=test $(BIN)/pytest tests/platform/test_schema_fuzz.py -q
