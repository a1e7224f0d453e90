// MASKAQ_CLONES: build a hot loop for AVX-512, AVX2 and baseline x86-64 and pick one at load time
// (GCC's target_clones), so the extension runs on any x86-64 and uses what the CPU has.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define MASKAQ_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MASKAQ_CLONES
#endif
