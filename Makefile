# numa-moe: build, test, demo and benchmark. `make help` lists the targets.
#
# Everything installs what it needs (scripts/setup.sh) and keeps upstream llama.cpp and all
# build products in ignored folders: third_party/, build/, target/.

SHELL      := /bin/bash
ROOT       := $(CURDIR)
CARGO      ?= $(shell command -v cargo 2>/dev/null || echo $(HOME)/.cargo/bin/cargo)
LLAMA_SRC  := $(ROOT)/third_party/llama.cpp
LLAMA_BIN  := $(ROOT)/build/llama/bin
NATIVE_BIN := $(ROOT)/build/llama-native/bin
VULKAN_BIN := $(ROOT)/build/llama-vulkan/bin
GGML_INC   := $(LLAMA_SRC)/ggml/include
LIB        := $(ROOT)/target/release/libnuma_moe.so
CLI        := $(ROOT)/target/release/numa-moe
VERSION    := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
CFLAGS_T   := -O2 -g -Wall -Wextra -Werror -std=c11
export NUMA_MOE_LLAMA_SRC := $(LLAMA_SRC)

.PHONY: help setup source llama llama-portable native-libs llama-linked llama-vulkan lib header header-check harness greedy greedy-vulkan \
        two-contexts models fault-lib mmid-bench lint test test-rust test-c test-e2e test-hybrid test-numa demo bench clean

help:
	@echo "make demo          patched llama.cpp runs a MoE model with numa-moe and prints the placement"
	@echo "make test          every test suite (Rust, C harness, end to end, multi-node QEMU guests)"
	@echo "make bench         stock vs numa-moe benchmarks (op level and llama-bench)"
	@echo "make llama         fetch, patch and build the pinned llama.cpp for this CPU (LLAMA_CPP_DIR=... for your own)"
	@echo "make lib           libnuma_moe.so and the numa-moe tool"
	@echo "make header        regenerate include/numa_moe.h;  make header-check fails when it is stale"

setup:
	@scripts/setup.sh

# the patched upstream tree (bindgen reads its headers)
source: setup
	@scripts/llama.sh source

# llama.cpp is built twice from the one patched tree, both with ccache (scripts/llama.sh):
#   build/llama         portable (x86-64-v3: AVX2, no AVX-512), also in the QEMU guests: make test and
#                       everything it needs use this one only (LLAMA_BIN)
#   build/llama-native  for this CPU (GGML_NATIVE=ON), as a user builds it: make llama, demo and
#                       bench, each building only the tools it runs (NATIVE_BIN)
llama: source
	@scripts/llama.sh native

llama-portable: source
	@scripts/llama.sh build

# ggml's libraries of the native tree, which demo's and bench's C programs link against
native-libs: source
	@scripts/llama.sh native ggml

# llama-completion with libnuma_moe.so linked into ggml-cpu (GGML_NUMA_MOE_LINK), for the tests
llama-linked: lib llama-portable
	@scripts/llama.sh linked

# the portable build with ggml's Vulkan backend (libllama, llama-completion), for the hybrid
# CPU+GPU tests on Mesa's lavapipe
llama-vulkan: source
	@scripts/llama.sh vulkan

lib: source
	$(CARGO) build --release

header: source
	NUMA_MOE_UPDATE_HEADER=1 $(CARGO) build --release

header-check: source
	NUMA_MOE_HEADER_CHECK=1 $(CARGO) build --release

$(ROOT)/build/c/harness: tests/c/harness.c include/numa_moe.h lib llama-portable
	@mkdir -p build/c
	$(CC) $(CFLAGS_T) -DEXPECTED_VERSION='"$(VERSION)"' -Iinclude -I$(GGML_INC) -I$(LLAMA_SRC)/ggml/src $< -o $@ \
	    -L$(ROOT)/target/release -lnuma_moe -L$(LLAMA_BIN) -lggml-base -lggml-cpu -lggml \
	    -Wl,-rpath,$(ROOT)/target/release:$(LLAMA_BIN) -lm

# fails chosen NUMA syscalls with a chosen errno (NUMA_MOE_FAULT), for the harness's fault tests
$(ROOT)/build/c/fault_shim.so: tests/c/fault_shim.c
	@mkdir -p build/c
	$(CC) $(CFLAGS_T) -shared -fPIC $< -o $@ -ldl

harness: $(ROOT)/build/c/harness $(ROOT)/build/c/fault_shim.so

# the end-to-end driver: greedy tokens and logits hashes through llama.cpp's C API
$(ROOT)/build/greedy: tests/e2e/greedy.c tests/e2e/e2e_common.h llama-portable
	$(CC) $(CFLAGS_T) -I$(LLAMA_SRC)/include -I$(GGML_INC) $< -o $@ -L$(LLAMA_BIN) -lllama -lggml-base -lggml-cpu \
	    -Wl,-rpath,$(LLAMA_BIN)

greedy: $(ROOT)/build/greedy

