/* agree.c: the ranks of an MPI command agree on their whole configuration before anything else
 * (see agree.h). An MPMD launch (`mpirun -np 1 distattn run --iters 2 : -np 1 distattn run --iters
 * 3`), a heterogeneous Slurm job or a wrapper script that edits one rank's line gives ranks
 * different command lines; without this, the first collective whose size depends on an option
 * fails with MPI_ERR_TRUNCATE, waits forever, or the run "fails" its check for a reason that is
 * not in the numbers. Here every rank hashes each option's effective value and one fixed-size
 * allgather -- the same size whatever the command, so even `run : decode` meets in it -- lets every
 * rank see every rank's command, verdict and hashes, and all take the same decision. */
#define _GNU_SOURCE
#include <mpi.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "agree.h"
#include "common.h"

enum { AGREE_MAX_OPTS = 64, AGREE_NAME = 32, AGREE_VALUE = 120 };

/* What one rank tells the others: fixed size, so the allgather matches on every rank. */
typedef struct agree_rec {
  int32_t verdict; /* DA_ARGS_OK / HELP / USAGE */
  int32_t nopts;
  char cmd[AGREE_NAME];
  uint64_t hash[AGREE_MAX_OPTS]; /* per option of the table; 0 for a per-rank option */
} agree_rec_t;

/* ---- hashing an option's effective value ---- */

static uint64_t fnv(uint64_t h, const void *p, size_t n) {
  const unsigned char *b = p;
  for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 0x100000001b3ull;
  return h;
}

/* The value in binary, not as printed: --timeout 5 and 5.0000001 print alike with %g. */
uint64_t da_agree_hash_opt(const da_opt_t *o) {
  uint64_t h = fnv(0xcbf29ce484222325ull, o->name, strlen(o->name) + 1);
  switch (o->type) {
    case DA_OPT_INT:
    case DA_OPT_SIZE: return fnv(h, o->dest, sizeof(int64_t));
    case DA_OPT_DOUBLE: return fnv(h, o->dest, sizeof(double));
    case DA_OPT_FLAG:
    case DA_OPT_ENUM: return fnv(h, o->dest, sizeof(int));
    case DA_OPT_SET: return fnv(h, o->dest, sizeof(unsigned));
    case DA_OPT_STRING: {
      const char *s = *(const char *const *)o->dest;
      return s ? fnv(h, s, strlen(s) + 1) : fnv(h, "", 1) ^ 1; /* unset differs from any string */
    }
    case DA_OPT_MASK: {
      const da_mask_t *m = &((const da_mask_spec_t *)o->dest)->mask;
      h = fnv(h, &m->flags, sizeof m->flags);
      h = fnv(h, &m->window, sizeof m->window);
      h = fnv(h, &m->ndocs, sizeof m->ndocs);
      if ((m->flags & DA_MASK_DOC) && m->cu_seqlens) h = fnv(h, m->cu_seqlens, (size_t)(m->ndocs + 1) * sizeof(int64_t));
      return h;
    }
  }
  return h;
}

static void make_rec(agree_rec_t *r, const da_cmdspec_t *spec, int verdict) {
  memset(r, 0, sizeof *r);
  r->verdict = verdict;
  snprintf(r->cmd, sizeof r->cmd, "%s", spec->name);
  if (verdict != DA_ARGS_OK) return; /* a failed parse left values half set: nothing to compare */
  for (const da_opt_t *o = spec->opts; o->name && r->nopts < AGREE_MAX_OPTS; o++, r->nopts++)
    r->hash[r->nopts] = o->per_rank ? 0 : da_agree_hash_opt(o);
}

/* ---- messages ---- */

/* "0,2-3": the ranks r with cls[r] == c, as ranges, cut short with ",..." past n bytes. */
static void rank_list(const int *cls, int size, int c, char *buf, size_t n) {
  size_t off = 0;
  buf[0] = '\0';
  for (int r = 0; r < size; r++) {
    if (cls[r] != c) continue;
    int e = r;
    while (e + 1 < size && cls[e + 1] == c) e++;
    char item[32];
    if (e > r) snprintf(item, sizeof item, "%s%d-%d", off ? "," : "", r, e);
    else snprintf(item, sizeof item, "%s%d", off ? "," : "", r);
    if (off + strlen(item) + 5 >= n) {
      snprintf(buf + off, n - off, ",...");
      return;
    }
    off += (size_t)snprintf(buf + off, n - off, "%s", item);
    r = e;
  }
}

