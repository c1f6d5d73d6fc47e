/* simt.cpp: the SIMT runner behind simt.h. A launch runs its blocks one after another; inside a
 * block every CUDA thread is a fiber (scheduled round-robin on the calling thread; switched by a
 * small register swap on x86-64, by ucontext elsewhere) or,
 * with DA_SIMT_THREADS, a std::thread (so ThreadSanitizer sees the kernel's shared-memory accesses
 * as the concurrent accesses they are). Barriers count the threads that have not exited, as the
 * device does. Also the subset of the CUDA runtime API the backend uses, on host memory. */
#include "simt.h"

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <vector>

#ifdef DA_SIMT_THREADS
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#else
#include <sys/mman.h>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif
#endif

namespace {

[[noreturn]] void die(const char *fmt, const char *a = "", long b = 0, long c = 0) {
  fprintf(stderr, "simt: ");
  fprintf(stderr, fmt, a, b, c);
  fprintf(stderr, "\n");
  fflush(stderr);
  abort();
}

/* ---- barriers ---- */
struct Barrier {
  int live = 0;    /* members that have not exited */
  int arrived = 0; /* members waiting in the current generation */
  uint64_t gen = 0;
#ifdef DA_SIMT_THREADS
  std::mutex mu;
  std::condition_variable cv;
#endif
};

struct CpAsync {
  void *dst;
  unsigned char data[16];
  long group; /* 0 while uncommitted */
};

struct Thread : da_simt_thread {
  std::vector<CpAsync> copies;
  long committed = 0;        /* groups committed so far */
  uint64_t exchanges = 0;    /* warp exchanges this lane has made (lockstep within the warp) */
#ifndef DA_SIMT_THREADS
  bool done = false;
#if defined(__x86_64__)
  void *sp = nullptr; /* saved stack pointer while switched out */
#else
  ucontext_t ctx;
#endif
  const struct Barrier *wait_on = nullptr; /* the barrier this fiber waits at, and its generation */
  uint64_t wait_gen = 0;
#endif
};

enum { SLOT = DA_SIMT_SLOT };

struct Block {
  int n = 0, nwarps = 0;
  std::vector<Thread> th;
  Barrier bar;
  std::unique_ptr<Barrier[]> warp_bar;
  std::vector<unsigned char> slots;  /* [nwarps][2 banks][32][SLOT] */
  std::vector<uint64_t> stamps;      /* [nwarps][2][32]: the exchange number of the slot's data */
  std::function<void()> *body = nullptr;
};

Block *g_block;                        /* the block running now (blocks are sequential) */
/* this host thread's (fiber's) CUDA thread: da_simt_current (simt.h) */
Thread *cur() { return static_cast<Thread *>(da_simt_current); }
void *g_dyn_smem;
cudaError_t g_last_error = cudaSuccess;
std::map<const void *, int> g_max_dyn_smem; /* cudaFuncAttributeMaxDynamicSharedMemorySize */

Thread *self() { return static_cast<Thread *>(da_simt_self()); }

#ifdef DA_SIMT_THREADS
/* A barrier that cannot complete (threads waiting at different barriers) is reported after this
 * long instead of hanging the test. */
const auto kDeadlock = std::chrono::seconds(120);

void barrier_wait(Barrier &b, const char *what) {
  std::unique_lock<std::mutex> lk(b.mu);
  uint64_t g = b.gen;
  if (++b.arrived == b.live) {
    b.arrived = 0;
    b.gen++;
    b.cv.notify_all();
    return;
  }
  if (!b.cv.wait_for(lk, kDeadlock, [&] { return b.gen != g; }))
    die("deadlock: %s waited 120 s (block %ld); threads wait at different barriers?", what,
        (long)cur()->block_idx.x);
}

void barrier_drop(Barrier &b) {
  std::lock_guard<std::mutex> lk(b.mu);
  b.live--;
  if (b.arrived > 0 && b.arrived == b.live) {
    b.arrived = 0;
    b.gen++;
    b.cv.notify_all();
  }
}
#else
uint64_t g_progress; /* bumped by every arrival, release and exit */

#if defined(__x86_64__)
/* Fiber switch without the signal-mask system call swapcontext makes at every switch (a third of
 * the SIMT tests' time went there): save the callee-saved registers, MXCSR and the x87 control
 * word on the current stack, store its pointer in *save, load `to`, restore, return there.
 * void da_fiber_switch(void **save, void *to) (System V AMD64). */
extern "C" void da_fiber_switch(void **save, void *to);
asm(R"(
  .text
  .p2align 4
  .type da_fiber_switch, @function
da_fiber_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size da_fiber_switch, .-da_fiber_switch
  .section .note.GNU-stack,"",@progbits
  .text
)");
void *g_sched_sp; /* the scheduler's stack pointer while a fiber runs */
void yield() { da_fiber_switch(&cur()->sp, g_sched_sp); }
#else
ucontext_t g_sched; /* the scheduler's context */
void yield() { swapcontext(&cur()->ctx, &g_sched); }
#endif

void barrier_wait(Barrier &b, const char *) {
  uint64_t g = b.gen;
  g_progress++;
  if (++b.arrived == b.live) {
    b.arrived = 0;
    b.gen++;
    return;
  }
  cur()->wait_on = &b;
  cur()->wait_gen = g;
  while (b.gen == g) yield();
  cur()->wait_on = nullptr;
}

void barrier_drop(Barrier &b) {
  g_progress++;
  b.live--;
  if (b.arrived > 0 && b.arrived == b.live) {
    b.arrived = 0;
    b.gen++;
  }
}
#endif

/* Every lane of the warp deposits `bytes` and waits for the others; returns the warp's slots
 * (lane i's bytes at + i * SLOT) and, in *took, the lanes that took part. The slots alternate
 * between two banks by exchange number, so one barrier suffices: a lane can write a bank again
 * only two exchanges later, after every lane has arrived at the exchange in between, that is,
 * after every lane has finished reading this one. */
const unsigned char *publish(const void *mine, size_t bytes, unsigned *took) {
  Thread *t = self();
  Block *b = g_block;
  if (bytes > SLOT) die("warp exchange of %ld bytes (at most 64)", "", (long)bytes);
  uint64_t n = ++t->exchanges;
  size_t bank = (size_t)t->warp * 2 + (n & 1);
  unsigned char *ws = &b->slots[bank * 32 * SLOT];
  uint64_t *st = &b->stamps[bank * 32];
  std::memcpy(ws + t->lane * SLOT, mine, bytes);
  st[t->lane] = n;
  barrier_wait(b->warp_bar[t->warp], "a warp exchange (shuffle, ldmatrix, mma)");
  unsigned mask = 0;
  for (int i = 0; i < 32; i++)
    if (st[i] == n) mask |= 1u << i;
  *took = mask;
  return ws;
}

template <typename T> T shfl(unsigned mask, T v, int src_of_lane(int, int, int), int arg, int width) {
  unsigned took;
  const unsigned char *ws = publish(&v, sizeof v, &took);
  if ((mask & took) != took)
    die("partial-warp shuffle (mask 0x%lx, lanes taking part 0x%lx) is not emulated", "", (long)mask,
        (long)took);
  if (width < 1 || width > 32 || (width & (width - 1)))
    die("shuffle width %ld is not a power of 2 in [1, 32]", "", width);
  int lane = cur()->lane;
  int src = src_of_lane(lane, arg, width);
  if (!(took >> src & 1)) die("shuffle reads lane %ld, which has exited or does not exist", "", src);
  T r;
  std::memcpy(&r, ws + src * SLOT, sizeof r);
  return r;
}

int src_idx(int lane, int src, int width) { return (lane & ~(width - 1)) + (src & (width - 1)); }
int src_xor(int lane, int m, int width) {
  int s = lane ^ m;
  return s >= ((lane & ~(width - 1)) + width) ? lane : s;  /* no reads from a later segment */
}
int src_down(int lane, int d, int width) {
  int s = lane + d;
  return s >= ((lane & ~(width - 1)) + width) ? lane : s;
}

void thread_exit(Thread *t) {
  barrier_drop(g_block->bar);
  barrier_drop(g_block->warp_bar[t->warp]);
  t->copies.clear(); /* copies never waited for: nobody can read them any more */
}

#ifdef DA_SIMT_THREADS
void run_block(Block &b) {
  std::vector<std::thread> pool;
  pool.reserve(b.n);
  for (int i = 0; i < b.n; i++)
    pool.emplace_back([&b, i] {
      da_simt_current = &b.th[i];
      (*b.body)();
      thread_exit(cur());
      da_simt_current = nullptr;
    });
  for (auto &p : pool) p.join();
}
#else
/* Fiber stacks, kept across launches (mmap'd with a guard page below each). */
struct Stack {
  void *base;
  size_t size;
};
std::vector<Stack> g_stacks;

size_t stack_bytes() {
  const char *e = getenv("DA_SIMT_STACK_KB");
  long kb = e ? atol(e) : 256;
  return (size_t)(kb < 64 ? 64 : kb) * 1024;
}

void *stack_for(int i) {
  while ((int)g_stacks.size() <= i) {
    size_t sz = stack_bytes(), guard = 4096;
    void *p = mmap(nullptr, sz + guard, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) die("mmap of a fiber stack failed%s", "");
    mprotect(p, guard, PROT_NONE);
    g_stacks.push_back({(char *)p + guard, sz});
  }
  return g_stacks[i].base;
}

void fiber_main() {
  (*g_block->body)();
  thread_exit(cur());
  cur()->done = true;
#if defined(__x86_64__)
  yield(); /* never resumed: the scheduler skips finished fibers */
  abort();
#endif
} /* ucontext: returns to g_sched through uc_link */

/* Prepares fiber i to start in fiber_main on its own stack. */
void fiber_init(Thread &t, int i) {
  void *base = stack_for(i);
#if defined(__x86_64__)
  /* the frame da_fiber_switch pops: MXCSR + x87 CW, r15..r12, rbx, rbp, then the return address
   * fiber_main; above it a null return address for fiber_main itself (entry rsp = 8 mod 16) */
  uintptr_t top = ((uintptr_t)base + g_stacks[i].size) & ~(uintptr_t)15;
  uint64_t *f = (uint64_t *)top - 9;
  uint32_t ctl[2] = {0x1f80u, 0x037fu}; /* default MXCSR, x87 control word */
  std::memcpy(&f[0], ctl, 8);
  for (int r = 1; r <= 6; r++) f[r] = 0;
  f[7] = (uint64_t)(uintptr_t)&fiber_main;
  f[8] = 0;
  t.sp = f;
#else
  getcontext(&t.ctx);
  t.ctx.uc_stack.ss_sp = base;
  t.ctx.uc_stack.ss_size = g_stacks[i].size;
  t.ctx.uc_link = &g_sched;
  makecontext(&t.ctx, fiber_main, 0);
#endif
}

void run_block(Block &b) {
  for (int i = 0; i < b.n; i++) fiber_init(b.th[i], i);
  for (;;) {
    uint64_t p0 = g_progress;
    int alive = 0;
    for (int i = 0; i < b.n; i++) {
      Thread &t = b.th[i];
      if (t.done) continue;
      if (t.wait_on && t.wait_on->gen == t.wait_gen) { /* still blocked: no need to switch in */
        alive++;
        continue;
      }
      da_simt_current = &t;
#if defined(__x86_64__)
      da_fiber_switch(&g_sched_sp, t.sp);
#else
      swapcontext(&g_sched, &t.ctx);
#endif
      da_simt_current = nullptr;
      alive += !t.done;
    }
    if (!alive) break;
    if (g_progress == p0)
      die("deadlock in block %ld: every live thread waits, at barriers that cannot complete "
          "(__syncthreads in divergent code, or a warp-collective op some lanes skip)", "",
          (long)b.th[0].block_idx.x);
  }
}
#endif

bool bad_config(dim3 grid, dim3 block) {
  long nt = (long)block.x * block.y * block.z;
  return !grid.x || !grid.y || !grid.z || grid.y > 65535 || grid.z > 65535 || grid.x > 0x7fffffffu ||
         !block.x || !block.y || !block.z || block.x > 1024 || block.y > 1024 || block.z > 64 ||
         nt > 1024;
}

}  // namespace

