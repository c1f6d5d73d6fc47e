/* devapi_cuda.c: the `cuda` device table (devapi.h) over the CUDA runtime API (cudart_static,
 * never -lcuda: a binary linked to the driver library does not start without a driver). The only
 * file of comm/ that includes a CUDA header; every cudaError_t becomes a distattn status here,
 * once, carrying CUDA's own message. Built only when CMake finds the CUDA toolkit. */
#include <stdio.h>
#include <string.h>
#include <cuda_runtime_api.h>
#include "devapi.h"

_Static_assert(sizeof(cudaIpcMemHandle_t) <= DA_DEV_HANDLE_BYTES, "cudaIpcMemHandle_t fits the handle");
_Static_assert(sizeof(cudaIpcEventHandle_t) <= DA_DEV_HANDLE_BYTES, "cudaIpcEventHandle_t fits the handle");

/* The one translation: out of memory stays DA_ERR_OUT_OF_MEMORY, the rest is DA_ERR_CUDA. */
static da_status_t cu(cudaError_t e, const char *file, int line, const char *what) {
  if (e == cudaSuccess) return DA_SUCCESS;
  (void)cudaGetLastError(); /* clear the sticky-free error so the next call starts clean */
  return da_error(e == cudaErrorMemoryAllocation ? DA_ERR_OUT_OF_MEMORY : DA_ERR_CUDA, file, line,
                  "CUDA %s: error %d (%s): %s", what, (int)e, cudaGetErrorName(e), cudaGetErrorString(e));
}
#define CU(call, what) cu((call), __FILE__, __LINE__, (what))

static da_status_t cuda_probe(int *ndev) {
  *ndev = 0;
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess)
    return da_error(DA_ERR_CUDA, __FILE__, __LINE__, "CUDA: no usable device (cudaGetDeviceCount: %s: %s)",
                    cudaGetErrorName(e), cudaGetErrorString(e));
  if (n == 0) return DA_ERR(DA_ERR_CUDA, "CUDA: the runtime sees no device");
  *ndev = n;
  return DA_SUCCESS;
}

static da_status_t cuda_set_device(int dev) { return CU(cudaSetDevice(dev), "cudaSetDevice"); }

static int cuda_device_name(int dev, char *name, size_t nn, char *busid, size_t bn) {
  struct cudaDeviceProp prop;
  if (cudaGetDeviceProperties(&prop, dev) != cudaSuccess) return -1;
  snprintf(name, nn, "%s", prop.name);
  if (cudaDeviceGetPCIBusId(busid, (int)bn, dev) != cudaSuccess) snprintf(busid, bn, "0x%02x", prop.pciBusID);
  return 0;
}

static da_status_t cuda_alloc(void **ptr, size_t bytes) {
  *ptr = NULL;
  return CU(cudaMalloc(ptr, bytes ? bytes : 1), "cudaMalloc");
}

static void cuda_free(void *ptr) {
  if (ptr) (void)cudaFree(ptr);
}

/* Page-locked, so cudaMemcpyAsync to and from it is truly asynchronous (pageable memory would
 * make it a staged, host-synchronous copy); portable: any context of the process may use it. */
static da_status_t cuda_host_alloc(void **ptr, size_t bytes) {
  *ptr = NULL;
  return CU(cudaHostAlloc(ptr, bytes ? bytes : 1, cudaHostAllocPortable), "cudaHostAlloc");
}

static void cuda_host_free(void *ptr) {
  if (ptr) (void)cudaFreeHost(ptr);
}

static da_status_t cuda_stream_create(da_dstream_t *s) {
  cudaStream_t st = NULL;
  DA_CHECK(CU(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking), "cudaStreamCreateWithFlags"));
  *s = st;
  return DA_SUCCESS;
}

static void cuda_stream_destroy(da_dstream_t s) {
  if (s) (void)cudaStreamDestroy((cudaStream_t)s);
}

static da_status_t cuda_stream_sync(da_dstream_t s) {
  return CU(cudaStreamSynchronize((cudaStream_t)s), "cudaStreamSynchronize");
}

static da_status_t cuda_copy_async(void *dst, const void *src, size_t bytes, da_dstream_t s) {
  return CU(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, (cudaStream_t)s), "cudaMemcpyAsync");
}

static da_status_t cuda_memset_async(void *dst, int value, size_t bytes, da_dstream_t s) {
  return CU(cudaMemsetAsync(dst, value, bytes, (cudaStream_t)s), "cudaMemsetAsync");
}

static da_status_t cuda_copy_to_host(void *host, const void *dev, size_t bytes, da_dstream_t s) {
  DA_CHECK(CU(cudaMemcpyAsync(host, dev, bytes, cudaMemcpyDeviceToHost, (cudaStream_t)s), "cudaMemcpyAsync D2H"));
  return cuda_stream_sync(s);
}

