/* test_ipc.c: the device seam (comm/devapi.h, host table) and the cuda-ipc protocol (comm/ipc.c)
 * over it, as the `host-ipc` transport, under MPI (label mpi; no GPU needed).
 *   - devapi_local: the host table's own semantics: a stream runs in order, an event completes
 *     when its stream reaches it, a stream waits for another's event, a copy over a mapping
 *     opened by handle shows poison until it lands.
 *   - ring_*: a ring of S > 2 steps over two registered slots per rank (slot reuse), blocks of
 *     uneven sizes. Step s, on the caller's stream: stamp s into bytes [8s, 8s + 8) of the
 *     current slot (a kernel that changes the block before it travels, as the backward's dK/dV
 *     sums do), start the exchange, then "compute" on the slot: a stall, then a copy to the
 *     step's check buffer. Every check buffer must hold the stamps 0..s (each written by a
 *     different holder of the block) and, after them, the block of the origin rank (bytes drawn
 *     from a fresh seed and the origin, never by the code under test). A send that reads its
 *     slot before the stamp landed loses a stamp; an early overwrite brings a later one (visible
 *     even at P = 2, where the block landing in a slot is the one it held two steps before).
 *     Run with a slow link and with a slow compute: both orders must hold.
 *   - planted_*: the same ring with one event wait left out (DISTATTN_TEST_IPC_SKIP): the
 *     test requires that the wrong bytes are seen.
 *   - errors: an unregistered receive buffer, ranks disagreeing on a size, an unknown name. */
#define _GNU_SOURCE
#include <mpi.h>
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include "core.h"
#include "devapi.h"
#include "transport.h"
#include "test_mpi.h"

static int g_rank, g_size;
static uint64_t g_seed;
static const da_devapi_t *D = &da_devapi_host;

/* The byte i of the block that rank `origin` owns: a hash of the run's seed, origin and i. */
static unsigned char pattern(int origin, size_t i) {
  uint64_t x = g_seed ^ ((uint64_t)origin * 0x9E3779B97F4A7C15ull) ^ (i * 0xBF58476D1CE4E5B9ull);
  x ^= x >> 31;
  x *= 0x94D049BB133111EBull;
  x ^= x >> 29;
  return (unsigned char)x;
}

/* Uneven block sizes: no two neighbours send the same number of bytes. */
static size_t block_bytes(int origin) { return 3000 + 517 * (size_t)origin; }

static int mod(int a, int p) { return ((a % p) + p) % p; }

