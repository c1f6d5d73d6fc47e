/* paths.c: files of one run compared before it starts (see paths.h). */
#define _GNU_SOURCE
#include <errno.h>
#include <libgen.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include "core.h"
#include "paths.h"

void da_paths_add(da_pathset_t *s, const char *role, const char *path, int writes) {
  if (!path || s->n >= DA_PATHS_MAX) return;
  snprintf(s->e[s->n].path, sizeof s->e[s->n].path, "%s", path);
  s->e[s->n].role = role, s->e[s->n].writes = writes;
  s->n++;
}

void da_paths_add_in(da_pathset_t *s, const char *role, const char *dir, const char *name, int writes) {
  if (!dir) return;
  char p[4096];
  snprintf(p, sizeof p, "%s/%s", dir, name);
  da_paths_add(s, role, p, writes);
}

void da_paths_add_debug(da_pathset_t *s) { da_paths_add(s, "DISTATTN_DEBUG_FILE", da_log_file_path(), 1); }

/* The absolute path with its directory resolved (symbolic links, "..") and the last name as
 * given: two names of a file that does not exist yet compare equal when they would create the
 * same entry. */
static void normalize(const char *path, char *out, size_t n) {
  char a[4096], b[4096], dir[PATH_MAX];
  snprintf(a, sizeof a, "%s", path);
  snprintf(b, sizeof b, "%s", path);
  const char *base = basename(b);
  if (realpath(dirname(a), dir)) snprintf(out, n, "%s/%s", strcmp(dir, "/") ? dir : "", base);
  else snprintf(out, n, "%s", path);
}

int da_paths_check(const da_pathset_t *s, char *err, size_t n) {
  struct stat st[DA_PATHS_MAX];
  int exists[DA_PATHS_MAX];
  static char norm[DA_PATHS_MAX][PATH_MAX + 4100]; /* a resolved directory and a name as given */
  for (int i = 0; i < s->n; i++) {
    exists[i] = stat(s->e[i].path, &st[i]) == 0;
    normalize(s->e[i].path, norm[i], sizeof norm[i]);
  }
  for (int i = 0; i < s->n; i++)
    for (int j = i + 1; j < s->n; j++) {
      if (!s->e[i].writes && !s->e[j].writes) continue; /* two readers of one file: fine */
      int same = exists[i] && exists[j] ? st[i].st_dev == st[j].st_dev && st[i].st_ino == st[j].st_ino
                                        : !strcmp(norm[i], norm[j]);
      if (!same) continue;
      const int w = s->e[j].writes ? j : i, o = w == j ? i : j; /* name the writer first */
      snprintf(err, n, "%s %s is the same file as %s %s: a run may not write a file it reads or writes "
               "otherwise", s->e[w].role, s->e[w].path, s->e[o].role, s->e[o].path);
      return -1;
    }
  return 0;
}

int da_paths_refuse(const char *cmd, const da_pathset_t *s) {
  char err[9000];
  if (!da_paths_check(s, err, sizeof err)) return 0;
  fprintf(stderr, "distattn %s: %s\n", cmd, err);
  return 2;
}

int da_paths_refuse_json(const char *cmd, const char *json) {
  da_pathset_t s = {0};
  da_paths_add(&s, "--json", json, 1);
  da_paths_add_debug(&s);
  return da_paths_refuse(cmd, &s);
}
