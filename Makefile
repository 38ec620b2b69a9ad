# The two entry points: `make run` and `make test`. Everything else is a helper for them.
BUILD ?= build
JOBS ?= 2
CMAKE_FLAGS ?=
PRESET ?= tiny
MODEL_DIR ?= models/$(PRESET)
PROMPT_IDS ?= 0,19923,3787,1030,260,5223,16,1391,8421,331,1099,3240,12,44
MAX_NEW_TOKENS ?= 16

.PHONY: deps configure build test run model asan test-asan core-only clean bench

deps:
	@bash tools/scripts/install-deps.sh

configure: deps
	@if [ ! -f $(BUILD)/build.ninja ]; then cmake -S . -B $(BUILD) -G Ninja $(CMAKE_FLAGS); fi

build: configure
	cmake --build $(BUILD) -j$(JOBS)

test: build
	cd $(BUILD) && ctest --output-on-failure -j$(JOBS) -LE gpu

# The tiny model (random weights, real V4 tokenizer) if absent.
model: build
	@if [ ! -f $(MODEL_DIR)/config.json ]; then $(BUILD)/bin/tandem-model generate --preset $(PRESET) --seed 1 --out $(MODEL_DIR); fi

# tandem-prefill + tandem-decode + tandem-router on localhost until Ctrl-C (ports: see run-stack.sh).
run: model
	@BUILD=$(BUILD) MODEL_DIR=$(MODEL_DIR) bash tools/scripts/run-stack.sh

# ASan + UBSan build of everything and its CPU tests.
test-asan:
	$(MAKE) test BUILD=build-asan CMAKE_FLAGS="-DTANDEM_SANITIZE=ON -DTANDEM_CUDA=OFF"

# common/ and its tests only (no gRPC/UCX): what the GPU machine builds.
core-only:
	cmake -S . -B build-core -G Ninja -DTANDEM_CORE_ONLY=ON $(CMAKE_FLAGS)
	cmake --build build-core -j$(JOBS)

bench: build
	$(BUILD)/bin/tandem-bench kernels --device cpu --out bench/out

clean:
	rm -rf build build-asan build-core