START_TEST(devapi_local) {
  da_dstream_t s1, s2;
  da_devent_t e;
  ck_assert_int_eq(D->stream_create(&s1), DA_SUCCESS);
  ck_assert_int_eq(D->stream_create(&s2), DA_SUCCESS);
  ck_assert_int_eq(D->event_create(&e, 1), DA_SUCCESS);
  int done = 0;
  ck_assert_int_eq(D->event_query(e, &done), DA_SUCCESS);
  ck_assert_int_eq(done, 1); /* never recorded: complete, as in CUDA */

  const size_t n = 4096;
  unsigned char *a, *b, host[4096];
  ck_assert_int_eq(D->alloc((void **)&a, n), DA_SUCCESS);
  ck_assert_int_eq(D->alloc((void **)&b, n), DA_SUCCESS);
  for (size_t i = 0; i < n; i++) host[i] = pattern(g_rank, i);
  ck_assert_int_eq(D->copy_from_host(a, host, n, s1), DA_SUCCESS);

  /* s1: stall 50 ms, then record e. s2 waits on e, then copies a -> b. Until the stall ends, b
   * must stay as memset left it and e must be incomplete. */
  ck_assert_int_eq(D->memset_async(b, 7, n, s2), DA_SUCCESS);
  ck_assert_int_eq(D->stream_sync(s2), DA_SUCCESS);
  ck_assert_int_eq(da_devapi_host_stall(s1, 0.05), DA_SUCCESS);
  ck_assert_int_eq(D->event_record(e, s1), DA_SUCCESS);
  ck_assert_int_eq(D->stream_wait_event(s2, e), DA_SUCCESS);
  ck_assert_int_eq(D->copy_async(b, a, n, s2), DA_SUCCESS);
  ck_assert_int_eq(D->event_query(e, &done), DA_SUCCESS);
  ck_assert_int_eq(done, 0);
  ck_assert_int_eq(b[0], 7);
  ck_assert_int_eq(b[n - 1], 7);
  ck_assert_int_eq(D->stream_sync(s2), DA_SUCCESS); /* drives s1 too: the stall ends, e completes */
  ck_assert_int_eq(D->event_query(e, &done), DA_SUCCESS);
  ck_assert_int_eq(done, 1);
  unsigned char back[4096];
  ck_assert_int_eq(D->copy_to_host(back, b, n, s2), DA_SUCCESS);
  ck_assert_int_eq(memcmp(back, host, n), 0);

  /* A copy through a mapping opened by handle is a link transfer: poison, then the bytes. */
  da_dev_mem_handle_t h;
  void *bmap = NULL;
  ck_assert_int_eq(D->mem_handle(b, n, &h), DA_SUCCESS);
  ck_assert_int_eq(D->mem_open(&h, &bmap), DA_SUCCESS);
  ck_assert_ptr_ne(bmap, b);
  ck_assert_int_eq(D->memset_async(a, 0x11, n, s1), DA_SUCCESS);
  da_devapi_host_set_link_delay(0.05);
  ck_assert_int_eq(D->copy_async(bmap, a, n, s1), DA_SUCCESS);
  ck_assert_int_eq(b[0], 0xFF); /* seen through the owner's own mapping: in flight */
  ck_assert_int_eq(b[n / 2], 0xFF);
  ck_assert_int_eq(D->stream_sync(s1), DA_SUCCESS);
  ck_assert_int_eq(b[0], 0x11);
  ck_assert_int_eq(b[n - 1], 0x11);
  da_devapi_host_set_link_delay(0);
  /* mem_handle refuses what alloc did not return; a handle whose segment is gone fails in words. */
  ck_assert_int_eq(D->mem_handle(a + 16, 16, &h), DA_ERR_INVALID_ARGUMENT);
  da_dev_mem_handle_t gone = h;
  snprintf((char *)gone.opaque, sizeof gone.opaque, "/distattn-dev-no-such-segment");
  void *nothing = NULL;
  ck_assert_int_eq(D->mem_open(&gone, &nothing), DA_ERR_SYSTEM);
  ck_assert_ptr_null(nothing);
  ck_assert_ptr_nonnull(strstr(da_error_message(), "shm_open"));
  ck_assert_ptr_eq(da_devapi_find("host"), &da_devapi_host);
  ck_assert_ptr_null(da_devapi_find("opencl"));
  ck_assert_ptr_nonnull(strstr(da_error_message(), "host"));
  D->mem_close(bmap);
  D->free(a);
  D->free(b);
  D->event_destroy(e);
  D->stream_destroy(s1);
  D->stream_destroy(s2);
}
END_TEST

/* Delays by rank parity: symmetric delays would hide a missing wait behind the rank's own send
 * (a rank's exchange completes when its own copy has landed, and its peer's copy, started at the
 * same moment with the same delay, lands with it). Skewed ones expose it deterministically: an
 * even rank with a fast link of its own receiving from an odd rank with a slow one reads its
 * slot long before the bytes land; an odd rank with a fast compute writes into the slot of an
 * even rank whose slow compute has not read it yet. */
typedef struct {
  double link_s[2], compute_s[2]; /* [rank % 2] */
  const char *skip;               /* NULL, "ready", "consumed" */
} ringcfg_t;

/* The ring of the header comment; returns the number of steps whose check buffer differs from
 * the expected block on this rank (-1 on a setup failure, with the message printed). */
