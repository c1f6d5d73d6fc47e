/* cpu_impl.h: the CPU kernels compiled once per ISA level (cpu_impl.c built once per level with
 * different flags) and the table each build exports. cpu.c picks one at run time from what the
 * CPU supports; nothing else includes this. */
#ifndef DA_CPU_IMPL_H
#define DA_CPU_IMPL_H

#include "kernels.h"

/* Each level exports a full kernel table (supports = NULL: cpu.c owns the capability checks). */
extern const da_kernels_t da_cpu_impl_amx;         /* AVX-512 + AMX tiles for bf16 storage */
extern const da_kernels_t da_cpu_impl_avx512bf16;  /* AVX-512 + vdpbf16ps for bf16 storage */
extern const da_kernels_t da_cpu_impl_avx512;
extern const da_kernels_t da_cpu_impl_avx2bf16emu; /* AVX2 running the bf16 pair path (tests) */
extern const da_kernels_t da_cpu_impl_avx2;
extern const da_kernels_t da_cpu_impl_generic;

/* Largest head dim the CPU kernels take (scratch tiles are sized by it). */
#define DA_CPU_MAX_DIM 256

#endif