/* Classes of equal keys: cls[r] = the lowest rank with rank r's key. Returns how many classes. */
static int classes(int size, const void *keys, size_t stride, size_t keylen, int *cls) {
  int n = 0;
  for (int r = 0; r < size; r++) {
    cls[r] = r;
    for (int q = 0; q < r; q++)
      if (!memcmp((const char *)keys + (size_t)q * stride, (const char *)keys + (size_t)r * stride, keylen)) {
        cls[r] = cls[q];
        break;
      }
    n += cls[r] == r;
  }
  return n;
}

/* "'run' on rank 0; 'decode' on ranks 1-2": each class of values with its ranks (at most 6). */
static void describe(int size, const int *cls, const char *values, size_t stride, char *buf, size_t n) {
  size_t off = 0;
  int shown = 0;
  buf[0] = '\0';
  for (int r = 0; r < size && off < n; r++) {
    if (cls[r] != r) continue;
    if (shown++ == 6) {
      snprintf(buf + off, n - off, "; ...");
      return;
    }
    char ranks[160];
    rank_list(cls, size, r, ranks, sizeof ranks);
    const int one = !strchr(ranks, ',') && !strchr(ranks, '-');
    off += (size_t)snprintf(buf + off, n - off, "%s%s on rank%s %s", off ? "; " : "", values + (size_t)r * stride,
                            one ? "" : "s", ranks);
  }
}

/* ---- the agreement ---- */