static da_status_t cuda_copy_from_host(void *dev, const void *host, size_t bytes, da_dstream_t s) {
  DA_CHECK(CU(cudaMemcpyAsync(dev, host, bytes, cudaMemcpyHostToDevice, (cudaStream_t)s), "cudaMemcpyAsync H2D"));
  return cuda_stream_sync(s);
}

static da_status_t cuda_event_create(da_devent_t *e, int ipc) {
  cudaEvent_t ev = NULL;
  unsigned flags = cudaEventDisableTiming | (ipc ? cudaEventInterprocess : 0);
  DA_CHECK(CU(cudaEventCreateWithFlags(&ev, flags), "cudaEventCreateWithFlags"));
  *e = ev;
  return DA_SUCCESS;
}

static void cuda_event_destroy(da_devent_t e) {
  if (e) (void)cudaEventDestroy((cudaEvent_t)e);
}

static da_status_t cuda_event_record(da_devent_t e, da_dstream_t s) {
  return CU(cudaEventRecord((cudaEvent_t)e, (cudaStream_t)s), "cudaEventRecord");
}

static da_status_t cuda_event_query(da_devent_t e, int *done) {
  cudaError_t r = cudaEventQuery((cudaEvent_t)e);
  *done = r == cudaSuccess;
  if (r == cudaErrorNotReady) {
    (void)cudaGetLastError();
    return DA_SUCCESS;
  }
  return CU(r, "cudaEventQuery");
}

static da_status_t cuda_stream_wait_event(da_dstream_t s, da_devent_t e) {
  return CU(cudaStreamWaitEvent((cudaStream_t)s, (cudaEvent_t)e, 0), "cudaStreamWaitEvent");
}

static da_status_t cuda_mem_handle(void *ptr, size_t bytes, da_dev_mem_handle_t *h) {
  cudaIpcMemHandle_t m;
  memset(h, 0, sizeof *h);
  DA_CHECK(CU(cudaIpcGetMemHandle(&m, ptr), "cudaIpcGetMemHandle"));
  memcpy(h->opaque, &m, sizeof m);
  h->bytes = bytes;
  return DA_SUCCESS;
}

static da_status_t cuda_mem_open(const da_dev_mem_handle_t *h, void **ptr) {
  cudaIpcMemHandle_t m;
  memcpy(&m, h->opaque, sizeof m);
  *ptr = NULL;
  return CU(cudaIpcOpenMemHandle(ptr, m, cudaIpcMemLazyEnablePeerAccess), "cudaIpcOpenMemHandle");
}

static void cuda_mem_close(void *ptr) {
  if (ptr) (void)cudaIpcCloseMemHandle(ptr);
}

static da_status_t cuda_event_handle(da_devent_t e, da_dev_event_handle_t *h) {
  cudaIpcEventHandle_t m;
  memset(h, 0, sizeof *h);
  DA_CHECK(CU(cudaIpcGetEventHandle(&m, (cudaEvent_t)e), "cudaIpcGetEventHandle"));
  memcpy(h->opaque, &m, sizeof m);
  return DA_SUCCESS;
}

static da_status_t cuda_event_open(const da_dev_event_handle_t *h, da_devent_t *e) {
  cudaIpcEventHandle_t m;
  cudaEvent_t ev = NULL;
  memcpy(&m, h->opaque, sizeof m);
  DA_CHECK(CU(cudaIpcOpenEventHandle(&ev, m), "cudaIpcOpenEventHandle"));
  *e = ev;
  return DA_SUCCESS;
}

const da_devapi_t da_devapi_cuda = {
    .name = "cuda",
    .probe = cuda_probe,
    .set_device = cuda_set_device,
    .device_name = cuda_device_name,
    .alloc = cuda_alloc,
    .free = cuda_free,
    .stream_create = cuda_stream_create,
    .stream_destroy = cuda_stream_destroy,
    .stream_sync = cuda_stream_sync,
    .host_alloc = cuda_host_alloc,
    .host_free = cuda_host_free,
    .copy_async = cuda_copy_async,
    .memset_async = cuda_memset_async,
    .copy_to_host = cuda_copy_to_host,
    .copy_from_host = cuda_copy_from_host,
    .event_create = cuda_event_create,
    .event_destroy = cuda_event_destroy,
    .event_record = cuda_event_record,
    .event_query = cuda_event_query,
    .stream_wait_event = cuda_stream_wait_event,
    .mem_handle = cuda_mem_handle,
    .mem_open = cuda_mem_open,
    .mem_close = cuda_mem_close,
    .event_handle = cuda_event_handle,
    .event_open = cuda_event_open,
    .publish_done = NULL, /* CUDA handles name nothing that outlives the process */
};
