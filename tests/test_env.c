/* test_env.c: the DISTATTN_* variables, generated from their table (core/env.c; issue 19,
 * class 5). For every entry with a `garbage` value: the parser refuses it naming the variable;
 * da_context_create refuses it (library variables) with a status naming it; and the `distattn`
 * program (argv[1]) exits 2 with the name on stderr, where the same command without the variable
 * exits 0. A variable added to the table is covered without touching this file. Also: real
 * seconds for DISTATTN_TIMEOUT, and values of each type that must be accepted. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>
#include "core.h"
#include "env.h"

static int failures, checked;

static void fail(const char *name, const char *what, const char *detail) {
  failures++;
  fprintf(stderr, "FAIL %s: %s%s%s\n", name, what, detail ? ": " : "", detail ? detail : "");
}

/* Run `exe kernel --help` with name=value (name NULL: as is); exit status, stderr into err. */
static int run_program(const char *exe, const char *name, const char *value, char *err, size_t n) {
  char path[] = "/tmp/da_test_env_XXXXXX";
  int fd = mkstemp(path);
  if (fd < 0) return -1;
  pid_t pid = fork();
  if (pid == 0) {
    if (name) setenv(name, value, 1);
    dup2(fd, 2);
    int null = open("/dev/null", O_WRONLY);
    dup2(null, 1);
    execl(exe, exe, "kernel", "--help", (char *)NULL);
    _exit(127);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  ssize_t r = pread(fd, err, n - 1, 0);
  err[r > 0 ? r : 0] = '\0';
  close(fd);
  unlink(path);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

int main(int argc, char **argv) {
  const char *exe = argc > 1 ? argv[1] : NULL;
  for (const da_env_var_t *v = da_env_vars; v->name; v++) unsetenv(v->name);
  char err[2048];
  if (exe && run_program(exe, NULL, NULL, err, sizeof err) != 0) fail("control", "distattn kernel --help failed", err);
  for (const da_env_var_t *v = da_env_vars; v->name; v++) {
    if (!v->garbage) {
      if (v->type != DA_ENV_INTERNAL) fail(v->name, "no garbage value in the table", NULL);
      continue;
    }
    checked++;
    /* the parser */
    da_error_clear();
    if (da_env_check_value(v, v->garbage) != DA_ERR_INVALID_ARGUMENT || !strstr(da_error_message(), v->name))
      fail(v->name, "the parser accepted garbage or did not name it", da_error_message());
    /* the library: a status naming it at context creation */
    if (!strcmp(v->reader, "library")) {
      setenv(v->name, v->garbage, 1);
      da_context_t *ctx = NULL;
      da_status_t st = da_context_create(NULL, &ctx);
      if (st != DA_ERR_INVALID_ARGUMENT || !strstr(da_last_error(NULL), v->name))
        fail(v->name, "da_context_create did not refuse it naming the variable", da_last_error(NULL));
      da_context_free(ctx);
      unsetenv(v->name);
    }
    /* the program: exit 2 naming it */
    if (exe) {
      int rc = run_program(exe, v->name, v->garbage, err, sizeof err);
      if (rc != 2 || !strstr(err, v->name)) {
        char d[2100];
        snprintf(d, sizeof d, "exit %d, stderr '%s'", rc, err);
        fail(v->name, "distattn did not exit 2 naming the variable", d);
      }
    }
  }
  /* values that must pass, one per kind of check */
  static const char *const good[][2] = {
      {"DISTATTN_TIMEOUT", "2.5"}, {"DISTATTN_TIMEOUT", "1"},         {"DISTATTN_NTHREADS", "0"},
      {"DISTATTN_NTHREADS", "1024"}, {"DISTATTN_MEM_BUDGET", "off"},  {"DISTATTN_MEM_BUDGET", "512M"},
      {"DISTATTN_DEBUG", "info"},   {"DISTATTN_DEBUG_SUBSYS", "^ALLOC,init"}, {"DISTATTN_JSON_KEY", "caf\xc3\xa9 run"},
      {"DISTATTN_TEST_NONFINITE", "q:3,k:1K:inf"}, {"DISTATTN_TEST_LINK_GBPS", "2.5"}};
  for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
    da_error_clear();
    if (da_env_check_value(da_env_find(good[i][0]), good[i][1]) != DA_SUCCESS)
      fail(good[i][0], "a valid value was refused", da_error_message());
  }
  static const char *const bad[][2] = {{"DISTATTN_NTHREADS", "-1"}, {"DISTATTN_NTHREADS", "0x10"},
                                       {"DISTATTN_NTHREADS", "4 "}, {"DISTATTN_TIMEOUT", "nan"},
                                       {"DISTATTN_TIMEOUT", "0"},   {"DISTATTN_JSON_KEY", "\xed\xa0\x80"},
                                       {"DISTATTN_DEBUG_SUBSYS", ""}, {"DISTATTN_TEST_NONFINITE", "x:1"}};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
    if (bad[i][1][0] && da_env_check_value(da_env_find(bad[i][0]), bad[i][1]) == DA_SUCCESS)
      fail(bad[i][0], "an invalid value was accepted", bad[i][1]);
  /* fractional seconds are kept as such, not replaced */
  setenv("DISTATTN_TIMEOUT", "2.5", 1);
  double t = 0;
  int set = 0;
  if (da_env_double("DISTATTN_TIMEOUT", &t, &set) != DA_SUCCESS || !set || t != 2.5)
    fail("DISTATTN_TIMEOUT", "2.5 was not read as 2.5 s", NULL);
  unsetenv("DISTATTN_TIMEOUT");
  /* DISTATTN_TEST_NONFINITE: one parser for the check and the program's read (da_env_poison);
   * the items as written (positions are sizes: 1K = 1024) */
  setenv("DISTATTN_TEST_NONFINITE", "q:3,k:1K:inf,dout:7:-inf,v:0:nan", 1);
  da_env_poison_t it[DA_ENV_POISON_MAX];
  int np = 0;
  if (da_env_poison("DISTATTN_TEST_NONFINITE", it, &np) != DA_SUCCESS || np != 4 || it[0].tensor != 0 ||
      it[0].pos != 3 || !isnan(it[0].value) || it[1].tensor != 1 || it[1].pos != 1024 || !isinf(it[1].value) ||
      it[1].value < 0 || it[2].tensor != 3 || it[2].pos != 7 || !isinf(it[2].value) || it[2].value > 0 ||
      it[3].tensor != 2 || it[3].pos != 0 || !isnan(it[3].value))
    fail("DISTATTN_TEST_NONFINITE", "its items were not read as written", da_error_message());
  /* 16 items pass, 17 do not; an empty item is refused (the program's own parser split on ',' with
   * strtok and skipped it) */
  char many[400] = "";
  for (int i = 0; i < 17; i++) snprintf(many + strlen(many), sizeof many - strlen(many), "%sq:%d", i ? "," : "", i);
  if (da_env_check_value(da_env_find("DISTATTN_TEST_NONFINITE"), many) == DA_SUCCESS)
    fail("DISTATTN_TEST_NONFINITE", "17 items were accepted", many);
  *strrchr(many, ',') = '\0';
  if (da_env_check_value(da_env_find("DISTATTN_TEST_NONFINITE"), many) != DA_SUCCESS)
    fail("DISTATTN_TEST_NONFINITE", "16 items were refused", da_error_message());
  if (da_env_check_value(da_env_find("DISTATTN_TEST_NONFINITE"), "q:1,,k:2") == DA_SUCCESS)
    fail("DISTATTN_TEST_NONFINITE", "an empty item was accepted", "q:1,,k:2");
  unsetenv("DISTATTN_TEST_NONFINITE");
  printf("# test_env: %d variables fed garbage%s: %d failures -> %s\n", checked,
         exe ? " (parser, library, program)" : " (parser, library)", failures, failures ? "FAIL" : "PASS");
  return failures ? 1 : 0;
}