static int run_ring(const ringcfg_t *c, int steps) {
  if (c->skip) setenv("DISTATTN_TEST_IPC_SKIP", c->skip, 1);
  MPI_Comm comm;
  MPI_Comm_dup(MPI_COMM_WORLD, &comm);
  da_xport_t xp;
  da_status_t st = da_xport_open(&xp, "host-ipc", comm, 30.0);
  unsetenv("DISTATTN_TEST_IPC_SKIP");
  if (st != DA_SUCCESS) {
    fprintf(stderr, "rank %d: host-ipc open: %s\n", g_rank, da_error_message());
    MPI_Comm_free(&comm);
    return -1;
  }
  ck_assert_ptr_eq(xp.t->devapi, &da_devapi_host);
  const int P = xp.nranks, next = mod(g_rank + 1, P), prev = mod(g_rank - 1, P);
  size_t cap = 0;
  for (int o = 0; o < P; o++) cap = block_bytes(o) > cap ? block_bytes(o) : cap;
  void *slot[2], **check = calloc((size_t)steps, sizeof *check);
  da_dstream_t cs;
  ck_assert_int_eq(D->stream_create(&cs), DA_SUCCESS);
  xp.stream = cs;
  for (int i = 0; i < 2; i++) {
    ck_assert_int_eq(D->alloc(&slot[i], cap), DA_SUCCESS);
    ck_assert_int_eq(xp.t->register_mem(&xp, slot[i], cap), DA_SUCCESS);
  }
  for (int s = 0; s < steps; s++) ck_assert_int_eq(D->alloc(&check[s], cap), DA_SUCCESS);
  uint64_t *stamps_host = malloc((size_t)steps * sizeof *stamps_host);
  void *stamps;
  for (int s = 0; s < steps; s++) stamps_host[s] = (uint64_t)s;
  ck_assert_int_eq(D->alloc(&stamps, (size_t)steps * 8), DA_SUCCESS);
  ck_assert_int_eq(D->copy_from_host(stamps, stamps_host, (size_t)steps * 8, cs), DA_SUCCESS);
  unsigned char *host = malloc(cap);
  for (size_t i = 0; i < block_bytes(g_rank); i++) host[i] = pattern(g_rank, i);
  ck_assert_int_eq(D->copy_from_host(slot[0], host, block_bytes(g_rank), cs), DA_SUCCESS);

  da_devapi_host_set_link_delay(c->link_s[g_rank % 2]);
  int failed = 0;
  for (int s = 0; s < steps && !failed; s++) {
    const int have = mod(g_rank - s, P), get = mod(g_rank - s - 1, P);
    void *cur = slot[s % 2], *nxt = slot[(s + 1) % 2];
    da_xreq_t *req = NULL;
    st = D->copy_async((char *)cur + 8 * s, (char *)stamps + 8 * s, 8, cs);
    if (st == DA_SUCCESS)
      st = xp.t->exchange_start(&xp, cur, block_bytes(have), next, nxt, block_bytes(get), prev, DA_TAG_FWD_KV, s, &req);
    /* The "compute" of step s reads cur on the caller's stream, after a kernel-long stall. */
    if (st == DA_SUCCESS) st = da_devapi_host_stall(cs, c->compute_s[g_rank % 2]);
    if (st == DA_SUCCESS) st = D->copy_async(check[s], cur, block_bytes(have), cs);
    if (st == DA_SUCCESS) st = xp.t->wait(&xp, req);
    else if (req) xp.t->abort(&xp, req);
    if (st != DA_SUCCESS) {
      fprintf(stderr, "rank %d step %d: %s\n", g_rank, s, da_error_message());
      failed = 1;
    }
  }
  ck_assert_int_eq(failed, 0);
  ck_assert_int_eq(D->stream_sync(cs), DA_SUCCESS);
  da_devapi_host_set_link_delay(0);
  int wrong = 0;
  for (int s = 0; s < steps; s++) {
    const int have = mod(g_rank - s, P);
    ck_assert_int_eq(D->copy_to_host(host, check[s], block_bytes(have), cs), DA_SUCCESS);
    const size_t nstamp = 8 * (size_t)(s + 1);
    size_t bad = memcmp(host, stamps_host, nstamp) != 0;
    for (size_t i = nstamp; i < block_bytes(have); i++) bad += host[i] != pattern(have, i);
    wrong += bad > 0;
  }
  /* Every rank is done with every slot before any is unmapped. */
  ck_assert_int_eq(da_xport_barrier(&xp), DA_SUCCESS);
  da_xport_close(&xp);
  for (int i = 0; i < 2; i++) D->free(slot[i]);
  for (int s = 0; s < steps; s++) D->free(check[s]);
  free(check);
  D->free(stamps);
  free(stamps_host);
  free(host);
  D->stream_destroy(cs);
  MPI_Comm_free(&comm);
  return wrong;
}

