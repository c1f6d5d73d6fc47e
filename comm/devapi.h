/* devapi.h: the seam between the device transports (ipc.c, staged.c, nccl.c) and a device runtime:
 * the dozen calls of the CUDA runtime API they need, as a table. Two tables:
 *   - `cuda` (devapi_cuda.c, built only with the CUDA toolkit): the CUDA runtime, cudart_static;
 *     the only file of comm/ that includes a CUDA header;
 *   - `host` (devapi_host.c): "device memory" in POSIX shared memory, streams as queues run by
 *     the owning process, events as counters in shared memory. It exists so that the cuda-ipc
 *     protocol runs under MPI in `make test` without a GPU, and it makes ordering mistakes
 *     visible (see below), where a plain memcpy would hide them.
 * Not public API. No MPI here: exchanging handles is the transport's business. */
#ifndef DA_DEVAPI_H
#define DA_DEVAPI_H

#include <stddef.h>
#include <stdint.h>
#include "core.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef void *da_dstream_t; /* cudaStream_t, or a host queue */
typedef void *da_devent_t;  /* cudaEvent_t, or a host event */

/* A handle another process of the node opens: the exporter's allocation (cudaIpcMemHandle_t:
 * 64 bytes; host: a shared-memory segment name) and its size. Fixed size, so it travels in one
 * allgather. */
#define DA_DEV_HANDLE_BYTES 64
typedef struct {
  unsigned char opaque[DA_DEV_HANDLE_BYTES];
  uint64_t bytes;
} da_dev_mem_handle_t;
typedef struct {
  unsigned char opaque[DA_DEV_HANDLE_BYTES];
} da_dev_event_handle_t;

typedef struct da_devapi {
  const char *name; /* "cuda", "host" */

  /* Fails fast (DA_ERR_CUDA / DA_ERR_UNSUPPORTED, naming CUDA and the reason) when the runtime
   * has no usable device; *ndev = the devices this process sees. Every other entry may assume
   * it succeeded. */
  da_status_t (*probe)(int *ndev);

  /* Device memory that mem_handle can export: the whole allocation, never a part of one. */
  da_status_t (*alloc)(void **ptr, size_t bytes);
  void (*free)(void *ptr);

  da_status_t (*stream_create)(da_dstream_t *s);
  void (*stream_destroy)(da_dstream_t s);
  /* Blocks the host until s drained (host table: bounded, DA_ERR_TIMEOUT after 60 s). */
  da_status_t (*stream_sync)(da_dstream_t s);

  /* Stream-ordered: dst and src any device (or host-table shared) memory of this process,
   * including memory opened with mem_open, or pinned host memory from host_alloc. */
  da_status_t (*copy_async)(void *dst, const void *src, size_t bytes, da_dstream_t s);
  da_status_t (*memset_async)(void *dst, int value, size_t bytes, da_dstream_t s);
  /* Pinned host memory (CUDA: cudaHostAlloc, page-locked, so copy_async to and from it runs
   * asynchronously on the stream; host table: ordinary aligned memory, outside the shared
   * segments, so copies to and from it are local copies). copy_async and memset_async take it on
   * either side. The staging buffers of the mpi transport on device memory (comm/staged.c). */
  da_status_t (*host_alloc)(void **ptr, size_t bytes);
  void (*host_free)(void *ptr);

  /* Device to host and host to device (blocking for the host: the caller's host buffer is
   * free or filled on return); s orders it after the stream's earlier work. */
  da_status_t (*copy_to_host)(void *host, const void *dev, size_t bytes, da_dstream_t s);
  da_status_t (*copy_from_host)(void *dev, const void *host, size_t bytes, da_dstream_t s);

  /* Events. ipc = 1: exportable with event_handle (CUDA: cudaEventInterprocess, no timing). */
  da_status_t (*event_create)(da_devent_t *e, int ipc);
  void (*event_destroy)(da_devent_t e);
  da_status_t (*event_record)(da_devent_t e, da_dstream_t s);
  /* *done = 1 when the work before the event's latest record has completed (CUDA semantics:
   * an event never recorded is complete). */
  da_status_t (*event_query)(da_devent_t e, int *done);
  /* Work queued on s after this call waits for the event's latest record *at the time of this
   * call*: across processes the recorder must say (on the host channel) that it recorded. */
  da_status_t (*stream_wait_event)(da_dstream_t s, da_devent_t e);

  /* IPC. mem_handle: ptr is what alloc returned. mem_open maps a peer's allocation into this
   * process (*ptr valid until mem_close). */
  da_status_t (*mem_handle)(void *ptr, size_t bytes, da_dev_mem_handle_t *h);
  da_status_t (*mem_open)(const da_dev_mem_handle_t *h, void **ptr);
  void (*mem_close)(void *ptr);
  da_status_t (*event_handle)(da_devent_t e, da_dev_event_handle_t *h);
  da_status_t (*event_open)(const da_dev_event_handle_t *h, da_devent_t *e);
  /* (optional) After every peer opened the handles of this process: drop the names that let
   * others open them (host: shm_unlink, so a crash leaves nothing in /dev/shm). */
  void (*publish_done)(void);

  /* ---- the launcher's GPU map (launcher/gpumap_mpi.c) ----
   * (optional; NULL: one device, nothing to select) Make device dev (0 .. probe's ndev - 1) the
   * one this process's later calls use (CUDA: cudaSetDevice), before any allocation. */
  da_status_t (*set_device)(int dev);
  /* (optional; NULL: unknown) The device's name ("NVIDIA H100 80GB HBM3") and PCI bus id
   * ("0000:1b:00.0"), for the map in the header. 0 or -1. */
  int (*device_name)(int dev, char *name, size_t nn, char *busid, size_t bn);
} da_devapi_t;

