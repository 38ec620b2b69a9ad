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

# Until the services exist: make the tiny model and run the offline forward on a prompt.
model: build
	@if [ ! -f $(MODEL_DIR)/config.json ]; then $(BUILD)/bin/tandem-model generate --preset $(PRESET) --seed 1 --out $(MODEL_DIR); fi

run: model
	$(BUILD)/bin/tandem-model inspect $(MODEL_DIR)
	$(BUILD)/bin/tandem-model run $(MODEL_DIR) --prompt-ids $(PROMPT_IDS) --max-new-tokens $(MAX_NEW_TOKENS)

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
