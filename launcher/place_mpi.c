/* place_mpi.c: placement over MPI_COMM_WORLD: the node's ranks exchange their GPU and inherited
 * cores, every rank decides the node's placement with da_place_node (the same pure function the
 * topology tests drive) and applies its own; rank 0 prints the rank -> host/core/GPU map. */
#define _GNU_SOURCE
#include <mpi.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "fault.h"
#include "place.h"
#include "report.h"

typedef struct cur_msg {
  int gpu;
  char cpus[DA_PLACE_LIST];
} cur_msg_t;

static void env_cross_check(int local, char *buf, size_t n) {
  /* mpirun sets OMPI_COMM_WORLD_LOCAL_RANK; srun sets SLURM_LOCALID (inside an allocation a
   * mpirun-launched rank inherits the batch step's SLURM_LOCALID, so mpirun's variable wins). */
  const char *names[] = {"OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", NULL};
  buf[0] = '\0';
  for (int i = 0; names[i]; i++) {
    const char *v = getenv(names[i]);
    if (!v || !*v) continue;
    int agree = atoi(v) == local;
    snprintf(buf, n, "%s=%s %s", names[i], v, agree ? "agrees" : "DIFFERS");
    return;
  }
  snprintf(buf, n, "no launcher local rank");
}

int da_place_world(da_bind_t bind, da_placement_t *me, char *env_check, size_t en, char *err, size_t errlen) {
  MPI_Comm node;
  int local = 0, nlocal = 1, rc = 0;
  memset(me, 0, sizeof *me);
  da_fault_point("place");
  if (MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node) != MPI_SUCCESS)
    node = MPI_COMM_SELF;
  MPI_Comm_rank(node, &local);
  MPI_Comm_size(node, &nlocal);
  env_cross_check(local, env_check, en);

  da_topo_t *t = NULL;
  cur_msg_t mine = {.gpu = -1}, *all = calloc((size_t)nlocal, sizeof *all);
  int vis = -1;
  if (da_topo_load(&t, NULL, NULL, err, errlen)) rc = -1;
  if (t) {
    mine.gpu = da_place_gpu(t, getenv("CUDA_VISIBLE_DEVICES"), local, &vis);
    da_place_current(t, mine.cpus, sizeof mine.cpus);
  }
  if (!all) rc = -1;
  MPI_Allgather(&mine, sizeof mine, MPI_BYTE, all ? all : &mine, all ? (int)sizeof mine : 0, MPI_BYTE, node);
  int bad = rc != 0;
  MPI_Allreduce(MPI_IN_PLACE, &bad, 1, MPI_INT, MPI_MAX, node);
  da_placement_t *out = !bad ? calloc((size_t)nlocal, sizeof *out) : NULL;
  int *gpus = !bad ? calloc((size_t)nlocal, sizeof *gpus) : NULL;
  const char **cur = !bad ? calloc((size_t)nlocal, sizeof *cur) : NULL;
  if (out && gpus && cur) {
    for (int r = 0; r < nlocal; r++) gpus[r] = all[r].gpu, cur[r] = all[r].cpus;
    if (da_place_node(t, bind, nlocal, gpus, cur, out, err, errlen) == 0) {
      *me = out[local];
      me->gpu_visible = vis;
      da_topo_info_t info;
      da_topo_info(t, &info);
      if (!info.this_system) /* DISTATTN_HWLOC_XML: a dry run of another machine's placement */
        snprintf(me->note, sizeof me->note, "topology from XML: decided, not applied");
      else if (da_place_apply(t, me, err, errlen))
        rc = -1;
    } else {
      rc = -1;
    }
  } else {
    if (!rc) snprintf(err, errlen, "placement: a rank of this node could not load its topology");
    rc = -1;
  }
  if (rc) { /* as inherited: this rank's share of its cores */
    me->local_rank = local, me->local_size = nlocal, me->gpu = mine.gpu, me->gpu_visible = vis;
    snprintf(me->cpus, sizeof me->cpus, "%s", mine.cpus);
    int online = (int)sysconf(_SC_NPROCESSORS_ONLN);
    cpu_set_t set;
    int mycpus = !sched_getaffinity(0, sizeof set, &set) ? CPU_COUNT(&set) : online;
    me->cores = mycpus, me->sharing = mycpus >= online && nlocal > 1 ? nlocal : 1;
    me->threads = me->cores / me->sharing > 0 ? me->cores / me->sharing : 1;
    snprintf(me->note, sizeof me->note, "placement failed: inherited");
  }
  free(out), free(gpus), free(cur), free(all);
  da_topo_free(t);
  if (node != MPI_COMM_SELF) MPI_Comm_free(&node);
  return rc;
}

typedef struct line_msg {
  da_placement_t p;
  char host[64], env[64];
  int pid;
} line_msg_t;

void da_place_print(FILE *f, da_bind_t bind, const da_placement_t *me, const char *env_check, char *hosts, size_t hn) {
  int rank, size;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  line_msg_t m;
  memset(&m, 0, sizeof m);
  m.p = *me;
  /* Slurm's node name when it differs from the host name (emulated nodes on one machine) */
  const char *sn = getenv("SLURMD_NODENAME");
  if (sn && *sn && strcmp(sn, da_report_hostname()))
    snprintf(m.host, sizeof m.host, "%s/%s", da_report_hostname(), sn);
  else
    snprintf(m.host, sizeof m.host, "%s", da_report_hostname());
  snprintf(m.env, sizeof m.env, "%s", env_check ? env_check : "");
  m.pid = (int)getpid();
  line_msg_t *all = rank == 0 ? calloc((size_t)size, sizeof *all) : NULL;
  MPI_Gather(&m, sizeof m, MPI_BYTE, all, sizeof m, MPI_BYTE, 0, MPI_COMM_WORLD);
  if (hosts && hn) hosts[0] = '\0';
  if (rank != 0 || !all) return;
  fprintf(f, "# placement: --bind %s; threads = bound cores / local ranks on the same cores\n", da_bind_names[bind]);
  size_t off = 0;
  for (int r = 0; r < size; r++) {
    const da_placement_t *p = &all[r].p;
    char gpu[320];
    if (p->gpu >= 0)
      snprintf(gpu, sizeof gpu, "gpu %d %s local cores %s", p->gpu_visible, p->gpu_busid, p->gpu_cpus);
    else if (p->gpu == -2)
      snprintf(gpu, sizeof gpu, "gpu %d (bus id not in the topology)", p->gpu_visible);
    else
      snprintf(gpu, sizeof gpu, "gpu -");
    fprintf(f, "#  rank %3d  host %-12s  local %d/%d (%s)  pid %d  cores %s (%d core%s, %d thread%s)  %s%s%s\n", r,
            all[r].host, p->local_rank, p->local_size, all[r].env, all[r].pid, p->cpus[0] ? p->cpus : "?", p->cores,
            p->cores == 1 ? "" : "s", p->threads, p->threads == 1 ? "" : "s", gpu, p->note[0] ? "  note: " : "",
            p->note);
    int seen = 0;
    for (int q = 0; q < r; q++) seen |= !strcmp(all[q].host, all[r].host);
    if (hosts && !seen && off + strlen(all[r].host) + 2 < hn)
      off += (size_t)snprintf(hosts + off, hn - off, "%s%s", off ? "," : "", all[r].host);
  }
  free(all);
}
