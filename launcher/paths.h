/* paths.h: the files a command reads and writes, checked against each other before it runs
 * (issue 19): --json, DISTATTN_DEBUG_FILE and --output may not name an input or another output of
 * the same run, or the run would overwrite what it reads, or two writers would interleave in one
 * file. Local to this process (each rank checks its own names: DISTATTN_DEBUG_FILE may expand to a
 * name per process). */
#ifndef DA_LAUNCHER_PATHS_H
#define DA_LAUNCHER_PATHS_H

#include <stddef.h>

enum { DA_PATHS_MAX = 16 };

typedef struct da_pathset {
  int n;
  struct {
    char path[4096];
    const char *role; /* "--json", "--input q.npy", "--output out.npy", "DISTATTN_DEBUG_FILE" */
    int writes;
  } e[DA_PATHS_MAX];
} da_pathset_t;

/* Add a file (path NULL: nothing added). */
void da_paths_add(da_pathset_t *s, const char *role, const char *path, int writes);
/* Add dir/name. */
void da_paths_add_in(da_pathset_t *s, const char *role, const char *dir, const char *name, int writes);
/* Add the logger's file (DISTATTN_DEBUG_FILE, when logging goes to a file). */
void da_paths_add_debug(da_pathset_t *s);

/* 0 when no file written is also another entry; else -1 with "--json x.jsonl is the same file as
 * --input q.npy (DIR/q.npy)" in err. The same file: the same device and inode when both exist
 * (hard links and symbolic links included), else the same normalized absolute path (the
 * directory resolved, the name as given). */
int da_paths_check(const da_pathset_t *s, char *err, size_t n);

/* da_paths_check for command cmd: 0, or 2 (a usage error: exit 2) with the message on stderr. */
int da_paths_refuse(const char *cmd, const da_pathset_t *s);
/* The common case: a command whose only files are --json (json may be NULL) and the debug file. */
int da_paths_refuse_json(const char *cmd, const char *json);

#endif /* DA_LAUNCHER_PATHS_H */
