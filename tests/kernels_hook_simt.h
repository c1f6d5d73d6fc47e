/* kernels_hook_simt.h: the backend hook of test_kernels.c (see there) for the CUDA kernels run on
 * the CPU by the SIMT runner (tests/simt): table da_kernels_cuda_simt, "device" memory is host
 * memory, launches are synchronous. The sweeps draw the dtypes and head dims the CUDA backend
 * instantiates, at sizes an emulator runs in about a minute on 2 cores. */
#ifndef DA_KERNELS_HOOK_SIMT_H
#define DA_KERNELS_HOOK_SIMT_H

#include "kernels.h"

extern const da_kernels_t da_kernels_cuda_simt;

#define TB_NAME "cuda-simt"
static const da_kernels_t *tb_kernels(void) { return &da_kernels_cuda_simt; }
static void *tb_alloc(size_t n) { return malloc(n); }
static void tb_free(void *p) { free(p); }
static da_status_t tb_sync(void) { return DA_SUCCESS; }
static int tb_init(void) { return 0; }
/* bf16 and fp16 (fp16 twice where the CPU suite has fp32), head dims 64 and 128 */
#define TB_DTYPES {DA_FLOAT16, DA_BFLOAT16, DA_FLOAT16}
#define TB_DS {64, 128, 64, 128, 64, 128}
#ifndef TB_SWEEP_SCALE
#define TB_SWEEP_SCALE 0.05 /* lengths 1, 7, 129, 1000 all occur; 1000 x 1000 only below */
#endif
/* one self-attention case of 1000 tokens (index 1: causal, forward only) */
#define TB_SELF_1000_FROM 1
#define TB_SELF_1000_TO 2
/* the kernels ignore block_q / block_k / nthreads: one problem each; block splits (every way of
 * cutting q and k, shorter sequences) once, under a causal mask; masked rows and NaN propagation
 * in fp16 (bf16 runs everywhere else) */
#define TB_N_BLOCK_SIZES 1
#define TB_N_THREADS 1
#define TB_BLOCK_SPLITS_FROM 1
#define TB_BLOCK_SPLITS_TO 2
#define TB_N_MASKED_ROWS 1
#define TB_N_NAN 3
#define TB_SPLIT_S_LO 60
#define TB_SPLIT_S_HI 110

#endif /* DA_KERNELS_HOOK_SIMT_H */