/* ======================= simt.h ======================= */
thread_local da_simt_thread *da_simt_current;

void da_simt_outside(void) {
  die("a CUDA built-in was called outside a kernel launch%s", "");
}

void __syncthreads(void) {
  self();
  barrier_wait(g_block->bar, "__syncthreads");
}

void __syncwarp(unsigned mask) {
  (void)mask; /* the whole warp synchronizes; partial masks are not emulated */
  barrier_wait(g_block->warp_bar[self()->warp], "__syncwarp");
}

const unsigned char *da_simt_warp_publish(const void *mine, size_t bytes, unsigned *took) {
  return publish(mine, bytes, took);
}

void da_simt_warp_exchange(const void *mine, void *all, size_t bytes) {
  unsigned took;
  const unsigned char *ws = publish(mine, bytes, &took);
  for (int i = 0; i < 32; i++) {
    if (took >> i & 1)
      std::memcpy((unsigned char *)all + i * bytes, ws + i * SLOT, bytes);
    else
      std::memset((unsigned char *)all + i * bytes, 0, bytes);
  }
}

#define DA_SHFL(T)                                                                            \
  T __shfl_sync(unsigned m, T v, int s, int w) { return shfl<T>(m, v, src_idx, s, w); }        \
  T __shfl_xor_sync(unsigned m, T v, int x, int w) { return shfl<T>(m, v, src_xor, x, w); }    \
  T __shfl_down_sync(unsigned m, T v, unsigned d, int w) { return shfl<T>(m, v, src_down, (int)d, w); }
