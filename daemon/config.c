/*
 * config.c: the table of configuration keys and its parser (see config.h).
 *
 * Every key is one row of config_table: its type, where it lives in the
 * struct, its range, whether SIGHUP may change it, its default (parsed by
 * the same code as any value, so defaults cannot escape validation) and a
 * help line. Adding a key is adding a row and a struct field.
 */
#include "daemon/config.h"

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cache/cache.h"
#include "daemon/log.h"

typedef enum ctype_ { CT_STR, CT_INT, CT_DOUBLE, CT_BOOL, CT_ENUM } ctype_;

typedef struct config_key {
    const char *name;
    ctype_ type;
    size_t offset;
    size_t size;            /* CT_STR/CT_ENUM: buffer size */
    double min, max;        /* CT_INT/CT_DOUBLE */
    const char *choices;    /* CT_ENUM: "a|b|c" */
    int reloadable;
    const char *def;
    const char *help;
} config_key;

#define OFF(f) offsetof(daemon_config, f), sizeof(((daemon_config *)0)->f)

static const config_key config_table[] = {
    {"model", CT_STR, OFF(model), 0, 0, NULL, 0, "",
     "folder of the model (config.json, *.safetensors, tokenizer.json)"},
    {"device", CT_ENUM, OFF(device), 0, 0, "cpu|cuda", 0, "cpu", "compute backend"},
    {"quantize_int4", CT_BOOL, OFF(quantize_int4), 0, 0, NULL, 0, "no",
     "quantize 16-bit checkpoints to INT4 at load (round to nearest; GPTQ checkpoints are "
     "INT4 already)"},
    {"threads", CT_INT, OFF(threads), 0, 1024, NULL, 0, "0",
     "CPU backend threads; 0 = every core"},
    {"sample_threads", CT_INT, OFF(sample_threads), 0, 256, NULL, 0, "0",
     "threads that sample a step's tokens on the host, the engine thread included; "
     "0 = min(8, CPU cores), 1 = the engine thread alone"},
    {"tensor_parallel", CT_INT, OFF(tensor_parallel), 1, 64, NULL, 0, "1",
     "tensor-parallel ranks (also --tp N): attention heads and expert widths split across "
     "them; cpu: threads of one process over a host communicator"},
    {"devices", CT_STR, OFF(devices), 0, 0, NULL, 0, "",
     "cuda: device id of each rank, comma-separated (\"0,1\"); empty = 0..tensor_parallel-1"},
    {"listen", CT_STR, OFF(listen), 0, 0, NULL, 0, "127.0.0.1:50051",
     "gRPC address: HOST:PORT, [V6]:PORT or unix:/PATH (port 0 picks a free one)"},
    {"metrics_listen", CT_STR, OFF(metrics_listen), 0, 0, NULL, 0, "127.0.0.1:9464",
     "Prometheus HTTP address HOST:PORT; empty turns metrics off"},
    {"rpc_threads", CT_INT, OFF(rpc_threads), 0, 64, NULL, 0, "0",
     "threads serving gRPC calls; 0 = one per CPU core (at least 2)"},
    {"rpc_queues", CT_INT, OFF(rpc_queues), 0, 64, NULL, 0, "1",
     "gRPC completion queues the rpc threads are spread over; 0 = one per thread"},
    {"tls_cert", CT_STR, OFF(tls_cert), 0, 0, NULL, 0, "",
     "PEM server certificate chain; with tls_key turns TLS on"},
    {"tls_key", CT_STR, OFF(tls_key), 0, 0, NULL, 0, "", "PEM private key of tls_cert"},
    {"tls_client_ca", CT_STR, OFF(tls_client_ca), 0, 0, NULL, 0, "",
     "PEM CA bundle; when set clients must present a certificate it signed (mTLS)"},
    {"auth_token_file", CT_STR, OFF(auth_token_file), 0, 0, NULL, 1, "",
     "file of bearer tokens, one per line; when set every call but health needs "
     "'authorization: Bearer TOKEN' (re-read on SIGHUP)"},
    {"max_message_bytes", CT_INT, OFF(max_message_bytes), 1024, 1 << 30, NULL, 0, "4194304",
     "largest request message accepted (bigger ones get RESOURCE_EXHAUSTED)"},
    {"max_prompt_tokens", CT_INT, OFF(max_prompt_tokens), 0, 1 << 24, NULL, 1, "0",
     "longest prompt in tokens; 0 = the model's context length"},
    {"max_tokens_limit", CT_INT, OFF(max_tokens_limit), 1, 1 << 24, NULL, 1, "4096",
     "largest max_tokens a request may ask for"},
    {"default_max_tokens", CT_INT, OFF(default_max_tokens), 1, 1 << 24, NULL, 1, "256",
     "max_tokens of requests that do not set it"},
    {"max_concurrent_streams", CT_INT, OFF(max_concurrent_streams), 1, 100000, NULL, 1, "256",
     "Generate/Complete calls in progress at once; more get RESOURCE_EXHAUSTED"},
    {"max_queue", CT_INT, OFF(max_queue), 1, 100000, NULL, 0, "256",
     "requests waiting for the batch before RESOURCE_EXHAUSTED"},
    {"max_batch", CT_INT, OFF(max_batch), 1, 4096, NULL, 0, "64",
     "sequences decoded together in one step"},
    {"kv_cache_mb", CT_INT, OFF(kv_cache_mb), 0, 1 << 24, NULL, 0, "0",
     "KV cache size in MiB; 0 = cuda: 90% of the GPU memory left after the weights, "
     "cpu: 1024"},
    {"drain_grace_seconds", CT_DOUBLE, OFF(drain_grace_seconds), 0, 3600, NULL, 1, "30",
     "on SIGTERM, time running streams get to finish before they are cancelled"},
    {"log_level", CT_ENUM, OFF(log_level), 0, 0, "error|warn|info|debug", 1, "info",
     "least severe level written to stderr"},
    {"cache_url", CT_STR, OFF(cache_url), 0, 0, NULL, 0, "memory",
     "exact-answer cache: memory (in-process LRU), off, redis://[USER:PASS@]HOST:PORT/DB or "
     "unix:///PATH[?db=N&user=U&password=P]"},
    {"cache_prefix", CT_STR, OFF(cache_prefix), 0, 0, NULL, 0, "lightmoe:",
     "prefix of every cache key (several deployments can share one Redis)"},
    {"cache_ttl_seconds", CT_INT, OFF(cache_ttl_seconds), 1, 1e9, NULL, 0, "3600",
     "default lifetime of a cached answer"},
    {"cache_max_ttl_seconds", CT_INT, OFF(cache_max_ttl_seconds), 1, 1e9, NULL, 0, "86400",
     "cap on the lifetime a request may ask for (cache_ttl_seconds)"},
    {"cache_max_value_bytes", CT_INT, OFF(cache_max_value_bytes), 64, 1 << 30, NULL, 0,
     "1048576", "answers larger than this (encoded) are not stored"},
    {"cache_max_mb", CT_INT, OFF(cache_max_mb), 1, 1 << 20, NULL, 0, "256",
     "size bound of the in-process cache (cache_url = memory)"},
    {"cache_timeout_ms", CT_INT, OFF(cache_timeout_ms), 1, 60000, NULL, 0, "50",
     "longest wait for one Redis operation (also bounded by the request's deadline) before "
     "answering from the model"},
    {"cache_readers", CT_INT, OFF(cache_readers), 0, 32, NULL, 0, "0",
     "Redis: threads that send lookups and answer hits (each its own connection), and as many "
     "that answer identical requests; 0 = one per 8 CPU cores, 1..4"},
    {"debug_hooks", CT_BOOL, OFF(debug_hooks), 0, 0, NULL, 0, "no",
     "TESTS ONLY: SIGUSR1 stalls the engine loop, SIGUSR2 resumes it"},
    {"debug_load_delay_ms", CT_INT, OFF(debug_load_delay_ms), 0, 600000, NULL, 0, "0",
     "TESTS ONLY (needs debug_hooks): stay in the loading state this long"},
    {"debug_step_delay_ms", CT_INT, OFF(debug_step_delay_ms), 0, 10000, NULL, 0, "0",
     "TESTS ONLY (needs debug_hooks): sleep this long after every engine step"},
};
#define N_KEYS (sizeof config_table / sizeof config_table[0])

