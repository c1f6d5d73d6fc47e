/* place.c: topology discovery and placement decisions with hwloc (see place.h). Debian's hwloc
 * has no CUDA/NVML plugin, so GPUs are the PCI display / 3D controllers of GPU vendors, matched
 * to CUDA device numbers in bus id order, and a GPU's local cores are the cpuset of its nearest
 * non-I/O ancestor. Nothing here knows about MPI; only da_place_apply changes the process. */
#define _GNU_SOURCE
#include "place.h"
#include <hwloc.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char *const da_bind_names[] = {"inherit", "gpu-local", "numa", "none", NULL};

#define DA_TOPO_MAX_GPUS 64
struct da_topo {
  hwloc_topology_t topo;
  int this_system, ngpus;
  hwloc_obj_t gpus[DA_TOPO_MAX_GPUS]; /* in bus id order */
};

static void seterr(char *err, size_t n, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void seterr(char *err, size_t n, const char *fmt, ...) {
  if (!err || !n) return;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err, n, fmt, ap);
  va_end(ap);
}

static int is_gpu(hwloc_obj_t o) {
  unsigned cls = o->attr->pcidev.class_id >> 8, vendor = o->attr->pcidev.vendor_id;
  return cls == 0x03 && (vendor == 0x10de || vendor == 0x1002); /* display class; NVIDIA, AMD */
}

static int cmp_bus(const void *a, const void *b) {
  const struct hwloc_pcidev_attr_s *x = &(*(const hwloc_obj_t *)a)->attr->pcidev;
  const struct hwloc_pcidev_attr_s *y = &(*(const hwloc_obj_t *)b)->attr->pcidev;
  unsigned long kx = ((unsigned long)x->domain << 24) | ((unsigned)x->bus << 16) | ((unsigned)x->dev << 8) | x->func;
  unsigned long ky = ((unsigned long)y->domain << 24) | ((unsigned)y->bus << 16) | ((unsigned)y->dev << 8) | y->func;
  return (kx > ky) - (kx < ky);
}

int da_topo_load(da_topo_t **out, const char *xml, const char *synthetic, char *err, size_t errlen) {
  *out = NULL;
  da_topo_t *t = calloc(1, sizeof *t);
  if (!t) {
    seterr(err, errlen, "topology: out of memory");
    return -1;
  }
  if (hwloc_topology_init(&t->topo)) {
    seterr(err, errlen, "topology: hwloc_topology_init failed");
    free(t);
    return -1;
  }
  hwloc_topology_set_io_types_filter(t->topo, HWLOC_TYPE_FILTER_KEEP_IMPORTANT);
  const char *envxml = getenv("DISTATTN_HWLOC_XML");
  if (!xml && !synthetic && envxml && *envxml) xml = envxml;
  int rc = 0;
  if (xml) rc = hwloc_topology_set_xml(t->topo, xml);
  else if (synthetic) rc = hwloc_topology_set_synthetic(t->topo, synthetic);
  if (rc || hwloc_topology_load(t->topo)) {
    if (xml) seterr(err, errlen, "topology: cannot load hwloc XML '%s'", xml);
    else if (synthetic) seterr(err, errlen, "topology: bad synthetic description '%s'", synthetic);
    else seterr(err, errlen, "topology: hwloc could not load this machine's topology");
    hwloc_topology_destroy(t->topo);
    free(t);
    return -1;
  }
  t->this_system = hwloc_topology_is_thissystem(t->topo);
  for (hwloc_obj_t o = NULL; (o = hwloc_get_next_pcidev(t->topo, o)) != NULL;)
    if (is_gpu(o) && t->ngpus < DA_TOPO_MAX_GPUS) t->gpus[t->ngpus++] = o;
  qsort(t->gpus, (size_t)t->ngpus, sizeof t->gpus[0], cmp_bus);
  *out = t;
  return 0;
}

void da_topo_free(da_topo_t *t) {
  if (!t) return;
  hwloc_topology_destroy(t->topo);
  free(t);
}