DA_SHFL(float)
DA_SHFL(int)
DA_SHFL(unsigned)
#undef DA_SHFL

float atomicAdd(float *address, float val) {
  return std::atomic_ref<float>(*address).fetch_add(val);
}

void *da_simt_dyn_smem(void) {
  self();
  return g_dyn_smem;
}

void da_simt_cp_async(void *dst, const void *src, bool pred) {
  Thread *t = self();
  if ((uintptr_t)dst % 16 || (uintptr_t)src % 16)
    die("cp.async: %s address not 16-byte aligned (thread %ld)", (uintptr_t)dst % 16 ? "smem" : "gmem",
        t->linear);
  CpAsync c;
  c.dst = dst;
  c.group = 0;
  if (pred)
    std::memcpy(c.data, src, 16);
  else
    std::memset(c.data, 0, 16);
  t->copies.push_back(c);
}

void da_simt_cp_async_commit(void) {
  Thread *t = self();
  t->committed++;
  for (auto &c : t->copies)
    if (!c.group) c.group = t->committed;
}

void da_simt_cp_async_wait(int n) {
  Thread *t = self();
  long upto = t->committed - n; /* groups 1..upto must be complete */
  std::vector<CpAsync> keep;
  for (auto &c : t->copies) {
    if (c.group && c.group <= upto)
      std::memcpy(c.dst, c.data, 16);
    else
      keep.push_back(c);
  }
  t->copies.swap(keep);
}

