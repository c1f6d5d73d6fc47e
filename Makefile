# distattn front door. `make run` and `make test` install missing Debian packages first.
BUILD ?= build
JOBS ?= $(shell nproc)
CMAKE_FLAGS ?=
PREFIX ?= /usr/local
MPIRUN ?= $(shell command -v mpirun || command -v mpirun.openmpi || echo mpirun)
export OMPI_ALLOW_RUN_AS_ROOT = 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM = 1
export OMPI_MCA_rmaps_base_oversubscribe = 1

.PHONY: all setup setup-torch configure build run test bench sim sim-1m sim-calibrate clean install

all: build

setup:
	@scripts/setup-deps.sh
	@scripts/setup-cuda-tools.sh

# The torch tests' venv (~/.cache/distattn/venv-torch, outside the tree; torch from PyPI, about
# 2.8 GB the first time). Only `make test` needs it.
setup-torch: setup
	@scripts/setup-torch.sh

$(BUILD)/CMakeCache.txt:
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release $(CMAKE_FLAGS)

configure: $(BUILD)/CMakeCache.txt

build: configure
	cmake --build $(BUILD) -j $(JOBS)

# The default distributed job on this CPU-only machine (see scripts/run-default.sh).
run: setup
	@$(MAKE) --no-print-directory build
	MPIRUN="$(MPIRUN)" BUILD="$(BUILD)" scripts/run-default.sh

# Label sanitize (the ASan + UBSan build and valgrind, about 15 min on 2 cores) is opt-in:
# `make check-sanitize`, or CTEST_ARGS="-L sanitize".
CTEST_ARGS ?= -LE sanitize
# Two tests at a time (the timing-sensitive ones run alone: tests/CMakeLists.txt, RUN_SERIAL).
TEST_JOBS ?= 2
test: setup setup-torch
	@$(MAKE) --no-print-directory build
	cd $(BUILD) && ctest -j $(TEST_JOBS) --output-on-failure --timeout 900 $(CTEST_ARGS)

# docs/reliability.md: ASan + UBSan build (clang) of the unit and MPI tests, the bounded
# libFuzzer runs, valgrind memcheck on the unit suites; `make fuzz` runs the fuzzers only.
check-sanitize: setup
	scripts/check-sanitize.sh all

fuzz: setup
	scripts/check-sanitize.sh fuzz

bench: setup
	@$(MAKE) --no-print-directory build
	BUILD="$(BUILD)" bench/run.sh

# Scaling studies under SimGrid SMPI: JSON Lines and plots into sim/results/ (docs/scaling.md).
# Debian's python3 has python3-matplotlib (the plots); another python3 first on PATH may not.
SIMPY ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || echo python3)
sim: setup
	@$(MAKE) --no-print-directory build
	$(SIMPY) sim/sweep.py --build $(BUILD) --out sim/results $(SIM_ARGS)

# Issue 20's study: 1M tokens, H = 32, G = 8, ring / zigzag / ulysses / hybrid and the compute floor
# on the one-uplink and the rail-optimized H100 platforms, 8 to 1024 ranks: sim/results/study1m.*
sim-1m: setup
	@$(MAKE) --no-print-directory build
	$(SIMPY) sim/sweep.py --build $(BUILD) --out sim/results --study1m $(SIM_ARGS)

# The simulator against real MPI runs on this machine at 2 and 4 ranks (sim/calibrate.py).
sim-calibrate: setup
	@$(MAKE) --no-print-directory build
	$(SIMPY) sim/calibrate.py --build $(BUILD) --out sim/results $(SIM_ARGS)

# Library, header, program, pkg-config file and CMake package under $(PREFIX) (docs/library.md).
install: build
	cmake --install $(BUILD) --prefix $(PREFIX)

clean:
	rm -rf $(BUILD)
