/* gpumap.c: the rank -> GPU decision of gpumap.h. Pure: no MPI, no CUDA, no environment. */
#include <stdio.h>
#include <string.h>
#include "gpumap.h"

int da_gpumap_decide(int local_rank, int local_size, int ngpus, int ranks_per_gpu, da_gpumap_t *out, char *err,
                     size_t errlen) {
  memset(out, 0, sizeof *out);
  if (local_size < 1 || local_rank < 0 || local_rank >= local_size) {
    snprintf(err, errlen, "GPU map: local rank %d of %d ranks", local_rank, local_size);
    return -1;
  }
  if (ngpus < 1) {
    snprintf(err, errlen, "no CUDA device visible to this rank");
    return -1;
  }
  if (ranks_per_gpu < 0 || ranks_per_gpu > DA_GPUMAP_MAX_PER_GPU) {
    snprintf(err, errlen, "--ranks-per-gpu %d: expected 1..%d (0 = one per GPU, sharing only when ranks outnumber "
             "GPUs)", ranks_per_gpu, DA_GPUMAP_MAX_PER_GPU);
    return -1;
  }
  const int n = local_size, g = ngpus;
  out->local_rank = local_rank, out->local_size = n, out->ngpus = g, out->asked = ranks_per_gpu;
  if (ranks_per_gpu > 0) {
    const int need = (n + ranks_per_gpu - 1) / ranks_per_gpu;
    if (need > g) {
      snprintf(err, errlen, "--ranks-per-gpu %d: %d ranks on this node need %d GPUs, %d %s visible (ask for %d per "
               "GPU, or leave the option out to share them evenly)", ranks_per_gpu, n, need, g,
               g == 1 ? "is" : "are", (n + g - 1) / g);
      return -1;
    }
    out->device = local_rank / ranks_per_gpu;
    const int first = out->device * ranks_per_gpu, left = n - first;
    out->per_gpu = left < ranks_per_gpu ? left : ranks_per_gpu;
    out->gpus_used = need;
    out->shared = (n < ranks_per_gpu ? n : ranks_per_gpu) > 1;
    if (out->shared)
      snprintf(out->note, sizeof out->note, "--ranks-per-gpu %d: %d ranks share %d GPU%s", ranks_per_gpu, n, need,
               need == 1 ? "" : "s");
    return 0;
  }
  if (n <= g) { /* the default: one rank per GPU */
    out->device = local_rank, out->per_gpu = 1, out->gpus_used = n;
    return 0;
  }
  /* More ranks than GPUs: contiguous blocks whose sizes differ by at most one. Rank r goes to
   * floor(r * g / n); the block of device d is the ranks r with d*n <= r*g < (d+1)*n. */
  out->device = (int)((long long)local_rank * g / n);
  int count = 0;
  for (int r = 0; r < n; r++) count += (int)((long long)r * g / n) == out->device;
  out->per_gpu = count;
  out->gpus_used = g;
  out->shared = 1;
  char per[32];
  if (n % g) snprintf(per, sizeof per, "%d or %d", n / g, n / g + 1);
  else snprintf(per, sizeof per, "%d", n / g);
  snprintf(out->note, sizeof out->note, "%d ranks on this node, %d GPU%s visible: ranks share GPUs (%s per GPU; "
           "--ranks-per-gpu sets it)", n, g, g == 1 ? "" : "s", per);
  return 0;
}

int da_gpumap_check_transport(const da_gpumap_t *m, const char *transport, char *err, size_t errlen) {
  if (m->shared && transport && !strcmp(transport, "nccl")) {
    snprintf(err, errlen, "--transport nccl: NCCL refuses ranks that share a GPU (\"Duplicate GPU detected\"), and "
             "%d ranks share GPU %d here; use --transport cuda-ipc, or one rank per GPU", m->per_gpu, m->device);
    return -1;
  }
  return 0;
}

void da_gpumap_group(const char *const *visible, int n, int me, int *rank, int *size) {
  const char *mine = visible[me] ? visible[me] : "";
  *rank = 0, *size = 0;
  for (int i = 0; i < n; i++) {
    const char *v = visible[i] ? visible[i] : "";
    if (strcmp(v, mine)) continue;
    if (i < me) (*rank)++;
    (*size)++;
  }
}