cudaError_t da_simt_launch(const void *func, dim3 grid, dim3 block, size_t smem_bytes,
                           std::function<void()> body) {
  if (da_simt_current) die("a kernel launched another kernel (dynamic parallelism is not emulated)%s", "");
  if (bad_config(grid, block)) return g_last_error = cudaErrorInvalidConfiguration;
  auto it = g_max_dyn_smem.find(func);
  size_t limit = it == g_max_dyn_smem.end() ? (size_t)DA_SIMT_SMEM_DEFAULT : (size_t)it->second;
  if (smem_bytes > limit) return g_last_error = cudaErrorInvalidValue;

  int n = (int)(block.x * block.y * block.z);
  size_t dyn_alloc = (smem_bytes + 127) / 128 * 128;
  void *dyn = dyn_alloc ? std::aligned_alloc(128, dyn_alloc) : nullptr;
  Block b;
  b.n = n;
  b.nwarps = (n + 31) / 32;
  b.th.resize(n);
  b.warp_bar.reset(new Barrier[b.nwarps]);
  b.slots.assign((size_t)b.nwarps * 2 * 32 * SLOT, 0);
  b.stamps.assign((size_t)b.nwarps * 2 * 32, 0);
  b.body = &body;
  g_block = &b;
  g_dyn_smem = dyn;
  for (unsigned bz = 0; bz < grid.z; bz++)
    for (unsigned by = 0; by < grid.y; by++)
      for (unsigned bx = 0; bx < grid.x; bx++) {
        if (dyn) std::memset(dyn, 0xff, dyn_alloc);
        b.bar.live = n;
        b.bar.arrived = 0;
        for (int w = 0; w < b.nwarps; w++) {
          b.warp_bar[w].live = (w + 1) * 32 <= n ? 32 : n - w * 32;
          b.warp_bar[w].arrived = 0;
        }
        std::fill(b.stamps.begin(), b.stamps.end(), 0);
        for (int i = 0; i < n; i++) {
          Thread &t = b.th[i];
          t.thread_idx = uint3{i % block.x, i / block.x % block.y, i / (block.x * block.y)};
          t.block_idx = uint3{bx, by, bz};
          t.block_dim = block;
          t.grid_dim = grid;
          t.linear = i;
          t.lane = i % 32;
          t.warp = i / 32;
          t.copies.clear();
          t.committed = 0;
          t.exchanges = 0;
#ifndef DA_SIMT_THREADS
          t.done = false;
          t.wait_on = nullptr;
#endif
        }
        run_block(b);
      }
  g_block = nullptr;
  g_dyn_smem = nullptr;
  std::free(dyn);
  return cudaSuccess;
}

