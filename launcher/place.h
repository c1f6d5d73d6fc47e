/* place.h: rank placement for the `distattn` program: the node's topology through hwloc
 * (packages, NUMA nodes, cores, GPUs and each GPU's local cores found through its PCI bus id),
 * the GPU of each local rank, the cores it binds to (--bind) and the kernel threads that fit them.
 * The decision (da_place_node) is a pure function of a topology and the node's ranks, so it is
 * tested on XML and synthetic topologies; only da_place_apply touches the process. No MPI here:
 * the exchange between a node's ranks is in place_mpi.c. */
#ifndef DA_PLACE_H
#define DA_PLACE_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* --bind: inherit keeps what mpirun/srun gave (never fight the launcher); gpu-local binds to the
 * cores next to the rank's GPU, shared with the other local ranks whose GPUs sit there; numa
 * spreads the local ranks over the NUMA nodes in blocks and splits each node's cores; none drops
 * any binding (every allowed core of the node). */
typedef enum da_bind { DA_BIND_INHERIT, DA_BIND_GPU_LOCAL, DA_BIND_NUMA, DA_BIND_NONE } da_bind_t;
extern const char *const da_bind_names[]; /* "inherit", "gpu-local", "numa", "none", NULL */

typedef struct da_topo da_topo_t;

/* Load a topology. Source, first that applies: `xml` (a file), `synthetic` (hwloc's synthetic
 * description, e.g. "pack:2 numa:1 core:8 pu:2"), $DISTATTN_HWLOC_XML, this machine (hwloc also
 * honours HWLOC_XMLFILE). PCI devices are kept (GPUs are found through them). A topology that is
 * not this machine is never bound to. Returns 0, or -1 with a message in err. */
int da_topo_load(da_topo_t **out, const char *xml, const char *synthetic, char *err, size_t errlen);
void da_topo_free(da_topo_t *t);

typedef struct da_topo_info {
  int packages, numa, cores, pus, gpus;
  int this_system; /* 1: loaded from this machine, binding may be applied */
} da_topo_info_t;
void da_topo_info(const da_topo_t *t, da_topo_info_t *info);

/* GPU i of the node (NVIDIA or AMD display / 3D controllers, in PCI bus id order, which is the
 * CUDA order under CUDA_DEVICE_ORDER=PCI_BUS_ID): its bus id "0000:07:00.0" and the list of PUs
 * (os indices, "0-15,64-79") of its nearest non-I/O ancestor. Returns 0 or -1 (no such GPU). */
int da_topo_gpu(const da_topo_t *t, int i, char *busid, size_t bn, char *cpus, size_t cn);
/* The GPU index of a bus id ("0000:07:00.0", "07:00.0", any case), or -1 when not in the topology. */
int da_topo_gpu_by_busid(const da_topo_t *t, const char *busid);

/* Which node GPU a local rank uses: CUDA_VISIBLE_DEVICES (or ROCR/HIP_VISIBLE_DEVICES) as given
 * to this rank (NULL or unset: every GPU of the topology is visible) indexed by local_rank modulo
 * the number visible. *visible_index gets the CUDA device number the rank should open. Returns
 * the node GPU index (into da_topo_gpu), -1 when the rank has no GPU, -2 when it has one that is
 * not in the topology (a UUID, or fake gres devices): *visible_index is still set then. */
int da_place_gpu(const da_topo_t *t, const char *visible, int local_rank, int *visible_index);

/* The placement of one rank, as printed in the header and used for the threads. */
#define DA_PLACE_LIST 192
typedef struct da_placement {
  int local_rank, local_size;
  int gpu;                    /* node GPU index, -1 none, -2 visible but not in the topology */
  int gpu_visible;            /* CUDA device number the rank opens (-1: none) */
  char gpu_busid[32];         /* "" when unknown */
  char gpu_cpus[DA_PLACE_LIST]; /* PUs local to the GPU, "" when unknown */
  char cpus[DA_PLACE_LIST];   /* PUs the rank runs on after placement */
  int cores;                  /* cores those PUs cover */
  int sharing;                /* local ranks placed on exactly the same PUs (this one included) */
  int threads;                /* kernel threads: cores / sharing, at least 1 */
  int changed;                /* 1: the binding differs from the inherited one (da_place_apply binds) */
  char note[128];             /* why a request was not followed as asked, or "" */
} da_placement_t;

/* Decide the placement of the `n` ranks of one node. gpu[r]: the node GPU of local rank r
 * (da_place_gpu); current[r]: the PU list it inherited ("0-3"; NULL or "" = every allowed PU).
 * Fills out[0..n-1]. Requests that cannot be met fall back, with a note: gpu-local without a GPU
 * in the topology -> numa; a set outside the allowed PUs (cgroup) -> inherit. Returns 0 or -1. */
int da_place_node(const da_topo_t *t, da_bind_t bind, int n, const int *gpu, const char *const *current,
                  da_placement_t *out, char *err, size_t errlen);

/* Bind this process (all its threads) to p->cpus when p->changed and the topology is this
 * machine. Returns 0, or -1 with a message. */
int da_place_apply(const da_topo_t *t, const da_placement_t *p, char *err, size_t errlen);

/* This process's current binding as a PU list ("" on failure). */
void da_place_current(const da_topo_t *t, char *buf, size_t n);

/* ---- place_mpi.c: the same over MPI_COMM_WORLD (collective; the only MPI part) ----
 * da_place_world: the local rank from MPI_Comm_split_type(SHARED), cross-checked with
 * OMPI_COMM_WORLD_LOCAL_RANK (mpirun) or SLURM_LOCALID (srun) into env_check ("SLURM_LOCALID=1
 * agrees"), each rank's GPU from CUDA_VISIBLE_DEVICES, the node's placement exchanged between its
 * ranks, decided (da_place_node) and applied. On failure (no topology) *me still holds the local
 * rank and threads = the cores this rank may use shared with its node's ranks, and -1 is returned
 * with a message: the caller warns and runs as inherited. */
#include <stdio.h>
int da_place_world(da_bind_t bind, da_placement_t *me, char *env_check, size_t en, char *err, size_t errlen);
/* Rank 0 prints one `#` line per rank (host, rank, local rank, pid, cores bound, threads, GPU and
 * its bus id, the GPU's local cores, notes); hosts gets the distinct host names "a,b" for the
 * JSON record on rank 0. Collective. */
void da_place_print(FILE *f, da_bind_t bind, const da_placement_t *me, const char *env_check, char *hosts, size_t hn);

#ifdef __cplusplus
}
#endif
#endif /* DA_PLACE_H */