int da_agree_config(const da_cmdspec_t *spec, int verdict, char *msg, size_t msglen, int *bad) {
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  msg[0] = '\0';
  *bad = -1;
  agree_rec_t mine, *all = malloc((size_t)size * sizeof *all);
  int *cls = malloc((size_t)size * sizeof *cls);
  char *vals = malloc((size_t)size * (AGREE_VALUE > AGREE_NAME + 2 ? AGREE_VALUE : AGREE_NAME + 2));
  make_rec(&mine, spec, verdict);
  /* Without the tables nobody can compare: every rank gives up, the same way (the allgathers
   * below would otherwise run on some ranks only). */
  int oom = !all || !cls || !vals;
  MPI_Allreduce(MPI_IN_PLACE, &oom, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (oom) {
    free(all), free(cls), free(vals);
    snprintf(msg, msglen, "out of memory comparing the ranks' options");
    return DA_AGREE_MISMATCH;
  }
  MPI_Allgather(&mine, sizeof mine, MPI_BYTE, all, sizeof mine, MPI_BYTE, MPI_COMM_WORLD);
  int rc = DA_AGREE_OK;
  char what[1024];
  /* 1. the command: its option table is the key to everything else */
  if (classes(size, all[0].cmd, sizeof *all, AGREE_NAME, cls) > 1) {
    for (int r = 0; r < size; r++) snprintf(vals + (size_t)r * (AGREE_NAME + 2), AGREE_NAME + 2, "'%s'", all[r].cmd);
    describe(size, cls, vals, AGREE_NAME + 2, what, sizeof what);
    snprintf(msg, msglen, "ranks disagree on the command: %s (every rank must run the same command)", what);
    rc = DA_AGREE_MISMATCH;
    goto out;
  }
  /* 2. a usage error anywhere: the caller lets the lowest such rank explain it */
  for (int r = 0; r < size; r++)
    if (all[r].verdict == DA_ARGS_USAGE) {
      *bad = r;
      rc = DA_AGREE_USAGE;
      goto out;
    }
  /* 3. --help on some ranks only */
  int nhelp = 0;
  for (int r = 0; r < size; r++) {
    nhelp += all[r].verdict == DA_ARGS_HELP;
    cls[r] = all[r].verdict == DA_ARGS_HELP;
  }
  if (nhelp == size) {
    rc = DA_AGREE_HELP;
    goto out;
  }
  if (nhelp) {
    char given[160], not_given[160];
    rank_list(cls, size, 1, given, sizeof given);
    rank_list(cls, size, 0, not_given, sizeof not_given);
    snprintf(msg, msglen, "ranks disagree on --help: given on rank(s) %s, not on rank(s) %s", given, not_given);
    rc = DA_AGREE_MISMATCH;
    goto out;
  }
  /* 4. the options, in table order: the first that differs is named, with every rank's value */
  int opt = -1;
  for (int i = 0; i < all[0].nopts && opt < 0; i++)
    for (int r = 1; r < size; r++)
      if (all[r].hash[i] != all[0].hash[i]) {
        opt = i;
        break;
      }
  if (opt < 0) goto out;
  const da_opt_t *o = &spec->opts[opt];
  char value[AGREE_VALUE];
  da_args_format(o, value, sizeof value);
  /* every rank takes part: the decision above is the same everywhere */
  MPI_Allgather(value, AGREE_VALUE, MPI_CHAR, vals, AGREE_VALUE, MPI_CHAR, MPI_COMM_WORLD);
  classes(size, all[0].hash + opt, sizeof *all, sizeof(uint64_t), cls);
  describe(size, cls, vals, AGREE_VALUE, what, sizeof what);
  snprintf(msg, msglen, "ranks disagree on --%s: %s (every rank of a job must be given the same options)", o->name,
           what);
  rc = DA_AGREE_MISMATCH;
out:
  free(all), free(cls), free(vals);
  return rc;
}

/* ---- the test sweep: every option of the table, in process ---- */

/* Output of this rank silenced (stdout and stderr onto /dev/null) while a candidate value is
 * tried alone. */
static int silence(int saved[2]) {
  fflush(stdout), fflush(stderr);
  int devnull = open("/dev/null", O_WRONLY);
  saved[0] = dup(1), saved[1] = dup(2);
  if (devnull >= 0) dup2(devnull, 1), dup2(devnull, 2), close(devnull);
  return 0;
}

static void unsilence(int saved[2]) {
  fflush(stdout), fflush(stderr);
  if (saved[0] >= 0) dup2(saved[0], 1), close(saved[0]);
  if (saved[1] >= 0) dup2(saved[1], 2), close(saved[1]);
}

/* Candidate values of option o other than its current text cur: up to 8 into cand. */
static int candidates(const da_opt_t *o, const char *cur, char cand[8][AGREE_VALUE]) {
  int n = 0;
  switch (o->type) {
    case DA_OPT_INT:
    case DA_OPT_SIZE: {
      const int64_t v = *(const int64_t *)o->dest, hi = (o->min == 0 && o->max == 0) ? INT64_MAX : o->max;
      const int64_t c[] = {v + 1, v - 1, 2 * v, v + 2, o->min, hi};
      for (size_t i = 0; i < sizeof c / sizeof *c; i++)
        if (c[i] >= o->min && c[i] <= hi && c[i] != v) snprintf(cand[n++], AGREE_VALUE, "%lld", (long long)c[i]);
      break;
    }
    case DA_OPT_DOUBLE: {
      const double v = *(const double *)o->dest;
      const double c[] = {v + 1, v + 0.5, v - 1, v * 2 + 1, o->dmin, o->dmax};
      for (size_t i = 0; i < sizeof c / sizeof *c; i++)
        if ((o->dmin == 0 && o->dmax == 0) || (c[i] >= o->dmin && c[i] <= o->dmax))
          if (c[i] != v) snprintf(cand[n++], AGREE_VALUE, "%.17g", c[i]);
      break;
    }
    case DA_OPT_ENUM:
      for (int i = 0; o->choices[i] && n < 8; i++)
        if (i != *(const int *)o->dest) snprintf(cand[n++], AGREE_VALUE, "%s", o->choices[i]);
      break;
    case DA_OPT_SET:
      for (int i = 0; o->choices[i] && n < 8; i++)
        if ((1u << i) != *(const unsigned *)o->dest) snprintf(cand[n++], AGREE_VALUE, "%s", o->choices[i]);
      break;
    case DA_OPT_MASK: {
      static const char *const masks[] = {"causal", "none", "window:7"};
      for (size_t i = 0; i < 3; i++)
        if (strcmp(masks[i], cur)) snprintf(cand[n++], AGREE_VALUE, "%s", masks[i]);
      break;
    }
    case DA_OPT_STRING:
      if (o->sample && strcmp(o->sample, cur)) snprintf(cand[n++], AGREE_VALUE, "%s", o->sample);
      break;
    case DA_OPT_FLAG:
      if (!*(const int *)o->dest) snprintf(cand[n++], AGREE_VALUE, "%s", "");
      break;
  }
  return n;
}

int da_agree_sweep(const da_mpi_cmd_t *cmd, void *c, size_t csize, int argc, char **argv) {
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  void *pristine = malloc(csize);
  char **av = calloc((size_t)argc + 4, sizeof *av);
  if (!pristine || !av) return 1;
  memcpy(pristine, c, csize); /* defaults, before any parse: restored before every try */
  int saved[2], nopts = 0;
  silence(saved);
  cmd->parse(c, argc, argv); /* a command may build its table in parse (offload) */
  unsilence(saved);
  for (const da_opt_t *o = cmd->spec(c)->opts; o && o->name; o++) nopts++;
  cmd->release(c);
  int failed = 0, checked = 0, skipped = 0;
  /* every option of the table, then --help (index nopts) */
  for (int i = 0; i <= nopts; i++) {
    char name[64] = "help", cand[8][AGREE_VALUE], chosen[AGREE_VALUE + 72] = "", cur[AGREE_VALUE] = "";
    int found = 0, per_rank = 0, is_flag = 0;
    /* base values: parse the common line once, read option i's value and candidates */
    memcpy(c, pristine, csize);
    silence(saved);
    int base = cmd->parse(c, argc, argv);
    unsilence(saved);
    if (base != DA_ARGS_OK) {
      if (rank == 0) fprintf(stderr, "agree sweep: the base command line does not parse (%d)\n", base);
      failed++;
      cmd->release(c);
      break;
    }
    if (i < nopts) {
      const da_opt_t *o = &cmd->spec(c)->opts[i];
      snprintf(name, sizeof name, "%s", o->name);
      per_rank = o->per_rank, is_flag = o->type == DA_OPT_FLAG;
      da_args_format(o, cur, sizeof cur);
      int nc = candidates(o, cur, cand);
      cmd->release(c);
      /* the first candidate that parses alone on this rank (rank 1 decides; all follow) */
      for (int k = 0; k < nc && !found; k++) {
        char arg[AGREE_VALUE + 72];
        snprintf(arg, sizeof arg, is_flag ? "--%s" : "--%s=%s", name, cand[k]);
        memcpy(av, argv, (size_t)argc * sizeof *av);
        av[argc] = arg;
        memcpy(c, pristine, csize);
        silence(saved);
        found = cmd->parse(c, argc + 1, av) == DA_ARGS_OK;
        unsilence(saved);
        cmd->release(c);
        if (found) snprintf(chosen, sizeof chosen, "%s", arg);
      }
    } else {
      cmd->release(c);
      found = 1;
      snprintf(chosen, sizeof chosen, "--help");
    }
    MPI_Bcast(&found, 1, MPI_INT, size > 1 ? 1 : 0, MPI_COMM_WORLD);
    MPI_Bcast(chosen, sizeof chosen, MPI_CHAR, size > 1 ? 1 : 0, MPI_COMM_WORLD);
    if (!found) {
      if (rank == 0) printf("agree sweep: --%s: skipped, no other value parses here (%s)\n", name, cur);
      skipped++;
      continue;
    }
    /* rank 1 gets the option on top of the common line, the others the common line */
    memcpy(av, argv, (size_t)argc * sizeof *av);
    int ac = argc;
    if (rank == 1) av[ac++] = chosen;
    memcpy(c, pristine, csize);
    char msg[2048] = "";
    int bad = -1;
    silence(saved);
    int v = cmd->parse(c, ac, av);
    unsilence(saved);
    int rc = da_agree_config(cmd->spec(c), v, msg, sizeof msg, &bad);
    cmd->release(c);
    char want[80];
    snprintf(want, sizeof want, "--%s", name);
    /* per-rank options must be accepted; every other one refused, the message naming it */
    int ok = per_rank ? rc == DA_AGREE_OK : rc == DA_AGREE_MISMATCH && strstr(msg, want) != NULL;
    int all_ok = ok;
    MPI_Allreduce(MPI_IN_PLACE, &all_ok, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    checked++;
    if (!all_ok) failed++;
    if (!ok || rank == 0)
      printf("agree sweep: rank %d: %s %s: %s%s%s\n", rank, ok ? "ok" : "FAILED", chosen,
             per_rank ? "per-rank option, accepted" : rc == DA_AGREE_MISMATCH ? "refused: " : "not refused",
             per_rank ? "" : msg, rc == DA_AGREE_USAGE ? " (usage error instead of a disagreement)" : "");
    fflush(stdout);
  }
  memcpy(c, pristine, csize);
  free(pristine), free(av);
  if (rank == 0)
    printf("agree sweep: %s: %d options checked, %d skipped, %d failed\n", cmd->name, checked, skipped, failed);
  return failed ? 1 : 0;
}
