/* args.c: the option parser of the `distattn` subcommands and the --mask spec parser. Strict on
 * purpose: a benchmark that silently ignores a misspelled flag reports numbers for a run nobody
 * asked for, so every malformed input is a usage error (exit 2) naming the option. */
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include "args.h"
#include "core.h"

#define DA_MAX_OPTS 64
#define DA_DEFAULT_LEN 96

/* Defaults as text, captured when parsing starts (the destinations are overwritten after). */
static char defaults[DA_MAX_OPTS][DA_DEFAULT_LEN];
static const da_opt_t *defaults_of;

da_opt_t *da_args_find(da_opt_t *opts, const char *name) {
  for (da_opt_t *o = opts; o->name; o++)
    if (!strcmp(o->name, name) || (o->alias && !strcmp(o->alias, name))) return o;
  return NULL;
}

const char *da_args_format(const da_opt_t *o, char *buf, size_t n) {
  buf[0] = '\0';
  switch (o->type) {
    case DA_OPT_INT:
    case DA_OPT_SIZE: snprintf(buf, n, "%lld", (long long)*(const int64_t *)o->dest); break;
    case DA_OPT_DOUBLE: snprintf(buf, n, "%g", *(const double *)o->dest); break;
    case DA_OPT_STRING: {
      const char *s = *(const char *const *)o->dest;
      snprintf(buf, n, "%s", s ? s : "-");
      break;
    }
    case DA_OPT_FLAG: snprintf(buf, n, "%s", *(const int *)o->dest ? "on" : "off"); break;
    case DA_OPT_ENUM: {
      int i = *(const int *)o->dest;
      snprintf(buf, n, "%s", i >= 0 && o->choices ? o->choices[i] : "?");
      break;
    }
    case DA_OPT_SET: {
      unsigned bits = *(const unsigned *)o->dest;
      size_t off = 0;
      for (int i = 0; o->choices && o->choices[i]; i++)
        if (bits & (1u << i)) {
          int w = snprintf(buf + off, off < n ? n - off : 0, "%s%s", off ? "," : "", o->choices[i]);
          if (w > 0) off += (size_t)w;
        }
      if (!off) snprintf(buf, n, "none");
      break;
    }
    case DA_OPT_MASK: da_mask_describe(&((const da_mask_spec_t *)o->dest)->mask, buf, n); break;
  }
  return buf;
}

static const char *metavar(const da_opt_t *o, char *buf, size_t n) {
  if (o->metavar) return o->metavar;
  switch (o->type) {
    case DA_OPT_INT: return "N";
    case DA_OPT_SIZE: return "N[K|M|G]";
    case DA_OPT_DOUBLE: return "X";
    case DA_OPT_STRING: return "STR";
    case DA_OPT_FLAG: return "";
    case DA_OPT_MASK: return "none|causal|window:W|doc:L1,L2,..|causal+doc:..";
    case DA_OPT_ENUM:
    case DA_OPT_SET: {
      size_t off = 0;
      buf[0] = '\0';
      for (int i = 0; o->choices && o->choices[i]; i++) {
        int w = snprintf(buf + off, off < n ? n - off : 0, "%s%s", i ? (o->type == DA_OPT_SET ? "," : "|") : "",
                         o->choices[i]);
        if (w > 0) off += (size_t)w;
      }
      return buf;
    }
  }
  return "";
}

void da_args_usage(const da_cmdspec_t *cmd, FILE *f) {
  fprintf(f, "usage: distattn %s [options]\n", cmd->name);
  if (cmd->summary) fprintf(f, "  %s\n", cmd->summary);
  fprintf(f, "options (sizes accept K/M/G suffixes, K = 1024; --name value or --name=value):\n");
  int i = 0;
  for (const da_opt_t *o = cmd->opts; o->name; o++, i++) {
    char mv[160], flag[224], cur[DA_DEFAULT_LEN];
    const char *m = metavar(o, mv, sizeof mv);
    snprintf(flag, sizeof flag, "--%s%s%s", o->name, *m ? " " : "", m);
    const char *def = (defaults_of == cmd->opts && i < DA_MAX_OPTS) ? defaults[i]
                                                                    : da_args_format(o, cur, sizeof cur);
    fprintf(f, "  %-34s %s", flag, o->help ? o->help : "");
    if (o->type != DA_OPT_FLAG) fprintf(f, " [default: %s]", def);
    if (o->alias) fprintf(f, " (also --%s)", o->alias);
    fputc('\n', f);
  }
  fprintf(f, "  %-34s %s\n", "-h, --help", "print this help and exit");
}

int da_args_error(const da_cmdspec_t *cmd, const char *fmt, ...) {
  va_list ap;
  fprintf(stderr, "distattn %s: ", cmd->name);
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fputc('\n', stderr);
  da_args_usage(cmd, stderr);
  return DA_ARGS_USAGE;
}

/* ---- values ---- */

static int parse_int(const char *s, int64_t *out) {
  if (!*s) return -1;
  char *end = NULL;
  errno = 0;
  long long v = strtoll(s, &end, 10);
  if (errno || end == s || *end) return -1;
  *out = v;
  return 0;
}