static int fail(char *errbuf, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int fail(char *errbuf, size_t errlen, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(errbuf, errlen, fmt, ap);
    va_end(ap);
    return -EINVAL;
}

static const config_key *find_key(const char *name)
{
    char norm[64];
    size_t i = 0;
    for (; name[i] && i < sizeof norm - 1; i++)
        norm[i] = name[i] == '-' ? '_' : name[i];
    norm[i] = 0;
    for (size_t k = 0; k < N_KEYS; k++)
        if (!strcmp(config_table[k].name, norm))
            return &config_table[k];
    return NULL;
}

static int parse_bool(const char *v, int *ret)
{
    static const char *const yes[] = {"yes", "true", "on", "1"};
    static const char *const no[] = {"no", "false", "off", "0"};
    for (int i = 0; i < 4; i++) {
        if (!strcasecmp(v, yes[i]))
            return *ret = 1, 0;
        if (!strcasecmp(v, no[i]))
            return *ret = 0, 0;
    }
    return -EINVAL;
}

static int set_key(daemon_config *cfg, const config_key *k, const char *value, const char *where,
                   char *errbuf, size_t errlen)
{
    char *field = (char *)cfg + k->offset;
    switch (k->type) {
    case CT_STR:
        if (strlen(value) >= k->size)
            return fail(errbuf, errlen, "%s: %s: value longer than %zu bytes", where, k->name,
                        k->size - 1);
        strcpy(field, value);
        return 0;
    case CT_ENUM: {
        size_t n = strlen(value);
        for (const char *c = k->choices; *c;) {
            const char *bar = strchr(c, '|');
            size_t len = bar ? (size_t)(bar - c) : strlen(c);
            if (len == n && !strncmp(c, value, n) && n < k->size) {
                strcpy(field, value);
                return 0;
            }
            c += len + (bar != NULL);
        }
        return fail(errbuf, errlen, "%s: %s: '%s' is not one of %s", where, k->name, value,
                    k->choices);
    }
    case CT_INT: {
        char *end;
        errno = 0;
        long long v = strtoll(value, &end, 10);
        if (!*value || *end || errno || v < k->min || v > k->max)
            return fail(errbuf, errlen, "%s: %s: '%s' is not an integer in [%.0f, %.0f]", where,
                        k->name, value, k->min, k->max);
        *(int64_t *)field = v;
        return 0;
    }
    case CT_DOUBLE: {
        char *end;
        errno = 0;
        double v = strtod(value, &end);
        if (!*value || *end || errno || !isfinite(v) || v < k->min || v > k->max)
            return fail(errbuf, errlen, "%s: %s: '%s' is not a number in [%g, %g]", where,
                        k->name, value, k->min, k->max);
        *(double *)field = v;
        return 0;
    }
    case CT_BOOL:
        if (parse_bool(value, (int *)field))
            return fail(errbuf, errlen, "%s: %s: '%s' is not yes or no", where, k->name, value);
        return 0;
    }
    return -EINVAL;
}

void dconf_defaults(daemon_config *cfg)
{
    char err[256];
    memset(cfg, 0, sizeof *cfg);
    for (size_t k = 0; k < N_KEYS; k++)
        if (set_key(cfg, &config_table[k], config_table[k].def, "default", err, sizeof err))
            abort(); /* a bad default is a bug in the table */
}

int dconf_set(daemon_config *cfg, const char *key, const char *value, const char *where,
               char *errbuf, size_t errlen)
{
    const config_key *k = find_key(key);
    if (!k) {
        snprintf(errbuf, errlen, "%s: unknown key '%s' (lightmoed --help lists the keys)", where,
                 key);
        return -ENOENT;
    }
    return set_key(cfg, k, value, where, errbuf, errlen);
}

static char *trim(char *s)
{
    while (isspace((unsigned char)*s))
        s++;
    size_t n = strlen(s);
    while (n && isspace((unsigned char)s[n - 1]))
        s[--n] = 0;
    return s;
}

int dconf_load_file(daemon_config *cfg, const char *path, char *errbuf, size_t errlen)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        int e = errno;
        snprintf(errbuf, errlen, "%s: cannot open: %s", path, strerror(e));
        return -e;
    }
    char line[4096], where[600];
    int lineno = 0, rc = 0;
    while (fgets(line, sizeof line, f)) {
        lineno++;
        snprintf(where, sizeof where, "%s:%d", path, lineno);
        if (!strchr(line, '\n') && !feof(f)) {
            rc = fail(errbuf, errlen, "%s: line longer than %zu bytes", where, sizeof line - 2);
            break;
        }
        char *s = trim(line);
        if (!*s || *s == '#')
            continue;
        char *eq = strchr(s, '=');
        if (!eq) {
            rc = fail(errbuf, errlen, "%s: expected 'key = value', got '%s'", where, s);
            break;
        }
        *eq = 0;
        char *key = trim(s), *val = trim(eq + 1);
        size_t vn = strlen(val);
        if (vn >= 2 && val[0] == '"' && val[vn - 1] == '"') {
            val[vn - 1] = 0;
            val++;
        }
        if ((rc = dconf_set(cfg, key, val, where, errbuf, errlen)))
            break;
    }
    fclose(f);
    return rc;
}

