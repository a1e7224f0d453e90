// The most multiply-adds one x86 core does per second with the AVX2 instruction mixes a GEMM inner
// loop can use: the ceiling each CPU int8 path of the integer model runs against.
//
//     gcc -O2 benchmarks/cpu_peaks.c -o /tmp/cpu_peaks && /tmp/cpu_peaks [out.json]
//
// Each mix runs in registers only (12 independent accumulators, no loads, no spills), so what it
// measures is the core's issue rate for those instructions:
//   fp32_fma        vfmadd231ps                       8 MAC   (MKL's FP32 GEMM)
//   int16_vpmaddwd  vpmaddwd + vpaddd                16 MAC   (maskaq's exact int16 GEMM, int32 pair sums)
//   u8s8_vpmaddubsw vpmaddubsw + vpmaddwd(1) + vpaddd 32 MAC  (oneDNN / fbgemm / ORT int8 without VNNI:
//                                                              pair sums saturate at int16)
// and a chain of dependent integer adds gives a lower bound on the clock (one add a cycle).
// The ratios to fp32_fma are the most an int8 path's GEMMs can gain over FP32's on this core.
#if !defined(__x86_64__)
#include <stdio.h>
int main(void) {
  puts("cpu_peaks: x86-64 only");
  return 0;
}
#else
#include <stdio.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

#define REPEAT12(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
// ymm12/13: two "weight" vectors, ymm14: the broadcast activation (and the ones of vpmaddubsw's
// widening), ymm15: the product; ymm0-11 accumulate.
#define FMA(i) "vfmadd231ps %%ymm12, %%ymm14, %%ymm" #i "\n\t"
#define MADDWD(i) "vpmaddwd %%ymm12, %%ymm14, %%ymm15\n\tvpaddd %%ymm15, %%ymm" #i ", %%ymm" #i "\n\t"
#define MADDUBSW(i) "vpmaddubsw %%ymm13, %%ymm14, %%ymm15\n\tvpmaddwd %%ymm15, %%ymm14, %%ymm15\n\t" \
                    "vpaddd %%ymm15, %%ymm" #i ", %%ymm" #i "\n\t"
#define CLOBBER "rcx", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", \
                "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15"

static double run_fma(long n) {
  double t = now();
  __asm__ volatile("mov %0, %%rcx\n1:\n\t" REPEAT12(FMA) "dec %%rcx\n\tjnz 1b\n" ::"r"(n) : CLOBBER);
  return now() - t;
}
static double run_maddwd(long n) {
  double t = now();
  __asm__ volatile("mov %0, %%rcx\n1:\n\t" REPEAT12(MADDWD) "dec %%rcx\n\tjnz 1b\n" ::"r"(n) : CLOBBER);
  return now() - t;
}
static double run_maddubsw(long n) {
  double t = now();
  __asm__ volatile("mov %0, %%rcx\n1:\n\t" REPEAT12(MADDUBSW) "dec %%rcx\n\tjnz 1b\n" ::"r"(n) : CLOBBER);
  return now() - t;
}
static double run_add_chain(long n) {  // 8 dependent adds an iteration
  long x = 0;
  double t = now();
  for (long i = 0; i < n; ++i)
    __asm__ volatile("add $1,%0\n\tadd $1,%0\n\tadd $1,%0\n\tadd $1,%0\n\tadd $1,%0\n\tadd $1,%0\n\tadd $1,%0\n\tadd $1,%0"
                     : "+r"(x));
  return now() - t;
}

typedef double (*kernel_fn)(long);

static double best_of(kernel_fn f, long n, int rounds) {
  double best = 1e30;
  for (int r = 0; r < rounds; ++r) {
    const double s = f(n);
    if (s < best) best = s;
  }
  return best;
}

int main(int argc, char** argv) {
  const long n = 20000000;  // loop iterations per timing (12 instructions each)
  const int rounds = 5;
  const double ghz = 8.0 * n / best_of(run_add_chain, n, rounds) / 1e9;
  struct { const char* name; kernel_fn f; int macs; const char* note; } mixes[] = {
    {"fp32_fma", run_fma, 8, "FP32 GEMM"},
    {"int16_vpmaddwd", run_maddwd, 16, "exact W8A8 without VNNI"},
    {"u8s8_vpmaddubsw", run_maddubsw, 32, "saturating int8 without VNNI"},
  };
  double gmacs[3];
  for (int i = 0; i < 3; ++i) gmacs[i] = 12.0 * mixes[i].macs * n / best_of(mixes[i].f, n, rounds) / 1e9;
  printf("clock >= %.2f GHz (dependent adds)\n", ghz);
  printf("%-16s %8s %10s %8s  %s\n", "mix", "GMAC/s", "MAC/cycle", "vs fp32", "");
  for (int i = 0; i < 3; ++i)
    printf("%-16s %8.1f %10.1f %7.2fx  %s\n", mixes[i].name, gmacs[i], gmacs[i] / ghz, gmacs[i] / gmacs[0], mixes[i].note);
  if (argc > 1) {
    FILE* f = fopen(argv[1], "w");
    if (!f) {
      perror(argv[1]);
      return 1;
    }
    fprintf(f, "{\"clock_ghz_lower_bound\": %.3f, \"mixes\": [", ghz);
    for (int i = 0; i < 3; ++i)
      fprintf(f, "%s{\"mix\": \"%s\", \"macs_per_instruction\": %d, \"gmacs\": %.2f, \"vs_fp32\": %.3f}", i ? ", " : "",
              mixes[i].name, mixes[i].macs, gmacs[i], gmacs[i] / gmacs[0]);
    fprintf(f, "]}\n");
    fclose(f);
    printf("wrote %s\n", argv[1]);
  }
  return 0;
}
#endif