/* A comma list of choices into bits; "all" selects every choice. */
static int parse_set(const da_opt_t *o, const char *s, unsigned *out, char *err, size_t en) {
  unsigned bits = 0;
  const char *p = s;
  if (!*s) {
    snprintf(err, en, "empty list");
    return -1;
  }
  while (*p) {
    const char *e = strchr(p, ',');
    size_t len = e ? (size_t)(e - p) : strlen(p);
    int found = -1;
    if (len == 3 && !strncmp(p, "all", 3)) {
      for (int i = 0; o->choices[i]; i++) bits |= 1u << i;
      found = 0;
    }
    for (int i = 0; found < 0 && o->choices[i]; i++)
      if (strlen(o->choices[i]) == len && !strncmp(p, o->choices[i], len)) {
        bits |= 1u << i;
        found = i;
      }
    if (found < 0) {
      char mv[160];
      snprintf(err, en, "unknown item '%.*s' (choose from %s or all)", (int)len, p, metavar(o, mv, sizeof mv));
      return -1;
    }
    if (!e) break;
    p = e + 1;
    if (!*p) {
      snprintf(err, en, "trailing comma");
      return -1;
    }
  }
  *out = bits;
  return 0;
}

/* Store value `v` into option `o`; on error a message (without the option name) into err. */
static int set_value(da_opt_t *o, const char *v, char *err, size_t en) {
  switch (o->type) {
    case DA_OPT_INT:
    case DA_OPT_SIZE: {
      int64_t x;
      int bad = o->type == DA_OPT_INT ? parse_int(v, &x) : da_parse_size(v, &x);
      if (bad) {
        /* da_parse_size refuses negatives; say "out of range" for those, not "malformed" */
        int64_t neg;
        if (o->type == DA_OPT_SIZE && v[0] == '-' && !parse_int(v, &neg)) {
          snprintf(err, en, "%s is out of range (must be >= %lld)", v, (long long)o->min);
          return -1;
        }
        snprintf(err, en, "'%s' is not %s", v,
                 o->type == DA_OPT_INT ? "an integer" : "a size (an integer with optional K/M/G suffix)");
        return -1;
      }
      int64_t lo = o->min, hi = o->max;
      if (lo == 0 && hi == 0) hi = INT64_MAX;
      if (x < lo || x > hi) {
        snprintf(err, en, "%s is out of range [%lld, %lld]", v, (long long)lo, (long long)hi);
        return -1;
      }
      *(int64_t *)o->dest = x;
      return 0;
    }
    case DA_OPT_DOUBLE: {
      char *end = NULL;
      errno = 0;
      double x = strtod(v, &end);
      if (errno || end == v || *end || !isfinite(x)) {
        snprintf(err, en, "'%s' is not a finite number", v);
        return -1;
      }
      if (!(o->dmin == 0 && o->dmax == 0) && (x < o->dmin || x > o->dmax)) {
        snprintf(err, en, "%s is out of range [%g, %g]", v, o->dmin, o->dmax);
        return -1;
      }
      if (o->dfloor > 0 && x > 0 && x < o->dfloor) {
        snprintf(err, en, "%s is below %g, the smallest value accepted (0 = the default)", v, o->dfloor);
        return -1;
      }
      *(double *)o->dest = x;
      return 0;
    }
    case DA_OPT_STRING:
      if (!*v) {
        snprintf(err, en, "empty value");
        return -1;
      }
      *(const char **)o->dest = v;
      return 0;
    case DA_OPT_FLAG: *(int *)o->dest = 1; return 0;
    case DA_OPT_ENUM:
      for (int i = 0; o->choices[i]; i++)
        if (!strcmp(v, o->choices[i])) {
          *(int *)o->dest = i;
          return 0;
        }
      {
        char mv[160];
        snprintf(err, en, "'%s' is not one of %s", v, metavar(o, mv, sizeof mv));
      }
      return -1;
    case DA_OPT_SET: return parse_set(o, v, (unsigned *)o->dest, err, en);
    case DA_OPT_MASK: return da_mask_parse(v, (da_mask_spec_t *)o->dest, err, en);
  }
  snprintf(err, en, "internal: unknown option type");
  return -1;
}

