/* log.c: the logger, modelled on NCCL_DEBUG. DISTATTN_DEBUG=VERSION|WARN|INFO|TRACE selects the
 * level, DISTATTN_DEBUG_SUBSYS=INIT,KERNEL,COMM,PLAN,ENV,IO,ALLOC (or ALL, ^X to exclude) the
 * subsystems, DISTATTN_DEBUG_FILE=path.%h.%p a per-process file (%h host, %p pid). Lines look
 * like "host:pid:tid [rank] DISTATTN INFO message". Diagnostics never go to stdout. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/syscall.h>
#include <unistd.h>
#include "core.h"

int da_log_level_cached = -1;
static unsigned log_mask = DA_SUB_ALL;
static FILE *log_file;
static int log_rank = -1;
static char log_host[64];
static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;
static double log_t0;

static unsigned parse_subsys(const char *s) {
  static const struct { const char *name; unsigned bit; } subs[] = {
      {"INIT", DA_SUB_INIT}, {"KERNEL", DA_SUB_KERNEL}, {"COMM", DA_SUB_COMM},
      {"PLAN", DA_SUB_PLAN}, {"ENV", DA_SUB_ENV},       {"IO", DA_SUB_IO},
      {"ALLOC", DA_SUB_ALLOC}, {"ALL", DA_SUB_ALL}};
  int invert = (*s == '^');
  if (invert) s++;
  unsigned mask = 0;
  char buf[256];
  snprintf(buf, sizeof buf, "%s", s);
  for (char *save = NULL, *tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save))
    for (size_t i = 0; i < sizeof subs / sizeof subs[0]; i++)
      if (!strcasecmp(tok, subs[i].name)) mask |= subs[i].bit;
  return invert ? ~mask : mask;
}

/* DISTATTN_DEBUG_FILE's pattern with %h (short host name) and %p (pid) expanded into path. */
static void expand_log_path(const char *pattern, char *path, size_t size) {
  if (!log_host[0]) {
    gethostname(log_host, sizeof log_host - 1);
    char *dot = strchr(log_host, '.');
    if (dot) *dot = '\0';
  }
  size_t n = 0;
  for (const char *p = pattern; *p && n + 1 < size; p++) {
    if (p[0] == '%' && p[1] == 'h') {
      n += (size_t)snprintf(path + n, size - n, "%s", log_host);
      p++;
    } else if (p[0] == '%' && p[1] == 'p') {
      n += (size_t)snprintf(path + n, size - n, "%d", (int)getpid());
      p++;
    } else {
      path[n++] = *p;
    }
    if (n >= size) n = size - 1;
  }
  path[n] = '\0';
}

static void open_log_file(const char *pattern) {
  char path[1024];
  expand_log_path(pattern, path, sizeof path);
  FILE *f = fopen(path, "a");
  if (f) {
    setvbuf(f, NULL, _IOLBF, 0);
    log_file = f;
  } else {
    fprintf(stderr, "distattn: cannot open DISTATTN_DEBUG_FILE %s, logging to stderr\n", path);
  }
}

void da_log_init(void) {
  pthread_mutex_lock(&log_lock);
  if (da_log_level_cached >= 0) {
    pthread_mutex_unlock(&log_lock);
    return;
  }
  gethostname(log_host, sizeof log_host - 1);
  char *dot = strchr(log_host, '.');
  if (dot) *dot = '\0';
  int lvl = DA_LOG_NONE;
  const char *e = getenv("DISTATTN_DEBUG");
  if (e) {
    if (!strcasecmp(e, "VERSION")) lvl = DA_LOG_VERSION;
    else if (!strcasecmp(e, "WARN")) lvl = DA_LOG_WARN;
    else if (!strcasecmp(e, "INFO")) lvl = DA_LOG_INFO;
    else if (!strcasecmp(e, "TRACE")) lvl = DA_LOG_TRACE;
    else fprintf(stderr, "distattn: unknown DISTATTN_DEBUG=%s (VERSION|WARN|INFO|TRACE)\n", e);
  }
  const char *s = getenv("DISTATTN_DEBUG_SUBSYS");
  if (s) log_mask = parse_subsys(s);
  const char *f = getenv("DISTATTN_DEBUG_FILE");
  log_file = stderr;
  if (f && lvl > DA_LOG_NONE) open_log_file(f);
  log_t0 = da_time_now();
  __atomic_store_n(&da_log_level_cached, lvl, __ATOMIC_RELEASE);
  pthread_mutex_unlock(&log_lock);
  if (lvl >= DA_LOG_VERSION)
    da_log(DA_LOG_VERSION, DA_SUB_INIT, __FILE__, __LINE__, "distattn version %s",
           da_version_string());
}

void da_log_set_rank(int rank) { log_rank = rank; }

void da_log(da_log_level_t lvl, unsigned sub, const char *file, int line, const char *fmt, ...) {
  if (da_log_level_cached < 0) da_log_init();
  if (da_log_level_cached < (int)lvl || !(sub & log_mask)) return;
  static const char *const names[] = {"NONE", "VERSION", "WARN", "INFO", "TRACE"};
  char msg[1024];
  int n = 0;
  if (lvl == DA_LOG_TRACE)
    n = snprintf(msg, sizeof msg, "%s:%d:%ld [%d] %.6f %s:%d DISTATTN TRACE ", log_host,
                 (int)getpid(), (long)syscall(SYS_gettid), log_rank, da_time_now() - log_t0,
                 file, line);
  else
    n = snprintf(msg, sizeof msg, "%s:%d:%ld [%d] DISTATTN %s ", log_host, (int)getpid(),
                 (long)syscall(SYS_gettid), log_rank, names[lvl]);
  if (n < 0) n = 0;
  va_list ap;
  va_start(ap, fmt);
  if ((size_t)n < sizeof msg) vsnprintf(msg + n, sizeof msg - (size_t)n, fmt, ap);
  va_end(ap);
  pthread_mutex_lock(&log_lock);
  fprintf(log_file ? log_file : stderr, "%s\n", msg);
  pthread_mutex_unlock(&log_lock);
}

const char *da_log_file_path(void) {
  /* the logger writes to a file only at a level it knows (da_log_init); found without opening it */
  static const char *const levels[] = {"VERSION", "WARN", "INFO", "TRACE"};
  static char path[1024];
  const char *e = getenv("DISTATTN_DEBUG"), *f = getenv("DISTATTN_DEBUG_FILE");
  int on = 0;
  for (int i = 0; e && i < 4; i++) on |= !strcasecmp(e, levels[i]);
  if (!on || !f || !*f) return NULL;
  expand_log_path(f, path, sizeof path);
  return path;
}