# the same driver against the Vulkan build, for tests/e2e/hybrid.sh
$(ROOT)/build/vulkan/greedy: tests/e2e/greedy.c tests/e2e/e2e_common.h llama-vulkan
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_T) -I$(LLAMA_SRC)/include -I$(GGML_INC) $< -o $@ -L$(VULKAN_BIN) -lllama -lggml-base -lggml-cpu \
	    -Wl,-rpath,$(VULKAN_BIN)

greedy-vulkan: $(ROOT)/build/vulkan/greedy

# the library with the test-only fault switch (Cargo feature fault-injection), for the test
# that a failure after the hook's decision point aborts instead of hanging ggml; the normal
# library is rebuilt right after, so target/release never keeps the switch
FAULT_LIB := $(ROOT)/build/fault/libnuma_moe.so
$(FAULT_LIB): Cargo.toml build.rs $(shell find src -name '*.rs') | lib
	$(CARGO) build --release --features fault-injection
	@mkdir -p $(dir $@) && cp $(LIB) $@
	$(CARGO) build --release

fault-lib: $(FAULT_LIB)

# the op-level benchmark (make bench runs it: MUL_MAT_ID, and MUL_MAT with --op mm), on the native
# build's ggml
$(ROOT)/build/mmid_bench: tests/bench/mmid_bench.c tests/bench/bench_util.h tests/c/cpu_extra_bufts.h include/numa_moe.h lib native-libs
	@mkdir -p build
	$(CC) $(CFLAGS_T) -Iinclude -I$(GGML_INC) $< -o $@ -L$(ROOT)/target/release -lnuma_moe -L$(NATIVE_BIN) -lggml-base -lggml-cpu -lggml \
	    -Wl,-rpath,$(ROOT)/target/release:$(NATIVE_BIN) -lm -pthread

mmid-bench: $(ROOT)/build/mmid_bench

# routing statistics' cost and the balanced map's gain at op level (make bench runs it), on the
# native build's ggml
$(ROOT)/build/routing_bench: tests/bench/routing_bench.c tests/bench/bench_util.h tests/c/cpu_extra_bufts.h include/numa_moe.h lib native-libs
	@mkdir -p build
	$(CC) $(CFLAGS_T) -Iinclude -I$(GGML_INC) $< -o $@ -L$(ROOT)/target/release -lnuma_moe -L$(NATIVE_BIN) -lggml-base -lggml-cpu -lggml \
	    -Wl,-rpath,$(ROOT)/target/release:$(NATIVE_BIN) -lm

# what CI holds the Rust code to: rustfmt and clippy without warnings
lint: source
	$(CARGO) fmt --check
	$(CARGO) clippy --release --all-targets -- -D warnings

# two contexts on one model decoding at once from two threads, against one context alone
$(ROOT)/build/two_contexts: tests/e2e/two_contexts.c tests/e2e/e2e_common.h llama-portable
	$(CC) $(CFLAGS_T) -I$(LLAMA_SRC)/include -I$(GGML_INC) $< -o $@ -L$(LLAMA_BIN) -lllama -lggml-base \
	    -Wl,-rpath,$(LLAMA_BIN) -pthread

two-contexts: $(ROOT)/build/two_contexts

$(ROOT)/build/make-moe-model: tests/tools/make-moe-model.c llama-portable
	$(CC) -O2 -Wall -Wextra -Werror -I$(GGML_INC) $< -o $@ -L$(LLAMA_BIN) -lggml-base -lggml \
	    -Wl,-rpath,$(LLAMA_BIN) -lm -lpthread

# the same on the native build's ggml, for demo's and bench's models (they need no portable tree)
$(ROOT)/build/native/make-moe-model: tests/tools/make-moe-model.c native-libs
	@mkdir -p $(dir $@)
	$(CC) -O2 -Wall -Wextra -Werror -I$(GGML_INC) $< -o $@ -L$(NATIVE_BIN) -lggml-base -lggml \
	    -Wl,-rpath,$(NATIVE_BIN) -lm -lpthread

# test models: the 55 MoE architectures llama.cpp can write, plus many-expert models of our own
models: llama-portable $(ROOT)/build/make-moe-model
	@scripts/models.sh

test: setup llama-portable header-check lint harness greedy two-contexts models llama-linked fault-lib greedy-vulkan
	@scripts/test.sh all

test-rust: source
	@scripts/test.sh rust

test-c: harness
	@scripts/test.sh c

test-e2e: lib llama-portable greedy two-contexts models llama-linked fault-lib
	@scripts/test.sh e2e

test-hybrid: lib greedy-vulkan models
	@scripts/test.sh hybrid

test-numa: lib llama-portable harness greedy models
	@scripts/test.sh numa

# demo and bench run the native build (scripts/lib.sh: NATIVE_BIN), as a user runs llama.cpp
demo: setup lib $(ROOT)/build/native/make-moe-model
	@scripts/llama.sh native llama-completion llama-server
	@scripts/demo.sh

bench: setup lib $(ROOT)/build/native/make-moe-model $(ROOT)/build/mmid_bench $(ROOT)/build/routing_bench
	@scripts/llama.sh native llama-bench llama-server
	@scripts/bench.sh

clean:
	rm -rf target build