static int sum_over_ranks(int x) {
  int t = 0;
  MPI_Allreduce(&x, &t, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  return t;
}

/* 2P + 1 steps: every slot is written again at least P times. */
static int nsteps(void) { return 2 * g_size + 1; }

START_TEST(ring_fast) {
  ringcfg_t c = {{0, 0}, {0, 0}, NULL};
  ck_assert_int_eq(run_ring(&c, nsteps()), 0);
}
END_TEST

START_TEST(ring_slow_link) {
  ringcfg_t c = {{0.02, 0.02}, {0.001, 0.001}, NULL}, skew = {{0.001, 0.05}, {0.001, 0.001}, NULL};
  ck_assert_int_eq(run_ring(&c, nsteps()), 0);
  ck_assert_int_eq(run_ring(&skew, nsteps()), 0); /* the planted_ready setting, waits intact */
}
END_TEST

START_TEST(ring_slow_compute) {
  ringcfg_t c = {{0.001, 0.001}, {0.02, 0.02}, NULL}, skew = {{0.001, 0.001}, {0.05, 0.001}, NULL};
  ck_assert_int_eq(run_ring(&c, nsteps()), 0);
  ck_assert_int_eq(run_ring(&skew, nsteps()), 0); /* the planted_consumed setting, waits intact */
}
END_TEST

/* The receiver trusts the READY word and reads its slot while the copy is in flight: poison. */
START_TEST(planted_ready) {
  ringcfg_t c = {{0.001, 0.05}, {0.001, 0.001}, "ready"};
  int wrong = run_ring(&c, nsteps());
  ck_assert_int_ge(wrong, 0);
  int total = sum_over_ranks(wrong);
  if (g_rank == 0) printf("planted missing wait on the data-ready event: %d wrong steps over all ranks\n", total);
  ck_assert_int_gt(total, 0);
}
END_TEST

/* The sender writes into a slot the receiver's compute has not read yet. */
START_TEST(planted_consumed) {
  ringcfg_t c = {{0.001, 0.001}, {0.05, 0.001}, "consumed"};
  int wrong = run_ring(&c, nsteps());
  ck_assert_int_ge(wrong, 0);
  int total = sum_over_ranks(wrong);
  if (g_rank == 0) printf("planted missing wait on the consumed event: %d wrong steps over all ranks\n", total);
  ck_assert_int_gt(total, 0);
}
END_TEST

START_TEST(errors) {
  ck_assert_ptr_null(da_transport_find("bogus"));
  ck_assert_ptr_nonnull(strstr(da_error_message(), "host-ipc"));
  ck_assert_ptr_nonnull(strstr(da_error_message(), "mpi"));
  MPI_Comm comm;
  MPI_Comm_dup(MPI_COMM_WORLD, &comm);
  da_xport_t xp;
  ck_assert_int_eq(da_xport_open(&xp, "host-ipc", comm, 10.0), DA_SUCCESS);
  da_dstream_t cs;
  ck_assert_int_eq(D->stream_create(&cs), DA_SUCCESS);
  const int P = xp.nranks, next = mod(g_rank + 1, P), prev = mod(g_rank - 1, P);
  void *slot, *other;
  ck_assert_int_eq(D->alloc(&slot, 4096), DA_SUCCESS);
  ck_assert_int_eq(D->alloc(&other, 4096), DA_SUCCESS);
  da_xreq_t *req = NULL;
  /* No stream set. */
  ck_assert_int_eq(xp.t->exchange_start(&xp, other, 64, next, slot, 64, prev, DA_TAG_FWD_KV, 0, &req),
                   DA_ERR_INVALID_ARGUMENT);
  ck_assert_ptr_nonnull(strstr(da_error_message(), "stream"));
  xp.stream = cs;
  /* Not registered. */
  ck_assert_int_eq(xp.t->exchange_start(&xp, other, 64, next, slot, 64, prev, DA_TAG_FWD_KV, 0, &req),
                   DA_ERR_INVALID_ARGUMENT);
  ck_assert_ptr_nonnull(strstr(da_error_message(), "registered"));
  ck_assert_int_eq(xp.t->register_mem(&xp, slot, 4096), DA_SUCCESS);
  /* Beyond the region. */
  ck_assert_int_eq(xp.t->exchange_start(&xp, other, 64, next, (char *)slot + 4090, 64, prev, DA_TAG_FWD_KV, 0, &req),
                   DA_ERR_INVALID_ARGUMENT);
  /* Sizes that disagree (P > 1): the sender says MISMATCH, the receiver hears of it from the
   * sender (REMOTE), not from its own deadline (that would be DA_ERR_TIMEOUT). */
  if (P > 1) {
    ck_assert_int_eq(xp.t->exchange_start(&xp, other, 100 + (size_t)g_rank, next, slot, 200, prev, DA_TAG_FWD_KV, 3,
                                          &req), DA_SUCCESS);
    da_status_t st = xp.t->wait(&xp, req);
    ck_assert_msg(st == DA_ERR_MISMATCH || st == DA_ERR_REMOTE, "status %d: %s", st, da_error_message());
    /* Every rank's send mismatched: each one says so. */
    if (st == DA_ERR_MISMATCH) ck_assert_ptr_nonnull(strstr(da_error_message(), "do all ranks run the same plan"));
  }
  ck_assert_int_eq(da_xport_barrier(&xp), DA_SUCCESS);
  da_xport_close(&xp);
  D->free(slot);
  D->free(other);
  D->stream_destroy(cs);
  MPI_Comm_free(&comm);
}
END_TEST

int main(int argc, char **argv) {
  MPI_Init(&argc, &argv);
  MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &g_size);
  /* A fresh seed every run, the same on every rank. */
  unsigned long long seed = (unsigned long long)time(NULL) ^ ((unsigned long long)getpid() << 20);
  MPI_Bcast(&seed, 1, MPI_UNSIGNED_LONG_LONG, 0, MPI_COMM_WORLD);
  g_seed = seed;
  if (g_rank == 0) printf("test_ipc: %d ranks, seed %llu\n", g_size, seed);
  Suite *s = suite_create("ipc");
  TCase *tc = tcase_create("host-ipc");
  tcase_set_timeout(tc, 0);
  const char *only = getenv("DISTATTN_TEST_ONLY");
  struct { const char *name; const TTest *t; } tests[] = {
      {"devapi_local", devapi_local}, {"ring_fast", ring_fast},         {"ring_slow_link", ring_slow_link},
      {"ring_slow_compute", ring_slow_compute}, {"planted_ready", planted_ready},
      {"planted_consumed", planted_consumed},   {"errors", errors}};
  for (size_t i = 0; i < sizeof tests / sizeof tests[0]; i++) {
    /* One rank exchanges with itself: its copies never cross a link, nothing is in flight to
     * catch (the protocol itself still runs in the ring tests). */
    if (g_size == 1 && !strncmp(tests[i].name, "planted", 7)) continue;
    if (!only || !strcmp(only, tests[i].name)) tcase_add_test(tc, tests[i].t);
  }
  suite_add_tcase(s, tc);
  return tu_mpi_finish(s, g_rank, NULL, NULL);
}
