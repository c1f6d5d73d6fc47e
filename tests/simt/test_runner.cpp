/* test_runner.cpp: the SIMT runner's own semantics, each against what the CUDA programming guide
 * says: thread / block indices in 3-D, shuffles (idx, xor, down; widths), barriers with exited
 * threads, atomics, the poisoned dynamic shared memory, deferred cp.async (groups, zero fill),
 * launch errors (configuration, dynamic shared memory limit), the runtime subset, and the aborts
 * that replace hangs (deadlock, partial-warp shuffle), run in a forked child. Built twice: fibers
 * (test_runner) and threads under ThreadSanitizer (test_runner_tsan, without the abort cases). */
#include <sys/wait.h>
#include <unistd.h>

#include <string>
#include <vector>

#include "simt_test.h"

/* ---- indices ---- */
DA_GLOBAL(64) void ids_kernel(int *out) {
  int b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  int t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  int nt = blockDim.x * blockDim.y * blockDim.z;
  out[b * nt + t] += 1 + (int)(blockIdx.x + 10 * blockIdx.y + 100 * blockIdx.z) * 1000;
}

static void test_ids(void) {
  dim3 grid(3, 2, 2), block(8, 4, 2);
  int nb = 12, nt = 64;
  std::vector<int> out(nb * nt, 0);
  CHECK(DA_LAUNCH(ids_kernel, grid, block, 0, 0, out.data()) == cudaSuccess, "launch");
  for (int bz = 0; bz < 2; bz++)
    for (int by = 0; by < 2; by++)
      for (int bx = 0; bx < 3; bx++)
        for (int t = 0; t < nt; t++) {
          int b = bx + 3 * (by + 2 * bz);
          CHECK(out[b * nt + t] == 1 + (bx + 10 * by + 100 * bz) * 1000, "block (%d,%d,%d) thread %d: %d", bx,
                by, bz, t, out[b * nt + t]);
        }
}

/* ---- shuffles: out[kind][width][thread] ---- */
DA_GLOBAL(64) void shfl_kernel(int *oi, float *of, unsigned *ou) {
  int t = threadIdx.x, lane = t % 32, w = 0;
  for (int width = 4; width <= 32; width *= 2, w++) {
    int src = (lane * 7 + 3) % 32;
    oi[(0 * 4 + w) * 64 + t] = __shfl_sync(0xffffffffu, t * 10, src, width);
    of[(0 * 4 + w) * 64 + t] = __shfl_xor_sync(0xffffffffu, t * 0.5f, 5, width);
    ou[(0 * 4 + w) * 64 + t] = __shfl_down_sync(0xffffffffu, (unsigned)t + 100u, 3, width);
  }
}

static void test_shuffles(void) {
  std::vector<int> oi(4 * 64);
  std::vector<float> of(4 * 64);
  std::vector<unsigned> ou(4 * 64);
  DA_LAUNCH(shfl_kernel, 1, 64, 0, 0, oi.data(), of.data(), ou.data());
  int w = 0;
  for (int width = 4; width <= 32; width *= 2, w++)
    for (int t = 0; t < 64; t++) {
      int lane = t % 32, base = t - lane, seg = lane / width * width;
      /* __shfl_sync: srcLane % width within the caller's segment */
      int s_idx = seg + ((lane * 7 + 3) % 32) % width;
      /* __shfl_xor_sync: lane ^ 5 (5 < width when width >= 8; for width 4 the xor leaves the
       * segment: a later segment is not read, the caller keeps its value) */
      int x = lane ^ 5, s_xor = x >= seg + width ? lane : x;
      /* __shfl_down_sync: lane + 3 if it stays in the segment, else unchanged */
      int s_down = lane + 3 < seg + width ? lane + 3 : lane;
      CHECK(oi[w * 64 + t] == (base + s_idx) * 10, "shfl idx width %d thread %d: %d", width, t, oi[w * 64 + t]);
      CHECK(of[w * 64 + t] == (base + s_xor) * 0.5f, "shfl xor width %d thread %d: %g", width, t, of[w * 64 + t]);
      CHECK(ou[w * 64 + t] == (unsigned)(base + s_down) + 100u, "shfl down width %d thread %d: %u", width, t,
            ou[w * 64 + t]);
    }
}

/* ---- barriers with exited threads, atomics ---- */
DA_GLOBAL(96) void exit_kernel(const int *in, int *out, float *acc) {
  __shared__ int s[96];
  int t = threadIdx.x;
  atomicAdd(acc, 1.0f);
  if (t % 3 == 0) return; /* a third of the threads leave before the barriers */
  s[t] = in[t];
  __syncthreads();
  int sum = 0;
  for (int i = 0; i < 96; i++)
    if (i % 3) sum += s[i];
  __syncthreads();
  out[t] = sum;
}

