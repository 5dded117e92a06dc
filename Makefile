# duplex: live-migrate workloads off aging hosts with CRIU, then rejuvenate them.
SHELL := /bin/bash
GO ?= go
BIN := $(CURDIR)/bin
TOOLS := $(BIN)/tools
GOTESTSUM := $(TOOLS)/gotestsum
GOTESTSUM_VERSION := v1.13.0
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X github.com/duplex-ha/duplex/internal/daemon.Version=$(VERSION) \
           -X github.com/duplex-ha/duplex/internal/ctl.Version=$(VERSION)
# Root tests share the machine's cgroups and CRIU; two packages at a time is plenty.
TEST_FLAGS ?= -count=1 -p 2 -timeout 15m

.DEFAULT_GOAL := help
.PHONY: help deps tools build demo test test-unit lint bench clean

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

deps: tools ## Install CRIU, Debian packages and Go tools duplex needs (idempotent)
	bash scripts/deps.sh

tools: $(GOTESTSUM) ## Install the Go tools the tests use into bin/tools

$(GOTESTSUM):
	GOBIN=$(TOOLS) $(GO) install gotest.tools/gotestsum@$(GOTESTSUM_VERSION)

build: ## Build duplexd and duplexctl into bin/
	$(GO) build -ldflags "$(LDFLAGS)" -o $(BIN)/ ./cmd/duplexd ./cmd/duplexctl

demo: deps build ## Show the whole cycle (leak, detect, duplex live, rejuvenate, spare) with a streaming client (root)
	$(GO) build -o $(BIN)/echoserver ./integration/harness/echoserver
	$(GO) build -o $(BIN)/duplex-load ./cmd/duplex-load
	$(GO) build -o $(BIN)/demo ./integration/demo
	$(BIN)/demo --duplexd $(BIN)/duplexd --duplexctl $(BIN)/duplexctl --echoserver $(BIN)/echoserver --duplex-load $(BIN)/duplex-load

test: deps ## Run every test (unit and root tests with real CRIU); needs root
	$(GOTESTSUM) --format testname -- $(TEST_FLAGS) ./...

test-unit: tools ## Run the tests that need neither root nor CRIU
	$(GOTESTSUM) --format testname -- -count=1 -short ./...

lint: ## gofmt and go vet
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...

bench: deps build ## Migration vs the naive baseline (table + bench.json), engine, probe and detector figures, controller at 1,000 hosts
	$(GO) build -o $(BIN)/echoserver ./integration/harness/echoserver
	$(GO) build -o $(BIN)/bench ./integration/bench
	$(BIN)/bench --duplexd $(BIN)/duplexd --duplexctl $(BIN)/duplexctl --echoserver $(BIN)/echoserver --out bench.json
	$(BIN)/bench --duplexd $(BIN)/duplexd --duplexctl $(BIN)/duplexctl --echoserver $(BIN)/echoserver --methods postcopy --thp always --out bench-thp.json
	$(GO) test -run '^$$' -bench . -benchtime 3x -count 1 ./checkpoint/ ./netfail/
	$(GO) test -run '^$$' -bench ProbeOverhead -benchtime 3s -count 1 ./ebpf/
	$(GO) test -run '^$$' -bench DetectionLatency -benchtime 5x -count 1 ./internal/detect/
	$(GO) test -run '^$$' -bench MonitorOverhead -benchtime 1x -count 1 ./integration/
	$(GO) test -run '^$$' -bench ControllerScale -benchtime 1x -count 1 ./cluster/controller/

clean: ## Remove build output and leftovers of crashed test runs
	rm -rf $(BIN)
	bash scripts/clean-leftovers.sh
