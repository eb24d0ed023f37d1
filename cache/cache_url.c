/*
 * cache_url.c: parsing of --cache-url values (see cache_url_parse in
 * cache.h). Every refusal says what part of the URL was wrong, because
 * the message ends up in front of an operator who typed it.
 */
#include <ctype.h>
#include <stdlib.h>
#include <string.h>

#include "cache/cache_internal.h"

static int hexval(int ch)
{
    if (ch >= '0' && ch <= '9')
        return ch - '0';
    ch = tolower(ch);
    if (ch >= 'a' && ch <= 'f')
        return ch - 'a' + 10;
    return -1;
}

/* Copy s[0..n) into out (cap bytes) decoding %XX; -1 if bad or too long. */
static int pct_decode(const char *s, size_t n, char *out, size_t cap)
{
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        int ch = (unsigned char)s[i];
        if (ch == '%') {
            if (i + 2 >= n)
                return -1;
            int h = hexval(s[i + 1]), l = hexval(s[i + 2]);
            if (h < 0 || l < 0)
                return -1;
            ch = h * 16 + l;
            i += 2;
        }
        if (ch == 0 || o + 1 >= cap)
            return -1;
        out[o++] = (char)ch;
    }
    out[o] = '\0';
    return 0;
}

/* Parse a decimal in [lo, hi] from s[0..n). */
static int parse_int(const char *s, size_t n, long lo, long hi, int *ret)
{
    if (n == 0 || n > 10)
        return -1;
    long v = 0;
    for (size_t i = 0; i < n; i++) {
        if (!isdigit((unsigned char)s[i]))
            return -1;
        v = v * 10 + (s[i] - '0');
    }
    if (v < lo || v > hi)
        return -1;
    *ret = (int)v;
    return 0;
}

static int parse_userinfo(const char *s, size_t n, cache_url *u, const char *url, lm_err *err)
{
    const char *colon = memchr(s, ':', n);
    size_t ulen = colon ? (size_t)(colon - s) : n;
    if (pct_decode(s, ulen, u->user, sizeof u->user))
        return lm_err_set(err, -EINVAL, "cache URL '%s': bad or too long user name", url);
    if (colon) {
        if (pct_decode(colon + 1, n - ulen - 1, u->password, sizeof u->password))
            return lm_err_set(err, -EINVAL, "cache URL '%s': bad or too long password", url);
    } else if (ulen) {
        /* redis://secret@host: Redis' own clients read a lone userinfo as the password. */
        memcpy(u->password, u->user, strlen(u->user) + 1); /* user[] is the shorter one */
        u->user[0] = '\0';
    }
    if (u->user[0] && !u->password[0])
        return lm_err_set(err, -EINVAL, "cache URL '%s': user '%s' given without a password", url,
                          u->user);
    return 0;
}

static int parse_query(const char *q, cache_url *u, const char *url, lm_err *err)
{
    while (*q) {
        const char *amp = strchr(q, '&');
        size_t n = amp ? (size_t)(amp - q) : strlen(q);
        const char *eq = memchr(q, '=', n);
        if (!eq)
            return lm_err_set(err, -EINVAL, "cache URL '%s': query item '%.*s' is not name=value",
                              url, (int)n, q);
        size_t kn = (size_t)(eq - q), vn = n - kn - 1;
        const char *v = eq + 1;
        if (kn == 2 && !memcmp(q, "db", 2)) {
            if (parse_int(v, vn, 0, INT32_MAX, &u->db))
                return lm_err_set(err, -EINVAL, "cache URL '%s': db must be a number >= 0", url);
        } else if (kn == 4 && !memcmp(q, "user", 4)) {
            if (pct_decode(v, vn, u->user, sizeof u->user))
                return lm_err_set(err, -EINVAL, "cache URL '%s': bad or too long user", url);
        } else if (kn == 8 && !memcmp(q, "password", 8)) {
            if (pct_decode(v, vn, u->password, sizeof u->password))
                return lm_err_set(err, -EINVAL, "cache URL '%s': bad or too long password", url);
        } else {
            return lm_err_set(err, -EINVAL,
                              "cache URL '%s': unknown query item '%.*s' (db, user, password)",
                              url, (int)kn, q);
        }
        q += n + (amp ? 1 : 0);
    }
    if (u->user[0] && !u->password[0])
        return lm_err_set(err, -EINVAL, "cache URL '%s': user given without a password", url);
    return 0;
}