void da_topo_info(const da_topo_t *t, da_topo_info_t *info) {
  info->packages = hwloc_get_nbobjs_by_type(t->topo, HWLOC_OBJ_PACKAGE);
  info->numa = hwloc_get_nbobjs_by_type(t->topo, HWLOC_OBJ_NUMANODE);
  info->cores = hwloc_get_nbobjs_by_type(t->topo, HWLOC_OBJ_CORE);
  info->pus = hwloc_get_nbobjs_by_type(t->topo, HWLOC_OBJ_PU);
  info->gpus = t->ngpus;
  info->this_system = t->this_system;
}

static hwloc_const_cpuset_t gpu_cpuset(const da_topo_t *t, int i) {
  hwloc_obj_t a = hwloc_get_non_io_ancestor_obj(t->topo, t->gpus[i]);
  return a ? a->cpuset : hwloc_topology_get_topology_cpuset(t->topo);
}

static void busid_str(hwloc_obj_t o, char *buf, size_t n) {
  snprintf(buf, n, "%04x:%02x:%02x.%01x", o->attr->pcidev.domain, o->attr->pcidev.bus, o->attr->pcidev.dev,
           o->attr->pcidev.func);
}

int da_topo_gpu(const da_topo_t *t, int i, char *busid, size_t bn, char *cpus, size_t cn) {
  if (i < 0 || i >= t->ngpus) return -1;
  if (busid) busid_str(t->gpus[i], busid, bn);
  if (cpus) hwloc_bitmap_list_snprintf(cpus, cn, gpu_cpuset(t, i));
  return 0;
}

int da_topo_gpu_by_busid(const da_topo_t *t, const char *busid) {
  unsigned dom = 0, bus, dev, fn;
  if (sscanf(busid, "%x:%x:%x.%x", &dom, &bus, &dev, &fn) != 4) {
    dom = 0;
    if (sscanf(busid, "%x:%x.%x", &bus, &dev, &fn) != 3) return -1;
  }
  for (int i = 0; i < t->ngpus; i++) {
    const struct hwloc_pcidev_attr_s *p = &t->gpus[i]->attr->pcidev;
    if (p->domain == dom && p->bus == bus && p->dev == dev && p->func == fn) return i;
  }
  return -1;
}

int da_place_gpu(const da_topo_t *t, const char *visible, int local_rank, int *visible_index) {
  *visible_index = -1;
  if (!visible) {
    if (t->ngpus == 0) return -1;
    *visible_index = local_rank % t->ngpus;
    return *visible_index;
  }
  /* CUDA semantics: "" hides every GPU; Slurm writes NoDevFiles when the job asked for none. */
  if (!*visible || !strcmp(visible, "NoDevFiles")) return -1;
  int m = 1;
  for (const char *c = visible; *c; c++) m += *c == ',';
  int want = local_rank % m;
  const char *e = visible;
  for (int i = 0; i < want; i++) e = strchr(e, ',') + 1;
  *visible_index = want;
  char *end;
  long k = strtol(e, &end, 10);
  if (end == e || (*end && *end != ',') || k < 0 || k >= t->ngpus) return -2; /* UUID, MIG, fake gres */
  return (int)k;
}

/* The k-way split of a set by cores: part i gets cores [i*nc/k, (i+1)*nc/k) (contiguous, sizes
 * differing by at most one); when there are more parts than cores, part i shares core i*nc/k. */