extern const da_devapi_t da_devapi_host;
#ifdef DA_HAVE_CUDART
extern const da_devapi_t da_devapi_cuda;
#endif

/* ---- host table: test hooks -----------------------------------------------------------------
 * Copies and memsets run when they reach the head of their stream and the process that owns the
 * stream calls into the table (every entry drives progress). A copy that writes through memory
 * opened with mem_open is a "link" transfer: it starts by filling its destination with the
 * poison byte 0xFF (NaN in every float format) and lands the real bytes only link_delay seconds
 * later, reading its source then. So a reader that skips the wait for the copy's event reads
 * poison, and a writer that reuses the source (or the destination) too early corrupts the data,
 * both visibly. Local copies complete at once. Default delay 0: set it for ordering tests. */
void da_devapi_host_set_link_delay(double seconds);
/* The same for local copy_async and memset_async (both ends in this process's own memory): the
 * destination is poisoned when the op starts and written `seconds` later. It makes host code
 * that reads what a stream wrote without draining the stream first (the ring driver with host
 * kernels, docs/ring.md "Device mode") read NaN. Default 0. */
void da_devapi_host_set_local_delay(double seconds);
/* Enqueue on s a no-op that completes `seconds` after it reaches the head of the stream: a
 * stand-in for a kernel, so tests can keep a buffer "in use" on a stream for a while. */
da_status_t da_devapi_host_stall(da_dstream_t s, double seconds);

/* ---- allocation accounting (both tables) -------------------------------------------------------
 * Every device allocation of distattn's own (the drivers' buffers, the launcher's tensors) goes
 * through these two calls, so that the bytes a process holds on the device, and the most it ever
 * held, can be reported (`distattn run --device cuda`: peak device memory per rank). They wrap
 * d->alloc / d->free; memory the caller allocates itself is not counted. Thread-safe. */
da_status_t da_dev_alloc(const da_devapi_t *d, void **ptr, size_t bytes);
void da_dev_free(const da_devapi_t *d, void *ptr);
/* Bytes allocated through da_dev_alloc and not yet freed, and the largest that figure has been
 * in this process (either may be NULL). */
void da_dev_mem_stats(uint64_t *current, uint64_t *peak);
/* The same for pinned host memory (d->host_alloc / d->host_free): the staging buffers of the mpi
 * transport on device memory. Counted apart from device bytes: they are host RAM, page-locked. */
da_status_t da_dev_host_alloc(const da_devapi_t *d, void **ptr, size_t bytes);
void da_dev_host_free(const da_devapi_t *d, void *ptr);
void da_dev_pinned_stats(uint64_t *current, uint64_t *peak);

/* The table named `name`; NULL with an error listing what this build has. */
const da_devapi_t *da_devapi_find(const char *name);

#ifdef __cplusplus
}
#endif
#endif /* DA_DEVAPI_H */
