/*
 * cache_hooks.h: lightmoed's glue to the exact-answer cache (cache/cache.h).
 *
 * cache_hooks_install builds the cache from the cache_* configuration keys
 * and installs serve's cache hooks (serve.h): lookup before the engine
 * (with single flight: concurrent identical misses wait for one leader),
 * store after a completed generation (queued to a writer thread: the engine
 * thread never waits for Redis), invalidation for the InvalidateCache RPC.
 * The model fingerprint (cache_fingerprint_dir over the model folder) is
 * part of every key. State changes of the backend (Redis down / back) are
 * logged once each; lookups never fail a request (fail open).
 *
 * Threads: install/uninstall on the main thread; the hooks on RPC and
 * engine threads as serve.h says.
 */
#ifndef LIGHTMOE_DAEMON_CACHE_HOOKS_H
#define LIGHTMOE_DAEMON_CACHE_HOOKS_H

#include <stddef.h>

#include "cache/cache.h"
#include "daemon/config.h"
#include "daemon/serve.h"

/* Create the cache (unless cache_url = off) and install its hooks into s.
 * 0, or -EINVAL/-ENOENT with a message (bad URL, unreadable model folder). */
int cache_hooks_install(serve *s, const daemon_config *cfg, char *err, size_t errlen);

/* Reader threads of a Redis-backed cache: cache_readers, or when 0 one per
 * CACHE_READERS_AUTO_DIV online CPUs, at least 1 and at most
 * CACHE_READERS_AUTO_MAX (an explicit value is capped at 32). */
#define CACHE_READERS_AUTO_DIV 8
#define CACHE_READERS_AUTO_MAX 4
int cache_hooks_readers(const daemon_config *cfg);

/* Statistics of the installed cache; 0 if none (off). For metrics. */
int cache_hooks_stats(cache_stats *ret);

/* The cache's Prometheus lines (malloc'ed text, caller frees), NULL when the
 * cache is off. Names: lightmoe_cache_{up, errors_total, timeouts_total,
 * corrupt_total, unavailable_total, read_bytes_total, written_bytes_total,
 * lookup_seconds (summary: _sum, _count), store_seconds, single_flight_
 * waits_total, state_changes_total, memory_bytes, entries, evictions_total,
 * lookups_total{result="hit|miss"}, reader_lookups_total{reader="I"} (Redis:
 * lookups sent by each reader thread)}. */
char *cache_hooks_metrics_text(void);

#endif