static hwloc_bitmap_t split(hwloc_topology_t topo, hwloc_const_cpuset_t set, int i, int k) {
  hwloc_bitmap_t r = hwloc_bitmap_alloc();
  int nc = 0, ncore = hwloc_get_nbobjs_by_type(topo, HWLOC_OBJ_CORE);
  for (int c = 0; c < ncore; c++)
    nc += hwloc_bitmap_intersects(hwloc_get_obj_by_type(topo, HWLOC_OBJ_CORE, (unsigned)c)->cpuset, set);
  if (nc == 0 || k <= 1) {
    hwloc_bitmap_copy(r, set);
    return r;
  }
  int lo = (int)((long)i * nc / k);
  int hi = k <= nc ? (int)((long)(i + 1) * nc / k) : lo + 1;
  for (int c = 0, j = 0; c < ncore; c++) {
    hwloc_obj_t core = hwloc_get_obj_by_type(topo, HWLOC_OBJ_CORE, (unsigned)c);
    if (!hwloc_bitmap_intersects(core->cpuset, set)) continue;
    if (j >= lo && j < hi) {
      hwloc_bitmap_t part = hwloc_bitmap_alloc();
      hwloc_bitmap_and(part, core->cpuset, set);
      hwloc_bitmap_or(r, r, part);
      hwloc_bitmap_free(part);
    }
    j++;
  }
  return r;
}

static int count_cores(hwloc_topology_t topo, hwloc_const_cpuset_t set) {
  int n = 0, ncore = hwloc_get_nbobjs_by_type(topo, HWLOC_OBJ_CORE);
  for (int c = 0; c < ncore; c++)
    n += hwloc_bitmap_intersects(hwloc_get_obj_by_type(topo, HWLOC_OBJ_CORE, (unsigned)c)->cpuset, set);
  if (ncore == 0) n = hwloc_bitmap_weight(set); /* a topology without cores: count PUs */
  return n;
}

/* Local ranks [first, first+k) share NUMA node `node`, or rank r spans several when there are
 * fewer ranks than nodes: the numa target of rank r of n. */
static hwloc_bitmap_t numa_target(hwloc_topology_t topo, int r, int n) {
  int N = hwloc_get_nbobjs_by_type(topo, HWLOC_OBJ_NUMANODE);
  if (N <= 0) return hwloc_bitmap_dup(hwloc_topology_get_allowed_cpuset(topo));
  if (n <= N) {
    hwloc_bitmap_t r_set = hwloc_bitmap_alloc();
    for (int i = (int)((long)r * N / n); i < (int)((long)(r + 1) * N / n); i++)
      hwloc_bitmap_or(r_set, r_set, hwloc_get_obj_by_type(topo, HWLOC_OBJ_NUMANODE, (unsigned)i)->cpuset);
    return r_set;
  }
  int node = (int)((long)r * N / n), first = -1, k = 0;
  for (int s = 0; s < n; s++)
    if ((int)((long)s * N / n) == node) {
      if (first < 0) first = s;
      k++;
    }
  return split(topo, hwloc_get_obj_by_type(topo, HWLOC_OBJ_NUMANODE, (unsigned)node)->cpuset, r - first, k);
}