static void test_exit_atomic(void) {
  std::vector<int> in(96), out(96, -1);
  float acc = 0;
  int want = 0;
  for (int i = 0; i < 96; i++) {
    in[i] = (int)(test_rng()() % 1000);
    if (i % 3) want += in[i];
  }
  DA_LAUNCH(exit_kernel, 4, 96, 0, 0, in.data(), out.data(), &acc);
  for (int t = 0; t < 96; t++) CHECK(out[t] == (t % 3 ? want : -1), "thread %d: %d, want %d", t, out[t], want);
  CHECK(acc == 4 * 96, "atomicAdd: %g, want %d", acc, 4 * 96);
}

/* ---- dynamic shared memory: poisoned with 0xff before every block ---- */
DA_GLOBAL(32) void dyn_kernel(float *poisoned_bytes) {
  DA_DYN_SMEM(unsigned char, s);
  int t = threadIdx.x, n = 0;
  for (int i = t; i < 4096; i += 32) n += s[i] == 0xff;
  atomicAdd(&poisoned_bytes[blockIdx.x], (float)n);
  __syncthreads();
  for (int i = t; i < 4096; i += 32) s[i] = 0; /* the next block must not see this */
}

static void test_dyn_smem(void) {
  std::vector<float> f(3, 0.0f);
  DA_LAUNCH(dyn_kernel, 3, 32, 4096, 0, f.data());
  for (int b = 0; b < 3; b++) CHECK(f[b] == 4096.0f, "block %d saw %g poisoned bytes of 4096", b, f[b]);
}

/* ---- cp.async: deferred to the wait that retires the group ---- */
DA_GLOBAL(32) void cp_kernel(const float *g, float *out) {
  __shared__ __align__(16) float s[4 * 4];
  if (threadIdx.x) return;
  for (int i = 0; i < 16; i++) s[i] = -1.0f;
  da_cp_async_16(&s[0], &g[0], true); /* group 1 */
  da_cp_async_commit();
  da_cp_async_16(&s[4], &g[4], true);          /* group 2 */
  da_cp_async_16(&s[8], (const void *)16, false); /* zero fill, source not read */
  da_cp_async_commit();
  da_cp_async_16(&s[12], &g[12], true); /* never committed */
  out[0] = s[0];                        /* nothing has landed yet */
  da_cp_async_wait<1>();                /* group 1 retires */
  out[1] = s[0];
  out[2] = s[4];
  da_cp_async_wait<0>(); /* group 2 retires; the uncommitted copy does not */
  out[3] = s[4];
  out[4] = s[8];
  out[5] = s[12];
}

static void test_cp_async(void) {
  std::vector<float> g(16), out(6, NAN);
  for (int i = 0; i < 16; i++) g[i] = (float)(i + 1);
  DA_LAUNCH(cp_kernel, 1, 32, 0, 0, g.data(), out.data());
  CHECK(out[0] == -1.0f, "copy landed before its wait: %g", out[0]);
  CHECK(out[1] == 1.0f && out[2] == -1.0f, "wait_group 1: %g %g (want 1, -1)", out[1], out[2]);
  CHECK(out[3] == 5.0f && out[4] == 0.0f, "wait_group 0: %g %g (want 5, 0)", out[3], out[4]);
  CHECK(out[5] == -1.0f, "an uncommitted copy was performed by wait_group 0: %g", out[5]);
}

/* ---- launch errors and the runtime subset ---- */
DA_GLOBAL(1024) void flag_kernel(int *ran) {
  if (threadIdx.x == 0) *ran = 1;
}

