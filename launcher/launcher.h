/* launcher.h: what the parts of the `distattn` program share: the subcommand table. Each
 * subcommand lives in its own cmd_<name>.c and returns the process exit code (0 ok, 1 wrong
 * results or runtime failure, 2 usage error). */
#ifndef DA_LAUNCHER_H
#define DA_LAUNCHER_H

typedef struct da_command {
  const char *name;
  int (*main)(int argc, char **argv); /* NULL when not built */
  const char *why;                    /* why it is missing */
} da_command_t;

extern const da_command_t da_commands[];

/* Subcommands; weak so a build without one of them still links (and says so). */
int da_cmd_run(int argc, char **argv) __attribute__((weak));
int da_cmd_decode(int argc, char **argv) __attribute__((weak));
int da_cmd_kernel(int argc, char **argv) __attribute__((weak));
int da_cmd_plan(int argc, char **argv) __attribute__((weak));

#endif