int da_place_node(const da_topo_t *t, da_bind_t bind, int n, const int *gpu, const char *const *current,
                  da_placement_t *out, char *err, size_t errlen) {
  if (n <= 0) {
    seterr(err, errlen, "placement: no local ranks");
    return -1;
  }
  hwloc_topology_t topo = t->topo;
  hwloc_const_cpuset_t allowed = hwloc_topology_get_allowed_cpuset(topo);
  hwloc_bitmap_t *cur = calloc((size_t)n, sizeof *cur), *tgt = calloc((size_t)n, sizeof *tgt);
  int rc = 0;
  if (!cur || !tgt) {
    seterr(err, errlen, "placement: out of memory");
    free(cur), free(tgt);
    return -1;
  }
  for (int r = 0; r < n && !rc; r++) {
    da_placement_t *p = &out[r];
    memset(p, 0, sizeof *p);
    p->local_rank = r, p->local_size = n, p->gpu = gpu ? gpu[r] : -1, p->gpu_visible = -1;
    cur[r] = hwloc_bitmap_alloc();
    if (current && current[r] && *current[r]) {
      if (hwloc_bitmap_list_sscanf(cur[r], current[r]) || hwloc_bitmap_iszero(cur[r])) {
        seterr(err, errlen, "placement: local rank %d: bad cpu list '%s'", r, current[r]);
        rc = -1;
        break;
      }
    } else {
      hwloc_bitmap_copy(cur[r], allowed);
    }
    if (p->gpu >= 0) da_topo_gpu(t, p->gpu, p->gpu_busid, sizeof p->gpu_busid, p->gpu_cpus, sizeof p->gpu_cpus);
    da_bind_t b = bind;
    if (b == DA_BIND_GPU_LOCAL && p->gpu < 0) {
      snprintf(p->note, sizeof p->note, "gpu-local: %s; numa instead",
               p->gpu == -1 ? "no GPU for this rank" : "its GPU is not in the topology");
      b = DA_BIND_NUMA;
    }
    switch (b) {
    case DA_BIND_INHERIT: tgt[r] = hwloc_bitmap_dup(cur[r]); break;
    case DA_BIND_NONE: tgt[r] = hwloc_bitmap_dup(allowed); break;
    case DA_BIND_NUMA: tgt[r] = numa_target(topo, r, n); break;
    case DA_BIND_GPU_LOCAL: {
      /* The local ranks whose GPUs share this locality split its cores, in local rank order. */
      hwloc_const_cpuset_t dom = gpu_cpuset(t, p->gpu);
      int k = 0, i = 0;
      for (int s = 0; s < n; s++)
        if (gpu[s] >= 0 && hwloc_bitmap_isequal(gpu_cpuset(t, gpu[s]), dom)) {
          if (s < r) i++;
          k++;
        }
      tgt[r] = split(topo, dom, i, k);
      break;
    }
    }
    hwloc_bitmap_and(tgt[r], tgt[r], allowed);
    if (hwloc_bitmap_iszero(tgt[r])) {
      snprintf(p->note, sizeof p->note, "%s: no allowed core in the chosen set; inherited", da_bind_names[b]);
      hwloc_bitmap_copy(tgt[r], cur[r]);
    }
    p->changed = !hwloc_bitmap_isequal(tgt[r], cur[r]);
    hwloc_bitmap_list_snprintf(p->cpus, sizeof p->cpus, tgt[r]);
    p->cores = count_cores(topo, tgt[r]);
  }
  for (int r = 0; r < n && !rc; r++) {
    da_placement_t *p = &out[r];
    p->sharing = 0;
    for (int s = 0; s < n; s++) p->sharing += hwloc_bitmap_isequal(tgt[s], tgt[r]);
    p->threads = p->cores / p->sharing;
    if (p->threads < 1) p->threads = 1;
  }
  for (int r = 0; r < n; r++) {
    if (cur[r]) hwloc_bitmap_free(cur[r]);
    if (tgt[r]) hwloc_bitmap_free(tgt[r]);
  }
  free(cur), free(tgt);
  return rc;
}

int da_place_apply(const da_topo_t *t, const da_placement_t *p, char *err, size_t errlen) {
  if (!p->changed) return 0;
  if (!t->this_system) {
    seterr(err, errlen, "placement: the topology is not this machine's (XML or synthetic): not binding");
    return -1;
  }
  hwloc_bitmap_t set = hwloc_bitmap_alloc();
  int rc = hwloc_bitmap_list_sscanf(set, p->cpus);
  if (!rc) rc = hwloc_set_cpubind(t->topo, set, HWLOC_CPUBIND_PROCESS);
  if (rc) seterr(err, errlen, "placement: cannot bind to cpus %s", p->cpus);
  hwloc_bitmap_free(set);
  return rc ? -1 : 0;
}

void da_place_current(const da_topo_t *t, char *buf, size_t n) {
  hwloc_bitmap_t set = hwloc_bitmap_alloc();
  buf[0] = '\0';
  if (t->this_system && !hwloc_get_cpubind(t->topo, set, HWLOC_CPUBIND_PROCESS))
    hwloc_bitmap_list_snprintf(buf, n, set);
  hwloc_bitmap_free(set);
}