static void test_launch_errors(void) {
  int ran = 0;
  CHECK(DA_LAUNCH(flag_kernel, 1, 1025, 0, 0, &ran) == cudaErrorInvalidConfiguration, "1025 threads accepted");
  CHECK(DA_LAUNCH(flag_kernel, dim3(1, 65536), 32, 0, 0, &ran) == cudaErrorInvalidConfiguration, "grid.y 65536");
  CHECK(DA_LAUNCH(flag_kernel, 0, 32, 0, 0, &ran) == cudaErrorInvalidConfiguration, "empty grid accepted");
  CHECK(ran == 0, "a refused launch ran its kernel");
  CHECK(cudaPeekAtLastError() == cudaErrorInvalidConfiguration, "peek");
  CHECK(cudaGetLastError() == cudaErrorInvalidConfiguration && cudaGetLastError() == cudaSuccess,
        "cudaGetLastError must return the error once, then reset it");
  CHECK(DA_LAUNCH(flag_kernel, 1, 32, 64 * 1024, 0, &ran) == cudaErrorInvalidValue,
        "64 KiB dynamic smem without cudaFuncSetAttribute accepted");
  CHECK(cudaFuncSetAttribute(flag_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 200000) ==
            cudaErrorInvalidValue,
        "a limit above the opt-in maximum accepted");
  CHECK(cudaFuncSetAttribute(flag_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024) == cudaSuccess,
        "cudaFuncSetAttribute");
  CHECK(DA_LAUNCH(flag_kernel, 1, 32, 64 * 1024, 0, &ran) == cudaSuccess && ran == 1, "launch after the opt-in");
  (void)cudaGetLastError();
  int v = 0;
  CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0) == cudaSuccess && v == 166912,
        "opt-in smem %d", v);
  CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, 0) == cudaSuccess && v == 108, "SMs %d", v);
  CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrClockRate, 0) != cudaSuccess, "an unemulated attribute answered");
  (void)cudaGetLastError();
  float a[8] = {1, 2, 3, 4, 5, 6, 7, 8}, b[8];
  CHECK(cudaMemsetAsync(b, 0, sizeof b, 0) == cudaSuccess && b[7] == 0.0f, "memset");
  CHECK(cudaMemcpyAsync(b, a, sizeof a, cudaMemcpyDeviceToDevice, 0) == cudaSuccess && b[7] == 8.0f, "memcpy");
  CHECK(strcmp(cudaGetErrorString(cudaErrorInvalidValue), "invalid argument") == 0, "error string");
  CHECK(strcmp(cudaGetErrorName(cudaErrorInvalidConfiguration), "cudaErrorInvalidConfiguration") == 0, "name");
}

/* ---- aborts instead of hangs (in a forked child; its stderr is returned) ---- */
static std::string in_child(void (*fn)(void), int *status) {
  int p[2];
  if (pipe(p)) return "pipe failed";
  fflush(stdout);
  pid_t pid = fork();
  if (pid == 0) {
    dup2(p[1], 2);
    close(p[0]);
    alarm(30);
    fn();
    _exit(0);
  }
  close(p[1]);
  std::string s;
  char buf[512];
  ssize_t n;
  while ((n = read(p[0], buf, sizeof buf)) > 0) s.append(buf, (size_t)n);
  close(p[0]);
  waitpid(pid, status, 0);
  return s;
}

/* Lane 0 waits at __syncthreads, lanes 1-31 at __syncwarp: neither barrier can complete. */
DA_GLOBAL(32) void deadlock_kernel(int *x) {
  if (threadIdx.x == 0)
    __syncthreads();
  else
    __syncwarp();
  x[threadIdx.x] = 1;
}
static void run_deadlock(void) {
  int x[32];
  DA_LAUNCH(deadlock_kernel, 1, 32, 0, 0, x);
}

DA_GLOBAL(32) void partial_kernel(int *x) {
  if (threadIdx.x < 16) x[threadIdx.x] = __shfl_sync(0x0000ffffu, (int)threadIdx.x, 0);
  else x[threadIdx.x] = __shfl_sync(0xffff0000u, (int)threadIdx.x, 16);
}
static void run_partial(void) {
  int x[32];
  DA_LAUNCH(partial_kernel, 1, 32, 0, 0, x);
}

static void test_aborts(void) {
#ifdef DA_SIMT_THREADS
  return; /* threads report a deadlock only after 120 s; the fiber build tests the aborts */
#endif
  int st = 0;
  std::string e = in_child(run_deadlock, &st);
  CHECK(WIFSIGNALED(st) && WTERMSIG(st) == SIGABRT && e.find("deadlock") != std::string::npos,
        "deadlock not reported (status %d): %s", st, e.c_str());
  e = in_child(run_partial, &st);
  CHECK(WIFSIGNALED(st) && WTERMSIG(st) == SIGABRT && e.find("partial-warp shuffle") != std::string::npos,
        "partial-warp shuffle not refused (status %d): %s", st, e.c_str());
}

int main(int argc, char **argv) {
  const char *mode = argc > 1 ? argv[1] : "all";
  if (strcmp(mode, "all")) {
    fprintf(stderr, "unknown mode %s (all)\n", mode);
    return 2;
  }
  test_ids();
  test_shuffles();
  test_exit_atomic();
  test_dyn_smem();
  test_cp_async();
  test_launch_errors();
  test_aborts();
  return test_finish(mode);
}