static int check_readable(const char *key, const char *path, char *errbuf, size_t errlen)
{
    if (access(path, R_OK))
        return fail(errbuf, errlen, "%s: cannot read '%s': %s", key, path, strerror(errno));
    return 0;
}

int dconf_parse_devices(const char *s, int *ret_ids, int max, int *ret_n, char *errbuf,
                        size_t errlen)
{
    int n = 0;
    const char *p = s;
    while (*p) {
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (end == p || errno || v < 0 || v > 255 || (*end && *end != ','))
            return fail(errbuf, errlen, "devices: '%s' is not a comma-separated list of device "
                        "ids (e.g. 0,1)", s);
        if (n >= max)
            return fail(errbuf, errlen, "devices: more than %d ids", max);
        if (ret_ids)
            ret_ids[n] = (int)v;
        n++;
        p = *end ? end + 1 : end;
    }
    *ret_n = n;
    return 0;
}

int dconf_validate(const daemon_config *cfg, char *errbuf, size_t errlen)
{
    int rc;
    if (!cfg->model[0])
        return fail(errbuf, errlen, "model: no model folder given (--model DIR or model = DIR)");
    char p[CONFIG_STR_MAX + 32];
    snprintf(p, sizeof p, "%s/config.json", cfg->model);
    if ((rc = check_readable("model", p, errbuf, errlen)))
        return rc;
    if (cfg->devices[0]) {
        int n = 0;
        if ((rc = dconf_parse_devices(cfg->devices, NULL, 64, &n, errbuf, errlen)))
            return rc;
        if (n != cfg->tensor_parallel)
            return fail(errbuf, errlen,
                        "devices: %d device ids given for tensor_parallel = %lld (one per rank)", n,
                        (long long)cfg->tensor_parallel);
    }
    if (!cfg->listen[0])
        return fail(errbuf, errlen, "listen: empty address");
    if (strncmp(cfg->listen, "unix:", 5) && !strrchr(cfg->listen, ':'))
        return fail(errbuf, errlen, "listen: '%s' is not HOST:PORT or unix:/PATH", cfg->listen);
    if (cfg->metrics_listen[0] && !strrchr(cfg->metrics_listen, ':'))
        return fail(errbuf, errlen, "metrics_listen: '%s' is not HOST:PORT", cfg->metrics_listen);
    if (!cfg->tls_cert[0] != !cfg->tls_key[0])
        return fail(errbuf, errlen, "tls_cert and tls_key: set both (TLS) or neither");
    if (cfg->tls_client_ca[0] && !cfg->tls_cert[0])
        return fail(errbuf, errlen, "tls_client_ca: mutual TLS needs tls_cert and tls_key too");
    if (cfg->tls_cert[0] && ((rc = check_readable("tls_cert", cfg->tls_cert, errbuf, errlen)) ||
                             (rc = check_readable("tls_key", cfg->tls_key, errbuf, errlen))))
        return rc;
    if (cfg->tls_client_ca[0] &&
        (rc = check_readable("tls_client_ca", cfg->tls_client_ca, errbuf, errlen)))
        return rc;
    if (cfg->auth_token_file[0] &&
        (rc = check_readable("auth_token_file", cfg->auth_token_file, errbuf, errlen)))
        return rc;
    if (cfg->default_max_tokens > cfg->max_tokens_limit)
        return fail(errbuf, errlen, "default_max_tokens (%" PRId64 ") exceeds max_tokens_limit (%"
                    PRId64 ")", cfg->default_max_tokens, cfg->max_tokens_limit);
    cache_url cu;
    lm_err cerr = {0};
    if (cache_url_parse(cfg->cache_url, &cu, &cerr))
        return fail(errbuf, errlen, "cache_url: %s", cerr.msg);
    if (cfg->cache_ttl_seconds > cfg->cache_max_ttl_seconds)
        return fail(errbuf, errlen, "cache_ttl_seconds (%" PRId64 ") exceeds "
                    "cache_max_ttl_seconds (%" PRId64 ")", cfg->cache_ttl_seconds,
                    cfg->cache_max_ttl_seconds);
    if ((cfg->debug_load_delay_ms || cfg->debug_step_delay_ms) && !cfg->debug_hooks)
        return fail(errbuf, errlen, "debug_load_delay_ms, debug_step_delay_ms: need debug_hooks "
                    "= yes");
    return 0;
}

