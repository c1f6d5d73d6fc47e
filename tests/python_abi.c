/* python_abi.c: prints the size of every public struct and the offset of each field, one
 * "name size" / "name.field offset" per line, so tests/test_python.py can check that the ctypes
 * mirrors in python/distattn/_lib.py match what the compiler lays out. Not a test by itself. */
#include <mpi.h> /* declares the distributed section of the header */
#include <distattn.h>
#include <stddef.h>
#include <stdio.h>

#define S(T) printf(#T " %zu\n", sizeof(T))
#define F(T, f) printf(#T "." #f " %zu\n", offsetof(T, f))

int main(void) {
  S(da_tensor_t), F(da_tensor_t, data), F(da_tensor_t, dtype), F(da_tensor_t, device), F(da_tensor_t, device_id),
      F(da_tensor_t, ndim), F(da_tensor_t, shape), F(da_tensor_t, strides);
  S(da_problem_t), F(da_problem_t, size), F(da_problem_t, version), F(da_problem_t, batch), F(da_problem_t, seq),
      F(da_problem_t, heads), F(da_problem_t, kv_heads), F(da_problem_t, dim), F(da_problem_t, mask),
      F(da_problem_t, window), F(da_problem_t, ndocs), F(da_problem_t, cu_seqlens), F(da_problem_t, dtype),
      F(da_problem_t, scale), F(da_problem_t, block_q), F(da_problem_t, block_k);
  S(da_config_t), F(da_config_t, size), F(da_config_t, version), F(da_config_t, device), F(da_config_t, nthreads);
  S(da_comm_config_t), F(da_comm_config_t, size), F(da_comm_config_t, version), F(da_comm_config_t, timeout);
  S(da_plan_config_t), F(da_plan_config_t, size), F(da_plan_config_t, version), F(da_plan_config_t, algo),
      F(da_plan_config_t, block), F(da_plan_config_t, transport), F(da_plan_config_t, timeout),
      F(da_plan_config_t, mem_budget), F(da_plan_config_t, mem_count);
  S(da_plan_stats_t), F(da_plan_stats_t, size), F(da_plan_stats_t, version), F(da_plan_stats_t, rank),
      F(da_plan_stats_t, nranks), F(da_plan_stats_t, nsteps), F(da_plan_stats_t, local_rows),
      F(da_plan_stats_t, pairs_total), F(da_plan_stats_t, pairs_rank), F(da_plan_stats_t, fwd_s),
      F(da_plan_stats_t, bwd_s), F(da_plan_stats_t, fwd_compute_s), F(da_plan_stats_t, bwd_compute_s),
      F(da_plan_stats_t, fwd_exposed_s), F(da_plan_stats_t, bwd_exposed_s), F(da_plan_stats_t, fwd_bytes_sent),
      F(da_plan_stats_t, bwd_bytes_sent), F(da_plan_stats_t, mem_fwd_bytes), F(da_plan_stats_t, mem_bwd_bytes),
      F(da_plan_stats_t, peak_bytes), F(da_plan_stats_t, fwd_step_compute_s), F(da_plan_stats_t, fwd_step_wait_s),
      F(da_plan_stats_t, bwd_step_compute_s), F(da_plan_stats_t, bwd_step_wait_s), F(da_plan_stats_t, fwd_step_bytes),
      F(da_plan_stats_t, bwd_step_bytes), F(da_plan_stats_t, plan_fwd_bytes), F(da_plan_stats_t, plan_bwd_bytes),
      F(da_plan_stats_t, work_imbalance), F(da_plan_stats_t, block);
  S(da_kvcache_config_t), F(da_kvcache_config_t, size), F(da_kvcache_config_t, version), F(da_kvcache_config_t, page),
      F(da_kvcache_config_t, layout), F(da_kvcache_config_t, weights), F(da_kvcache_config_t, timeout),
      F(da_kvcache_config_t, transport);
  S(da_kvcache_page_t), F(da_kvcache_page_t, k), F(da_kvcache_page_t, v), F(da_kvcache_page_t, ldk),
      F(da_kvcache_page_t, ldv), F(da_kvcache_page_t, start), F(da_kvcache_page_t, stride), F(da_kvcache_page_t, count);
  S(da_decode_config_t), F(da_decode_config_t, size), F(da_decode_config_t, version), F(da_decode_config_t, algo),
      F(da_decode_config_t, topo), F(da_decode_config_t, root), F(da_decode_config_t, node_size),
      F(da_decode_config_t, transport), F(da_decode_config_t, timeout);
  S(da_decode_stats_t), F(da_decode_stats_t, size), F(da_decode_stats_t, version), F(da_decode_stats_t, rank),
      F(da_decode_stats_t, nranks), F(da_decode_stats_t, levels), F(da_decode_stats_t, nodes),
      F(da_decode_stats_t, step_s), F(da_decode_stats_t, compute_s), F(da_decode_stats_t, reduce_s),
      F(da_decode_stats_t, bytes_sent), F(da_decode_stats_t, kv_bytes), F(da_decode_stats_t, partial_bytes),
      F(da_decode_stats_t, peak_bytes);
  /* Enum values the binding hard-codes. */
  printf("DA_NUM_STATUS %d\nDA_NUM_DTYPES %d\nDA_API_VERSION %d\nDA_ALGO_ZIGZAG %d\nDA_DECODE_RING %d\n", DA_NUM_STATUS,
         DA_NUM_DTYPES, DA_API_VERSION, DA_ALGO_ZIGZAG, DA_DECODE_RING);
  return 0;
}
