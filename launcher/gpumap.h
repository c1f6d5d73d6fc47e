/* gpumap.h: which GPU each rank of `distattn run|decode --device cuda` opens. One rank per GPU by
 * default; ranks share a GPU when --ranks-per-gpu N asks for it, or when a node runs more ranks
 * than it has GPUs (then the map says so). The decision (da_gpumap_decide) is a pure function of
 * the node-local rank, the node's rank count, the GPU count and the option, unit-tested without
 * MPI or a GPU (tests/test_gpumap.c); gpumap_mpi.c finds those inputs over MPI (bounded) and
 * prints the map. Not the placement of cores: that is place.h (--bind). */
#ifndef DA_GPUMAP_H
#define DA_GPUMAP_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The most ranks one GPU may be given (--ranks-per-gpu's upper bound). */
#define DA_GPUMAP_MAX_PER_GPU 64

typedef struct da_gpumap {
  int local_rank, local_size; /* among the node's ranks that see the same devices (the group) */
  int ngpus;                  /* devices this rank sees (CUDA numbering, after CUDA_VISIBLE_DEVICES) */
  int device;                 /* the device number this rank opens: 0 .. ngpus-1 */
  int per_gpu;                /* ranks of the group on this rank's device, itself included */
  int gpus_used;              /* devices of the group that hold at least one rank */
  int shared;                 /* 1: some device of the group holds more than one rank */
  int asked;                  /* the --ranks-per-gpu given (0: not given) */
  char note[160];             /* why ranks share ("" when they do not) */
} da_gpumap_t;

/* Decide the device of local rank `local_rank` of `local_size` ranks that see `ngpus` devices.
 * ranks_per_gpu 0: one rank per device while local_size <= ngpus (rank r on device r); beyond
 * that the ranks are spread in contiguous blocks as evenly as possible (device = r * ngpus /
 * local_size), which is sharing not asked for, and the note says so. ranks_per_gpu N >= 1:
 * blocks of N consecutive ranks per device (device = r / N), which needs ceil(local_size / N)
 * <= ngpus. Consecutive ranks on one device keep ring neighbours on the same GPU. Returns 0 with
 * *out filled, or -1 with the reason in err (no device, N out of range, too few devices). */
int da_gpumap_decide(int local_rank, int local_size, int ngpus, int ranks_per_gpu, da_gpumap_t *out, char *err,
                     size_t errlen);

/* Whether a transport can carry the map: nccl refuses ranks that share a GPU (NCCL's "Duplicate
 * GPU detected"), so a shared map with --transport nccl is refused in words (use cuda-ipc).
 * Returns 0, or -1 with the reason in err. */
int da_gpumap_check_transport(const da_gpumap_t *m, const char *transport, char *err, size_t errlen);

/* The group of ranks that compete for the same devices, from every node-local rank's
 * CUDA_VISIBLE_DEVICES (NULL or "" = unset = every device): the ranks whose value equals this
 * rank's. A launcher that gives each rank its own GPU (srun --gpus-per-task) makes groups of one.
 * visible[i] is local rank i's value; fills *rank (index among the equal ones) and *size. */
void da_gpumap_group(const char *const *visible, int n, int me, int *rank, int *size);

/* ---- gpumap_mpi.c: the same over MPI_COMM_WORLD (collective; every call bounded by timeout) ----
 * (declared when <mpi.h> came first) */
#ifdef MPI_VERSION
#include "devapi.h"
/* Probe this rank's devices with api (NULL: this build has no CUDA; DISTATTN_TEST_GPUS=N pretends
 * N devices, a test hook), find its node-local group (MPI_Comm_split_type(SHARED) on a bounded
 * duplicate; ranks with the same CUDA_VISIBLE_DEVICES), decide (da_gpumap_decide), check the
 * transport and select the device (api->set_device). Returns 0 on every rank, or the exit code
 * every rank agrees on: 2 when a rank has no usable device or the map cannot be made (the lowest
 * such rank prints one message naming CUDA, and NCCL for --transport nccl), 1 when a peer never
 * came. cmd names the command in messages. */
int da_gpumap_world(const da_devapi_t *api, int ranks_per_gpu, const char *transport, double timeout,
                    const char *cmd, da_gpumap_t *me);
/* Collective: rank 0 prints the map, nccl-tests style ("#  Rank  0 Group  0 Pid 123 on host device
 * 0 [0000:1b:00.0] NVIDIA H100 ..."), and gets it as a JSON array in json (for the record's
 * "gpu_map"; "" elsewhere). */
void da_gpumap_print(const da_gpumap_t *me, const da_devapi_t *api, char *json, size_t jn);
#endif

#ifdef __cplusplus
}
#endif
#endif /* DA_GPUMAP_H */
