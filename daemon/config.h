/*
 * config.h: lightmoed's configuration, one struct filled from a table.
 *
 * Sources, later wins: built-in defaults, the file (key = value, '#'
 * comments; /etc/lightmoe/lightmoed.conf unless --config), command-line
 * flags (`--key-name VALUE` or `--key-name=VALUE` for every key, dashes or
 * underscores). Unknown keys and bad values are errors naming the file and
 * line (or the flag). Every key is documented in deploy/lightmoed.conf and
 * in config_table[] (config.c), which is the one list of keys.
 *
 * Reload (SIGHUP): the file is read again into a fresh struct, the same
 * flags are applied on top, and dconf_apply_reload copies the keys marked
 * reloadable; any other key that changed is logged and left as it was.
 *
 * The struct is plain data (fixed arrays), so copying it is a struct
 * assignment. Not thread-safe: the main thread owns it; other threads read
 * the values they need through the modules that took them (serve, rpc).
 */
#ifndef LIGHTMOE_DAEMON_CONFIG_H
#define LIGHTMOE_DAEMON_CONFIG_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#define CONFIG_STR_MAX 512
#define CONFIG_DEFAULT_PATH "/etc/lightmoe/lightmoed.conf"

typedef struct daemon_config {
    /* model and device */
    char model[CONFIG_STR_MAX];
    char device[16];
    int quantize_int4;
    int64_t threads;
    int64_t sample_threads;             /* host sampling threads (sched_config) */
    int64_t tensor_parallel;            /* ranks (flag --tp N too) */
    char devices[CONFIG_STR_MAX];       /* "0,1": CUDA device of each rank; "" = 0..tp-1 */
    /* network */
    char listen[CONFIG_STR_MAX];
    char metrics_listen[CONFIG_STR_MAX];
    int64_t rpc_threads;
    int64_t rpc_queues;
    /* security */
    char tls_cert[CONFIG_STR_MAX];
    char tls_key[CONFIG_STR_MAX];
    char tls_client_ca[CONFIG_STR_MAX];
    char auth_token_file[CONFIG_STR_MAX];
    /* limits */
    int64_t max_message_bytes;
    int64_t max_prompt_tokens;
    int64_t max_tokens_limit;
    int64_t default_max_tokens;
    int64_t max_concurrent_streams;
    int64_t max_queue;
    int64_t max_batch;
    int64_t kv_cache_mb;
    /* lifecycle */
    double drain_grace_seconds;
    char log_level[16];
    /* exact-answer cache (used by the cache module) */
    char cache_url[CONFIG_STR_MAX];
    char cache_prefix[128];
    int64_t cache_ttl_seconds;
    int64_t cache_max_ttl_seconds;
    int64_t cache_max_value_bytes;
    int64_t cache_max_mb;
    int64_t cache_timeout_ms;
    int64_t cache_readers;
    /* test hooks */
    int debug_hooks;
    int64_t debug_load_delay_ms;
    int64_t debug_step_delay_ms;
} daemon_config;

/* Fill with the built-in defaults. */
void dconf_defaults(daemon_config *cfg);

/* Set one key from text. `where` ("FILE:LINE" or "--flag") prefixes the
 * message written into errbuf on failure. Returns 0 or -EINVAL/-ENOENT. */
int dconf_set(daemon_config *cfg, const char *key, const char *value, const char *where,
               char *errbuf, size_t errlen);

/* Read a key = value file. -ENOENT if it does not exist (message says so). */
int dconf_load_file(daemon_config *cfg, const char *path, char *errbuf, size_t errlen);

/* Checks across keys and on the files named (readable TLS files, a model
 * folder with config.json, a token file with at least one token). */
int dconf_validate(const daemon_config *cfg, char *errbuf, size_t errlen);

/* Copy the reloadable keys of `fresh` into `live`; log (warn) each other
 * key that differs and keep its live value; log (info) each change made.
 * Returns the number of keys changed. */
int dconf_apply_reload(daemon_config *live, const daemon_config *fresh);

/* Print every key with its value, one "key = value" line (for --check-config). */
void dconf_dump(const daemon_config *cfg, FILE *f);

/* Write the list of keys with their help lines (for --help). */
void dconf_usage(FILE *f);

/* Parse "0,1,..." into ret_ids[0..max) (ret_ids may be NULL to count);
 * -EINVAL with a message naming the key otherwise. */
int dconf_parse_devices(const char *s, int *ret_ids, int max, int *ret_n, char *errbuf,
                        size_t errlen);

#endif
