/* test_devapi_sweep.c: the host device table (comm/devapi_host.c) removes the shared-memory
 * segments of processes that ended without freeing them, and only theirs (label unit; no MPI
 * run, no GPU).
 *   - A child that allocates two segments and is killed (SIGKILL: nothing of it runs after):
 *     its segments are still in /dev/shm until the next process makes its first segment; then
 *     they and its lock file are gone.
 *   - A child that allocates and stays alive (blocked on a pipe) through that sweep: its segment
 *     and lock file stay. Once it exits without freeing (a normal exit that leaves segments), the
 *     next new process's sweep removes them.
 *   - The sweeping process's own segment is there and usable.
 * Every segment name comes from the table itself (mem_handle), and every check reads /dev/shm. */
#define _GNU_SOURCE
#include <check.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
#include "core.h"
#include "devapi.h"

static const da_devapi_t *D = &da_devapi_host;

/* Whether /dev/shm holds the segment of handle name `name` ("/distattn-..."). */
static int in_shm(const char *name) {
  char path[160];
  snprintf(path, sizeof path, "/dev/shm%s", name);
  return access(path, F_OK) == 0;
}

/* The lock file of the process whose segment is `name`: "/distattn-<kind>-<pid>-<nonce>-<n>" ->
 * "/distattn-lock-<pid>-<nonce>". */
static void lock_of(const char *name, char *out, size_t n) {
  const char *tag = strchr(name + 10, '-') + 1; /* after "/distattn-<kind>-" */
  const char *end = strrchr(name, '-');
  snprintf(out, n, "/distattn-lock-%.*s", (int)(end - tag), tag);
}

/* Allocate a segment here and write its name to fd. */
static void alloc_and_tell(int fd, void **p) {
  da_dev_mem_handle_t h;
  if (D->alloc(p, 4096) != DA_SUCCESS || D->mem_handle(*p, 4096, &h) != DA_SUCCESS) _exit(3);
  if (write(fd, h.opaque, sizeof h.opaque) != (ssize_t)sizeof h.opaque) _exit(4);
}

/* A child that allocates `nseg` segments, reports their names on out, then either kills itself
 * (hold < 0) or waits for a byte on hold and exits without freeing; it closes its copy of the
 * write end hold_w (so that the parent's end closing, if the parent fails, ends the wait) and
 * gives up after 30 s in any case. Returns its pid. */
static pid_t child(int nseg, int out, int hold, int hold_w) {
  const pid_t pid = fork();
  ck_assert_int_ge(pid, 0);
  if (pid == 0) {
    alarm(30);
    close(hold_w);
    void *p;
    for (int i = 0; i < nseg; i++) alloc_and_tell(out, &p);
    if (hold < 0) raise(SIGKILL);
    char c;
    if (read(hold, &c, 1) != 1) _exit(5);
    _exit(0);
  }
  return pid;
}

/* Read a child's segment name from fd, within 30 s. */
static void read_name(int fd, char *name) {
  struct pollfd pf = {.fd = fd, .events = POLLIN};
  ck_assert_msg(poll(&pf, 1, 30000) == 1, "no segment name from a child within 30 s");
  ck_assert_int_eq(read(fd, name, DA_DEV_HANDLE_BYTES), DA_DEV_HANDLE_BYTES);
  ck_assert_msg(name[0] == '/' && in_shm(name), "no segment %s in /dev/shm", name);
}

START_TEST(sweep_killed_only) {
  int names[2], hold[2];
  ck_assert_int_eq(pipe(names), 0);
  ck_assert_int_eq(pipe(hold), 0);
  char killed[2][DA_DEV_HANDLE_BYTES], alive[DA_DEV_HANDLE_BYTES], lock_k[96], lock_a[96];

  /* the killed child: two segments left behind */
  pid_t k = child(2, names[1], -1, hold[1]);
  read_name(names[0], killed[0]);
  read_name(names[0], killed[1]);
  int st;
  ck_assert_int_eq(waitpid(k, &st, 0), k);
  ck_assert_msg(WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL, "the child was not killed (status %d)", st);
  lock_of(killed[0], lock_k, sizeof lock_k);
  ck_assert_msg(in_shm(killed[0]) && in_shm(killed[1]) && in_shm(lock_k), "the killed child left nothing to sweep");

  /* the live child: allocates (its own sweep removes the killed child's leftovers already) */
  pid_t a = child(1, names[1], hold[0], hold[1]);
  read_name(names[0], alive);
  lock_of(alive, lock_a, sizeof lock_a);
  ck_assert_msg(!in_shm(killed[0]) && !in_shm(killed[1]) && !in_shm(lock_k),
                "a new process's first segment did not sweep the killed child's %s, %s, %s", killed[0], killed[1],
                lock_k);

  /* this process's first segment: sweeps, and leaves the live child alone */
  void *mine;
  da_dev_mem_handle_t h;
  ck_assert_int_eq(D->alloc(&mine, 4096), DA_SUCCESS);
  ck_assert_int_eq(D->mem_handle(mine, 4096, &h), DA_SUCCESS);
  ck_assert_msg(in_shm((const char *)h.opaque), "own segment %s missing", (const char *)h.opaque);
  memset(mine, 0x5A, 4096);
  ck_assert_msg(in_shm(alive) && in_shm(lock_a), "the sweep removed the live child's %s or %s", alive, lock_a);

  /* the live child exits without freeing: the next new process sweeps its segment */
  ck_assert_int_eq(write(hold[1], "x", 1), 1);
  ck_assert_int_eq(waitpid(a, &st, 0), a);
  ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 0, "the live child failed (status %d)", st);
  ck_assert_msg(in_shm(alive), "the exited child's segment went before any sweep");
  char next[DA_DEV_HANDLE_BYTES];
  pid_t n = child(1, names[1], hold[0], hold[1]);
  read_name(names[0], next);
  ck_assert_msg(!in_shm(alive) && !in_shm(lock_a), "the exited child's %s or %s survived a sweep", alive, lock_a);
  ck_assert_msg(in_shm((const char *)h.opaque), "the sweep removed the live parent's own segment");
  ck_assert_int_eq(write(hold[1], "x", 1), 1);
  ck_assert_int_eq(waitpid(n, &st, 0), n);
  D->free(mine);
  ck_assert_msg(!in_shm((const char *)h.opaque), "free left the segment");
}
END_TEST

int main(void) {
  Suite *s = suite_create("devapi_sweep");
  TCase *tc = tcase_create("host");
  tcase_add_test(tc, sweep_killed_only);
  suite_add_tcase(s, tc);
  SRunner *r = srunner_create(s);
  srunner_set_fork_status(r, CK_NOFORK); /* the test forks its own children */
  srunner_run_all(r, CK_NORMAL);
  const int failed = srunner_ntests_failed(r);
  srunner_free(r);
  return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
