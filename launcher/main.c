/* main.c: the `distattn` program's entry: dispatch to a subcommand (run, decode, kernel, plan). */
#include <stdio.h>
#include <string.h>
#include "core.h"
#include "launcher.h"
#include "env.h"

static void usage(FILE *f) {
  fprintf(f,
          "usage: distattn <command> [options]   (distattn <command> -h for its options)\n"
          "  run     distributed attention (ring | striped | zigzag), forward and backward\n"
          "  decode  decode against a distributed KV cache (tree | ring)\n"
          "  kernel  single-rank kernel benchmark against same-run sgemm and memory bandwidth\n"
          "  plan    layout, schedule, memory and predicted time, without running\n"
          "distattn %s\n",
          da_version_string());
}

int main(int argc, char **argv) {
  if (argc < 2) {
    usage(stderr);
    return 2;
  }
  const char *cmd = argv[1];
  /* Every DISTATTN_* variable is checked before anything runs (core/env.c): a bad one is a usage
   * error naming it, on every rank (each checks its own environment), never a silent default. */
  if (da_env_check_all() != DA_SUCCESS) {
    fprintf(stderr, "distattn: %s\n", da_error_message());
    return 2;
  }
  if (!strcmp(cmd, "-h") || !strcmp(cmd, "--help") || !strcmp(cmd, "help")) {
    usage(stdout);
    return 0;
  }
  if (!strcmp(cmd, "--version")) {
    printf("distattn %s\n", da_version_string());
    return 0;
  }
  for (const da_command_t *c = da_commands; c->name; c++)
    if (!strcmp(cmd, c->name)) {
      if (!c->main) {
        fprintf(stderr, "distattn %s: not available in this build (%s)\n", cmd, c->why);
        return 2;
      }
      return c->main(argc - 1, argv + 1);
    }
  fprintf(stderr, "distattn: unknown command '%s'\n", cmd);
  usage(stderr);
  return 2;
}

const da_command_t da_commands[] = {
    {"run", da_cmd_run, "needs MPI and the ring driver"},
    {"decode", da_cmd_decode, "needs MPI and the tree driver"},
    {"kernel", da_cmd_kernel, "kernel benchmark not built"},
    {"plan", da_cmd_plan, "planner not built"},
    {NULL, NULL, NULL},
};