int da_args_parse(da_cmdspec_t *cmd, int argc, char **argv) {
  int i = 0;
  for (da_opt_t *o = cmd->opts; o->name && i < DA_MAX_OPTS; o++, i++) {
    da_args_format(o, defaults[i], DA_DEFAULT_LEN);
    o->given = 0;
  }
  defaults_of = cmd->opts;

  for (int a = 1; a < argc; a++) {
    const char *arg = argv[a];
    if (!strcmp(arg, "-h") || !strcmp(arg, "--help")) {
      da_args_usage(cmd, stdout);
      return DA_ARGS_HELP;
    }
    if (strncmp(arg, "--", 2) || !arg[2])
      return da_args_error(cmd, "unexpected argument '%s' (options start with --)", arg);
    char name[128];
    const char *eq = strchr(arg + 2, '=');
    size_t len = eq ? (size_t)(eq - arg - 2) : strlen(arg + 2);
    if (len >= sizeof name) return da_args_error(cmd, "unknown option '%s'", arg);
    memcpy(name, arg + 2, len);
    name[len] = '\0';
    da_opt_t *o = da_args_find(cmd->opts, name);
    if (!o) return da_args_error(cmd, "unknown option '--%s'", name);
    const char *val = NULL;
    if (o->type == DA_OPT_FLAG) {
      if (eq) return da_args_error(cmd, "--%s takes no value", o->name);
    } else if (eq) {
      val = eq + 1;
    } else {
      /* The next word is the value even when it starts with '-' (so "--seq -5" reports a range
       * error), unless it is another long option: then the value is missing. */
      if (a + 1 >= argc || !strncmp(argv[a + 1], "--", 2))
        return da_args_error(cmd, "--%s needs a value (%s)", o->name,
                             o->metavar ? o->metavar : "see below");
      val = argv[++a];
    }
    char err[256];
    if (set_value(o, val, err, sizeof err)) return da_args_error(cmd, "--%s: %s", o->name, err);
    o->given++;
  }
  return DA_ARGS_OK;
}

/* ---- masks ---- */

void da_mask_spec_free(da_mask_spec_t *m) {
  free(m->cu);
  memset(m, 0, sizeof *m);
}

int da_mask_parse(const char *spec, da_mask_spec_t *out, char *err, size_t en) {
  da_mask_spec_t r;
  memset(&r, 0, sizeof r);
  if (!spec || !*spec) {
    snprintf(err, en, "empty mask (use none, causal, window:W, doc:L1,L2,.. or a '+' combination)");
    return -1;
  }
  if (!strcmp(spec, "none")) goto done;
  const char *p = spec;
  unsigned seen = 0; /* terms given, apart from the flags they imply (window implies causal) */
  while (*p) {
    const char *e = strchr(p, '+');
    size_t len = e ? (size_t)(e - p) : strlen(p);
    char term[4096];
    if (len >= sizeof term) {
      snprintf(err, en, "mask term too long");
      goto fail;
    }
    memcpy(term, p, len);
    term[len] = '\0';
    if (!strcmp(term, "causal")) {
      if (seen & DA_MASK_CAUSAL) goto twice;
      seen |= DA_MASK_CAUSAL;
      r.mask.flags |= DA_MASK_CAUSAL;
    } else if (!strncmp(term, "window:", 7)) {
      if (seen & DA_MASK_WINDOW) goto twice;
      seen |= DA_MASK_WINDOW;
      int64_t w;
      if (da_parse_size(term + 7, &w) || w < 1) {
        snprintf(err, en, "window '%s': W must be a size >= 1", term + 7);
        goto fail;
      }
      r.mask.flags |= DA_MASK_WINDOW | DA_MASK_CAUSAL; /* window implies causal (mask.h) */
      r.mask.window = w;
    } else if (!strncmp(term, "doc:", 4)) {
      if (seen & DA_MASK_DOC) goto twice;
      seen |= DA_MASK_DOC;
      int64_t n = 1;
      for (const char *c = term + 4; *c; c++) n += (*c == ',');
      r.cu = malloc((size_t)(n + 1) * sizeof(int64_t));
      if (!r.cu) {
        snprintf(err, en, "out of memory for %lld documents", (long long)n);
        goto fail;
      }
      r.cu[0] = 0;
      char *save = NULL;
      int64_t i = 0;
      for (char *tok = strtok_r(term + 4, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        int64_t L;
        if (da_parse_size(tok, &L) || L < 1) {
          snprintf(err, en, "document length '%s' must be a size >= 1", tok);
          goto fail;
        }
        if (r.cu[i] > INT64_MAX - L) {
          snprintf(err, en, "document lengths overflow");
          goto fail;
        }
        r.cu[i + 1] = r.cu[i] + L;
        i++;
      }
      /* strtok_r merges empty fields ("doc:5,,6", "doc:"): refuse them */
      if (i != n) {
        snprintf(err, en, "doc lengths in '%s' have an empty entry", spec);
        goto fail;
      }
      r.mask.flags |= DA_MASK_DOC;
      r.mask.ndocs = n;
      r.mask.cu_seqlens = r.cu;
    } else if (!strcmp(term, "none")) {
      snprintf(err, en, "'none' cannot be combined with other mask terms");
      goto fail;
    } else {
      snprintf(err, en, "unknown mask '%s' (use none, causal, window:W, doc:L1,L2,.. or a '+' combination)",
               term);
      goto fail;
    }
    if (!e) break;
    p = e + 1;
    if (!*p) {
      snprintf(err, en, "mask '%s' ends with '+'", spec);
      goto fail;
    }
    continue;
  twice:
    snprintf(err, en, "mask term '%s' given twice", term);
    goto fail;
  }
done:
  da_mask_spec_free(out);
  *out = r;
  return 0;
fail:
  free(r.cu);
  return -1;
}