static int parse_redis(const char *url, const char *rest, cache_url *u, lm_err *err)
{
    u->kind = CACHE_BACKEND_REDIS;
    u->port = 6379;
    /* authority ends at the first '/' (after userinfo, which may hold '/' only escaped). */
    const char *at = NULL;
    const char *end = rest + strcspn(rest, "/?#");
    for (const char *p = rest; p < end; p++)
        if (*p == '@')
            at = p; /* last '@': passwords may contain '@' only if escaped, but be lenient */
    if (*end == '?' || *end == '#')
        return lm_err_set(err, -EINVAL,
                          "cache URL '%s': query strings and fragments are not supported for "
                          "redis:// (use /DB for the database)", url);
    const char *hp = rest;
    if (at) {
        int rc = parse_userinfo(rest, (size_t)(at - rest), u, url, err);
        if (rc)
            return rc;
        hp = at + 1;
    }
    size_t hn = (size_t)(end - hp);
    const char *port = NULL;
    if (hn && hp[0] == '[') {
        const char *rb = memchr(hp, ']', hn);
        if (!rb)
            return lm_err_set(err, -EINVAL, "cache URL '%s': '[' without ']' in the host", url);
        if ((size_t)(rb - hp - 1) >= sizeof u->host || rb == hp + 1)
            return lm_err_set(err, -EINVAL, "cache URL '%s': bad IPv6 host", url);
        memcpy(u->host, hp + 1, (size_t)(rb - hp - 1));
        u->host[rb - hp - 1] = '\0';
        if (rb + 1 < end) {
            if (rb[1] != ':')
                return lm_err_set(err, -EINVAL, "cache URL '%s': junk after ']'", url);
            port = rb + 2;
        }
    } else {
        const char *colon = memchr(hp, ':', hn);
        size_t n = colon ? (size_t)(colon - hp) : hn;
        if (n == 0)
            return lm_err_set(err, -EINVAL, "cache URL '%s': no host (redis://host:port/db)", url);
        if (n >= sizeof u->host)
            return lm_err_set(err, -EINVAL, "cache URL '%s': host name too long", url);
        for (size_t i = 0; i < n; i++)
            if (!(isalnum((unsigned char)hp[i]) || hp[i] == '.' || hp[i] == '-' || hp[i] == '_'))
                return lm_err_set(err, -EINVAL, "cache URL '%s': bad character '%c' in host", url,
                                  hp[i]);
        memcpy(u->host, hp, n);
        u->host[n] = '\0';
        if (colon)
            port = colon + 1;
    }
    if (port && parse_int(port, (size_t)(end - port), 1, 65535, &u->port))
        return lm_err_set(err, -EINVAL, "cache URL '%s': port must be a number in 1..65535", url);
    if (*end == '/' && end[1]) {
        if (parse_int(end + 1, strlen(end + 1), 0, INT32_MAX, &u->db))
            return lm_err_set(err, -EINVAL, "cache URL '%s': database '%s' is not a number >= 0",
                              url, end + 1);
    }
    return 0;
}

static int parse_unix(const char *url, const char *rest, cache_url *u, lm_err *err)
{
    u->kind = CACHE_BACKEND_REDIS_UNIX;
    if (rest[0] != '/')
        return lm_err_set(err, -EINVAL,
                          "cache URL '%s': the socket path must be absolute (unix:///path)", url);
    const char *q = strchr(rest, '?');
    size_t n = q ? (size_t)(q - rest) : strlen(rest);
    if (n >= sizeof u->path)
        return lm_err_set(err, -EINVAL, "cache URL '%s': socket path longer than %zu bytes", url,
                          sizeof u->path - 1);
    if (n == 1)
        return lm_err_set(err, -EINVAL, "cache URL '%s': no socket path", url);
    memcpy(u->path, rest, n);
    u->path[n] = '\0';
    return q ? parse_query(q + 1, u, url, err) : 0;
}

int cache_url_parse(const char *s, cache_url *ret, lm_err *err)
{
    cache_url u;
    memset(&u, 0, sizeof u);
    if (!s || !*s || !strcmp(s, "memory")) {
        u.kind = CACHE_BACKEND_MEMORY;
    } else if (!strcmp(s, "off")) {
        u.kind = CACHE_BACKEND_OFF;
    } else if (!strncmp(s, "redis://", 8)) {
        int rc = parse_redis(s, s + 8, &u, err);
        if (rc)
            return rc;
    } else if (!strncmp(s, "unix://", 7)) {
        int rc = parse_unix(s, s + 7, &u, err);
        if (rc)
            return rc;
    } else if (!strncmp(s, "rediss://", 9)) {
        return lm_err_set(err, -EINVAL,
                          "cache URL '%s': TLS to Redis (rediss://) is not supported by hiredis "
                          "0.14; use a local unix socket or a TLS tunnel", s);
    } else {
        return lm_err_set(err, -EINVAL,
                          "cache URL '%s': expected 'memory', 'off', "
                          "'redis://[user:pass@]host:port/db' or 'unix:///path'", s);
    }
    *ret = u;
    return 0;
}