static void format_value(const daemon_config *cfg, const config_key *k, char *buf, size_t n)
{
    const char *field = (const char *)cfg + k->offset;
    switch (k->type) {
    case CT_STR:
    case CT_ENUM:
        snprintf(buf, n, "%s", field);
        break;
    case CT_INT:
        snprintf(buf, n, "%" PRId64, *(const int64_t *)field);
        break;
    case CT_DOUBLE:
        snprintf(buf, n, "%g", *(const double *)field);
        break;
    case CT_BOOL:
        snprintf(buf, n, "%s", *(const int *)field ? "yes" : "no");
        break;
    }
}

int dconf_apply_reload(daemon_config *live, const daemon_config *fresh)
{
    int changed = 0;
    for (size_t i = 0; i < N_KEYS; i++) {
        const config_key *k = &config_table[i];
        if (!memcmp((const char *)live + k->offset, (const char *)fresh + k->offset, k->size))
            continue;
        char a[CONFIG_STR_MAX], b[CONFIG_STR_MAX];
        format_value(live, k, a, sizeof a);
        format_value(fresh, k, b, sizeof b);
        if (k->reloadable) {
            memcpy((char *)live + k->offset, (const char *)fresh + k->offset, k->size);
            log_info("reload: %s: '%s' -> '%s'", k->name, a, b);
            changed++;
        } else {
            log_warn("reload: %s: changed to '%s' but needs a restart; keeping '%s'", k->name, b,
                     a);
        }
    }
    return changed;
}

void dconf_dump(const daemon_config *cfg, FILE *f)
{
    char v[CONFIG_STR_MAX];
    for (size_t i = 0; i < N_KEYS; i++) {
        format_value(cfg, &config_table[i], v, sizeof v);
        fprintf(f, "%s = %s\n", config_table[i].name, v);
    }
}

void dconf_usage(FILE *f)
{
    for (size_t i = 0; i < N_KEYS; i++) {
        const config_key *k = &config_table[i];
        char flag[64];
        size_t j = 0;
        for (; k->name[j] && j < sizeof flag - 1; j++)
            flag[j] = k->name[j] == '_' ? '-' : k->name[j];
        flag[j] = 0;
        fprintf(f, "  --%-24s %s (default '%s'%s)\n", flag, k->help, k->def,
                k->reloadable ? "; SIGHUP reloads it" : "");
    }
}