/* ======================= the CUDA runtime subset, on host memory ======================= */
extern "C" {

cudaError_t cudaGetLastError(void) {
  cudaError_t e = g_last_error;
  g_last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError(void) { return g_last_error; }

const char *cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorInsufficientDriver: return "cudaErrorInsufficientDriver";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    case cudaErrorNotSupported: return "cudaErrorNotSupported";
    default: return "cudaErrorUnknown (simt)";
  }
}

const char *cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorInsufficientDriver: return "CUDA driver version is insufficient for CUDA runtime version";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorNotSupported: return "operation not supported";
    default: return "unknown error (simt runner)";
  }
}

static cudaError_t fail(cudaError_t e) { return g_last_error = e; }

cudaError_t cudaGetDeviceCount(int *count) {
  if (!count) return fail(cudaErrorInvalidValue);
  *count = 1;
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int *device) {
  if (!device) return fail(cudaErrorInvalidValue);
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int *value, enum cudaDeviceAttr attr, int device) {
  if (!value || device != 0) return fail(device != 0 ? cudaErrorInvalidDevice : cudaErrorInvalidValue);
  switch (attr) {
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = DA_SIMT_SMEM_OPTIN; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = DA_SIMT_SM_COUNT; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = 8; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; return cudaSuccess;
    default: return fail(cudaErrorInvalidValue); /* not emulated: say so, never guess */
  }
}

cudaError_t cudaFuncSetAttribute(const void *func, enum cudaFuncAttribute attr, int value) {
  if (!func) return fail(cudaErrorInvalidDeviceFunction);
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return fail(cudaErrorInvalidValue);
  if (value < 0 || value > DA_SIMT_SMEM_OPTIN) return fail(cudaErrorInvalidValue);
  g_max_dyn_smem[func] = value;
  return cudaSuccess;
}

cudaError_t cudaMalloc(void **p, size_t size) {
  if (!p) return fail(cudaErrorInvalidValue);
  *p = size ? std::aligned_alloc(256, (size + 255) / 256 * 256) : nullptr;
  return size && !*p ? fail(cudaErrorMemoryAllocation) : cudaSuccess;
}

cudaError_t cudaMallocManaged(void **p, size_t size, unsigned int flags) {
  (void)flags;
  return cudaMalloc(p, size);
}

cudaError_t cudaMallocAsync(void **p, size_t size, cudaStream_t s) {
  (void)s;
  return cudaMalloc(p, size);
}

cudaError_t cudaFree(void *p) {
  std::free(p);
  return cudaSuccess;
}

cudaError_t cudaFreeAsync(void *p, cudaStream_t s) {
  (void)s;
  return cudaFree(p);
}

cudaError_t cudaMemcpy(void *dst, const void *src, size_t count, enum cudaMemcpyKind kind) {
  if ((unsigned)kind > (unsigned)cudaMemcpyDefault) return fail(cudaErrorInvalidMemcpyDirection);
  if (count && (!dst || !src)) return fail(cudaErrorInvalidValue);
  if (count) std::memmove(dst, src, count);
  return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t count, enum cudaMemcpyKind kind,
                            cudaStream_t s) {
  (void)s;
  return cudaMemcpy(dst, src, count, kind);
}

cudaError_t cudaMemset(void *p, int value, size_t count) {
  if (count && !p) return fail(cudaErrorInvalidValue);
  if (count) std::memset(p, value, count);
  return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void *p, int value, size_t count, cudaStream_t s) {
  (void)s;
  return cudaMemset(p, value, count);
}

cudaError_t cudaStreamSynchronize(cudaStream_t s) {
  (void)s; /* launches are synchronous */
  return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize(void) { return cudaSuccess; }

} /* extern "C" */
