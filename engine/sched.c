/*
 * sched.c: the continuous-batching engine thread (see sched.h).
 *
 * Request life: sched_submit validates and copies the request into one
 * per-request allocation (struct seq + its token, block-table and hash
 * arrays), links it on the `live` list (for cancel) and the inbox, and
 * wakes the engine thread. The engine thread moves the inbox to `waiting`
 * (sorted by id = arrival order), admits from its head (FCFS: never skips
 * the head, so nothing starves), runs steps over `running` (also in id
 * order), and finishes requests: releases their blocks, unlinks them from
 * `live` under the lock, sends FINISHED, frees them.
 *
 * A step: (1) drop cancelled and expired requests; (2) plan, within the
 * controller's token budget and batch limit: first every decoding
 * sequence, oldest first, gets its one token (if its blocks cannot be had,
 * the newest running sequence is preempted: blocks released, back to
 * waiting, to be recomputed from prompt + output so far); then prefilling
 * sequences get min(rest, prefill_chunk, budget left) tokens; then waiting
 * requests are admitted while the batch limit, the budget and the blocks
 * allow, after taking what they can from the prefix cache; (3) one backend
 * forward; (4) register newly full blocks in the prefix cache; (5) for
 * each sequence at the end of its known tokens, sample, deliver the token,
 * check the stops; (6) feed the step time to the controller.
 *
 * Sampling on the device (backend_info.device_sampling): before the
 * forward, each logits row gets a backend_pick: its penalty list (built
 * here, rows one after another in `penalties`) and its draw from the
 * request's rng; the backend returns only the picks. The draws are taken
 * after every list is known to fit max_penalties; if they do not fit, the
 * step samples on the host as without device sampling (logits copied back,
 * sample_pick), no draw having been taken. Either way a pick is exactly
 * sample_pick's, so a request's output does not depend on the path.
 *
 * Sampling on the host with several threads (sample_threads > 1): a
 * step's rows go to the sampling pool (ops_cpu.h's cpu_pool, the pool the
 * CPU backend's matmuls use) when at least two threads would get a row and
 * SCHED_SAMPLE_LOGITS_PER_THREAD logits; the pool's threads, the engine
 * thread among them, take rows (or even shares of them) from a counter
 * and write each pick (result, rc, message) into the row's slot in
 * `rows`. Only then does the engine thread deliver, in row order, what the
 * serial loop delivers (TOKEN, stops, FINISHED, stats): a row's pick reads
 * its own request's tokens and rng alone and no event can change it, so
 * the events, their order and every output are the serial loop's.
 *
 * Sequence state is (tokens[0..n_tokens), n_computed): positions whose KV
 * is in the cache. n_computed == n_tokens - 1 is "decoding"; less is
 * "prefilling" (which is how a preempted sequence resumes: its output so
 * far is simply more prompt). Since the sampler's RNG lives in the
 * sequence, a resumed sequence draws exactly what it would have drawn.
 *
 * Threads and locks: `mu` guards the inbox, `live`, the stopping flag and
 * the published stats; everything else is the engine thread's, which
 * lends a step's rows (their seq's rng, logits row and slot) to the
 * sampling pool for the length of cpu_pool_run. Callbacks run on the
 * engine thread without the lock held.
 */
#include "engine/sched.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <unistd.h>

#include "engine/kvcache.h"
#include "engine/sched_ctl.h"
#include "engine/ops_cpu.h"

typedef struct seq seq;
struct seq {
    seq *prev, *next;           /* inbox, waiting or running (one at a time) */
    seq *live_prev, *live_next; /* all unfinished requests, under mu */
    uint64_t id;
    atomic_int cancel;
    int32_t n_prompt, n_tokens, cap; /* cap = n_prompt + max_tokens */
    int32_t n_computed;         /* positions with KV in the cache */
    int32_t *tokens;            /* [cap] prompt then output */
    int32_t *blocks;            /* [ceil(cap / block_size)] block table */
    uint64_t *hashes;           /* [ceil(cap / block_size)] chain hash of full block i */
    int32_t n_blocks;
    int32_t n_hashed;           /* full blocks whose hash is in hashes[] */
    int32_t max_tokens;
    int32_t cached_prompt_tokens;
    int admitted_once;
    uint64_t plan_step;         /* step number it was last planned in */
    sample_params sp;
    sample_rng rng;
    int32_t *stop_ids;
    int32_t n_stop;
    int ignore_eos;
    int64_t deadline_ns;
    sched_event_fn on_event;
    void *user;
};

typedef struct seq_list {
    seq *head, *tail;
    int32_t n;
} seq_list;

/* One logits row's host pick, made on a pool thread, delivered later by
 * the engine thread. */
typedef struct row_pick {
    sample_result tok;
    int rc;                     /* sample_pick's: 0 or negative errno */
    int32_t thread;             /* the pool thread that picked it (0 = engine thread) */
    lm_err err;                 /* rc < 0: why */
} row_pick;

struct sched {
    backend *be;
    backend_info info;
    sched_config cfg;
    int32_t *eos_ids;
    kvcache *kv;
    int32_t max_blocks;         /* per sequence: ceil(max_context / block_size) */
    sched_ctl ctl;

    pthread_t thread;
    int thread_started;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int stopping;               /* under mu */
    seq_list inbox;             /* under mu */
    seq *live;                  /* under mu */
    uint64_t next_id;           /* under mu */
    sched_stats stats;          /* published copy, under mu */

    /* Engine-thread state. */
    seq_list waiting, running;
    uint64_t step_no;
    sched_stats st;             /* the engine thread's counters */
    /* Step arrays, sized at create (no allocation in the step loop). */
    seq **plan;                 /* [max_running] sequences in this step */
    int32_t *plan_len;          /* [max_running] tokens of each piece */
    int32_t *b_tokens;          /* [max_step_tokens + max_running] */
    int32_t *b_seq_start;       /* [max_running + 1] */
    int32_t *b_start_pos;       /* [max_running] */
    int32_t *b_block_table;     /* [max_running][max_blocks] */
    int32_t *b_logit_rows;      /* [max_running] */
    int32_t *b_logit_seq;       /* [max_running] plan index of each logit row */
    float *logits;              /* [max_running][vocab] (also device sampling's fallback) */
    /* Host sampling: the pool (sample_threads threads, the engine thread
     * being thread 0) and, with more than one, a slot per row. */
    cpu_pool *pool;
    void *sample_scratch;       /* the engine thread's scratch (the pool's thread 0) */
    row_pick *rows;             /* [max_running] when sample_threads > 1 */
    /* Device sampling only (info.device_sampling), sized at create. */
    backend_pick *picks;        /* [max_running] one per logits row */
    backend_pick_out *picks_out; /* [max_running] */
    sample_penalty *penalties;  /* [info.max_penalties] the step's lists, row after row */
    sample_penalty *pen_row;    /* [vocab] one row's list when its bound exceeds the room left */
};

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* ---- lists ------------------------------------------------------------- */

static void list_remove(seq_list *l, seq *s)
{
    if (s->prev)
        s->prev->next = s->next;
    else
        l->head = s->next;
    if (s->next)
        s->next->prev = s->prev;
    else
        l->tail = s->prev;
    s->prev = s->next = NULL;
    l->n--;
}

static void list_push_tail(seq_list *l, seq *s)
{
    s->next = NULL;
    s->prev = l->tail;
    if (l->tail)
        l->tail->next = s;
    else
        l->head = s;
    l->tail = s;
    l->n++;
}

/* Insert keeping the list sorted by id (arrival order). Requests arrive in
 * id order and preempted ones are older than every waiting one, so this is
 * a push at one end in practice. */
static void list_insert_sorted(seq_list *l, seq *s)
{
    seq *after = l->tail;
    while (after && after->id > s->id)
        after = after->prev;
    s->prev = after;
    s->next = after ? after->next : l->head;
    if (s->next)
        s->next->prev = s;
    else
        l->tail = s;
    if (after)
        after->next = s;
    else
        l->head = s;
    l->n++;
}

/* ---- config ------------------------------------------------------------ */

void sched_config_default(sched_config *cfg)
{
    *cfg = (sched_config){
        .block_size = 16,
        .kv_bytes = 0,
        .kv_fraction = 0.9,
        .max_running = 64,
        .max_queue = 256,
        .max_step_tokens = 512,
        .min_step_tokens = 16,
        .prefill_chunk = 256,
        .target_itl_ms = 50,
        .prefix_cache = 1,
        .idle_tick_ms = 100,
    };
}

/* KV budget when neither kv_bytes nor the device's free memory is known. */
#define SCHED_KV_FALLBACK_BYTES ((size_t)256 << 20)

static int check_config(const sched_config *c, lm_err *err)
{
    if (c->block_size < 1 || c->block_size > 1024)
        return lm_err_set(err, -EINVAL, "sched: block_size %d out of range [1, 1024]",
                          c->block_size);
    if (c->max_running < 1 || c->max_running > 65536)
        return lm_err_set(err, -EINVAL, "sched: max_running %d out of range [1, 65536]",
                          c->max_running);
    if (c->max_queue < 0)
        return lm_err_set(err, -EINVAL, "sched: max_queue %d is negative", c->max_queue);
    if (c->max_step_tokens < 1 || c->max_step_tokens > (1 << 20))
        return lm_err_set(err, -EINVAL, "sched: max_step_tokens %d out of range [1, 2^20]",
                          c->max_step_tokens);
    if (c->min_step_tokens < 1 || c->min_step_tokens > c->max_step_tokens)
        return lm_err_set(err, -EINVAL,
                          "sched: min_step_tokens %d out of range [1, max_step_tokens %d]",
                          c->min_step_tokens, c->max_step_tokens);
    if (c->prefill_chunk < 1)
        return lm_err_set(err, -EINVAL, "sched: prefill_chunk %d must be >= 1", c->prefill_chunk);
    if (!(c->target_itl_ms >= 0))
        return lm_err_set(err, -EINVAL, "sched: target_itl_ms must be >= 0");
    if (!c->kv_bytes && !(c->kv_fraction > 0 && c->kv_fraction <= 1))
        return lm_err_set(err, -EINVAL, "sched: kv_fraction %g out of range (0, 1]",
                          c->kv_fraction);
    if (c->n_eos_ids < 0 || (c->n_eos_ids > 0 && !c->eos_ids))
        return lm_err_set(err, -EINVAL, "sched: n_eos_ids %d without eos_ids", c->n_eos_ids);
    if (c->idle_tick_ms < 0)
        return lm_err_set(err, -EINVAL, "sched: idle_tick_ms %d is negative", c->idle_tick_ms);
    if (c->sample_threads < 0 || c->sample_threads > SCHED_MAX_SAMPLE_THREADS)
        return lm_err_set(err, -EINVAL,
                          "sched: sample_threads %d out of range [0, %d] (0 = automatic)",
                          c->sample_threads, SCHED_MAX_SAMPLE_THREADS);
    return 0;
}

/* The sampling threads to start: sample_threads, or min(8, online CPUs)
 * for 0; no more than a full batch has rows. */
static int32_t sample_threads_for(const sched_config *c)
{
    int32_t n = c->sample_threads;
    if (n == 0) {
        long cpus = sysconf(_SC_NPROCESSORS_ONLN);
        n = cpus < 1 ? 1 : cpus > 8 ? 8 : (int32_t)cpus;
    }
    return n < c->max_running ? n : c->max_running;
}

/* ---- finishing ----------------------------------------------------------- */

static void seq_release_blocks(sched *s, seq *q)
{
    /* Release in reverse so that a prefix's tail blocks are evicted from
     * the LRU before its head blocks (the head is the most shareable). */
    for (int32_t i = q->n_blocks - 1; i >= 0; i--)
        kvcache_release(s->kv, q->blocks[i]);
    q->n_blocks = 0;
    q->n_computed = 0;
}

/* Deliver FINISHED and free q. q must be on no engine list. */
static void seq_finish(sched *s, seq *q, sched_finish why, const char *message)
{
    seq_release_blocks(s, q);
    pthread_mutex_lock(&s->mu);
    if (q->live_prev)
        q->live_prev->live_next = q->live_next;
    else
        s->live = q->live_next;
    if (q->live_next)
        q->live_next->live_prev = q->live_prev;
    pthread_mutex_unlock(&s->mu);

    s->st.finished++;
    if (why == SCHED_FINISH_CANCELLED)
        s->st.cancelled++;
    sched_event ev = {
        .type = SCHED_EVENT_FINISHED,
        .id = q->id,
        .finish = why,
        .prompt_tokens = q->n_prompt,
        .completion_tokens = q->n_tokens - q->n_prompt,
        .cached_prompt_tokens = q->cached_prompt_tokens,
        .message = message,
    };
    q->on_event(q->user, &ev);
    free(q);
}

/* ---- submit / cancel (any thread) ---------------------------------------- */

int sched_submit(sched *s, const sched_request *req, uint64_t *ret_id, lm_err *err)
{
    if (!req || !req->prompt || req->n_prompt <= 0)
        return lm_err_set(err, -EINVAL, "sched_submit: empty prompt");
    if (req->max_tokens <= 0)
        return lm_err_set(err, -EINVAL, "sched_submit: max_tokens %d must be > 0",
                          req->max_tokens);
    if (!req->on_event)
        return lm_err_set(err, -EINVAL, "sched_submit: no on_event callback");
    if (req->n_stop_ids < 0 || (req->n_stop_ids > 0 && !req->stop_ids))
        return lm_err_set(err, -EINVAL, "sched_submit: n_stop_ids %d without stop_ids",
                          req->n_stop_ids);
    int64_t total = (int64_t)req->n_prompt + req->max_tokens;
    if (total > s->info.max_context)
        return lm_err_set(err, -EINVAL,
                          "sched_submit: prompt (%d tokens) + max_tokens (%d) = %lld exceeds the "
                          "model's context of %d tokens",
                          req->n_prompt, req->max_tokens, (long long)total, s->info.max_context);
    int64_t need = (total + s->cfg.block_size - 1) / s->cfg.block_size;
    if (need > kvcache_n_blocks(s->kv))
        return lm_err_set(err, -EINVAL,
                          "sched_submit: prompt + max_tokens = %lld tokens needs %lld KV blocks, "
                          "the whole cache has %d",
                          (long long)total, (long long)need, kvcache_n_blocks(s->kv));
    for (int32_t i = 0; i < req->n_prompt; i++)
        if (req->prompt[i] < 0 || req->prompt[i] >= s->info.vocab)
            return lm_err_set(err, -EINVAL,
                              "sched_submit: prompt token %d (at %d) outside the vocabulary [0, %d)",
                              req->prompt[i], i, s->info.vocab);
    int rc = sample_params_check(&req->sampling, err);
    if (rc < 0)
        return lm_err_prefix(err, "sched_submit");

    /* One allocation per request: the struct, then its arrays. */
    size_t cap = (size_t)total, mb = (size_t)need;
    size_t size = sizeof(seq) + mb * sizeof(uint64_t) + cap * sizeof(int32_t) +
                  mb * sizeof(int32_t) + (size_t)req->n_stop_ids * sizeof(int32_t);
    seq *q = calloc(1, size);
    if (!q)
        return lm_err_set(err, -ENOMEM, "sched_submit: out of memory");
    q->hashes = (uint64_t *)(q + 1);
    q->tokens = (int32_t *)(q->hashes + mb);
    q->blocks = q->tokens + cap;
    q->stop_ids = q->blocks + mb;
    memcpy(q->tokens, req->prompt, (size_t)req->n_prompt * sizeof(int32_t));
    if (req->n_stop_ids)
        memcpy(q->stop_ids, req->stop_ids, (size_t)req->n_stop_ids * sizeof(int32_t));
    q->n_stop = req->n_stop_ids;
    q->n_prompt = q->n_tokens = req->n_prompt;
    q->cap = (int32_t)cap;
    q->max_tokens = req->max_tokens;
    q->sp = req->sampling;
    sample_rng_seed(&q->rng, req->sampling.seed);
    q->ignore_eos = req->ignore_eos;
    q->deadline_ns = req->deadline_ns;
    q->on_event = req->on_event;
    q->user = req->user;
    atomic_init(&q->cancel, 0);

    pthread_mutex_lock(&s->mu);
    if (s->stopping) {
        pthread_mutex_unlock(&s->mu);
        free(q);
        return lm_err_set(err, -ESHUTDOWN, "sched_submit: the scheduler is stopping");
    }
    int32_t waiting = s->inbox.n + s->stats.waiting;
    if (waiting >= s->cfg.max_queue) {
        pthread_mutex_unlock(&s->mu);
        free(q);
        return lm_err_set(err, -EAGAIN, "overloaded: %d requests are waiting (max_queue %d)",
                          waiting, s->cfg.max_queue);
    }
    uint64_t id = q->id = ++s->next_id; /* q may be finished and freed once unlocked */
    q->live_next = s->live;
    if (s->live)
        s->live->live_prev = q;
    s->live = q;
    list_push_tail(&s->inbox, q);
    pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->mu);
    if (ret_id)
        *ret_id = id;
    return 0;
}

int sched_cancel(sched *s, uint64_t id)
{
    int rc = -ENOENT;
    pthread_mutex_lock(&s->mu);
    for (seq *q = s->live; q; q = q->live_next)
        if (q->id == id) {
            atomic_store(&q->cancel, 1);
            pthread_cond_signal(&s->cv);
            rc = 0;
            break;
        }
    pthread_mutex_unlock(&s->mu);
    return rc;
}

void sched_get_stats(sched *s, sched_stats *ret)
{
    pthread_mutex_lock(&s->mu);
    *ret = s->stats;
    ret->waiting += s->inbox.n;
    pthread_mutex_unlock(&s->mu);
}

/* ---- the step ------------------------------------------------------------ */

static void publish_stats(sched *s, double step_ms)
{
    kvcache_stats ks;
    kvcache_get_stats(s->kv, &ks);
    s->st.waiting = s->waiting.n;
    s->st.running = s->running.n;
    s->st.kv_blocks_total = ks.total;
    s->st.kv_blocks_used = ks.used;
    s->st.kv_blocks_cached = ks.cached;
    s->st.step_token_budget = s->ctl.budget;
    s->st.batch_limit = s->ctl.limit;
    if (step_ms >= 0)
        s->st.last_step_ms = step_ms;
    pthread_mutex_lock(&s->mu);
    s->stats = s->st;
    pthread_mutex_unlock(&s->mu);
}

/* Preempt q (running): give its blocks back and queue it again; it will be
 * recomputed from prompt + output so far (prefix blocks that survive in
 * the cache are taken back then instead). */
static void preempt(sched *s, seq *q)
{
    list_remove(&s->running, q);
    seq_release_blocks(s, q);
    list_insert_sorted(&s->waiting, q);
    s->st.preemptions++;
}

/* Give q blocks for positions [0, upto). Returns 0, or -1 if the cache
 * does not have enough available (nothing is taken then). */
static int grow_blocks(sched *s, seq *q, int32_t upto)
{
    int32_t need = (upto + s->cfg.block_size - 1) / s->cfg.block_size - q->n_blocks;
    if (need <= 0)
        return 0;
    if (kvcache_available(s->kv) < need)
        return -1;
    while (need-- > 0)
        q->blocks[q->n_blocks++] = kvcache_alloc(s->kv);
    return 0;
}

/* Compute chain hashes of q's full blocks of known tokens up to block `upto`. */
static void hash_blocks(sched *s, seq *q, int32_t upto)
{
    int32_t bs = s->cfg.block_size;
    for (; q->n_hashed < upto; q->n_hashed++) {
        int32_t i = q->n_hashed;
        uint64_t parent = i ? q->hashes[i - 1] : KVCACHE_HASH_ROOT;
        q->hashes[i] = kvcache_hash_block(parent, q->tokens + (size_t)i * bs, bs);
    }
}

/* Take q's leading full blocks from the prefix cache. At least one token
 * is always left to compute: its logits give the next token. */
static void prefix_lookup(sched *s, seq *q)
{
    int32_t bs = s->cfg.block_size;
    int32_t full = (q->n_tokens - 1) / bs;
    hash_blocks(s, q, full);
    while (q->n_blocks < full) {
        int32_t i = q->n_blocks;
        uint64_t parent = i ? q->hashes[i - 1] : KVCACHE_HASH_ROOT;
        int32_t b = kvcache_lookup(s->kv, q->hashes[i], parent, q->tokens + (size_t)i * bs);
        if (b < 0)
            break;
        q->blocks[q->n_blocks++] = b;
    }
    q->n_computed = q->n_blocks * bs;
}

static void plan_add(sched *s, int32_t *n_plan, int32_t *n_tok, seq *q, int32_t len)
{
    s->plan[*n_plan] = q;
    s->plan_len[*n_plan] = len;
    (*n_plan)++;
    *n_tok += len;
}

/* Choose this step's pieces. Returns the number of pieces. */
static int32_t plan_step(sched *s, int32_t *ret_tokens, int *ret_decoding)
{
    int32_t budget = s->ctl.budget, limit = s->ctl.limit;
    int32_t chunk_max = s->cfg.prefill_chunk;
    int32_t n_plan = 0, n_tok = 0;

    uint64_t step = ++s->step_no;

    /* Pass 1: decoding sequences, oldest first, one token each, all of
     * them even when the controller has just cut the budget below their
     * number: skipping a decoder would double its inter-token latency, the
     * very thing the budget is cut to protect (the batch limit brings the
     * count down as sequences finish). Decodes go before prefill chunks so
     * that a long prompt never makes a running sequence skip a step. A
     * decoder that needs a block it cannot have preempts the newest running
     * sequence (the tail: in this pass every planned sequence is older
     * than q) until it can. */
    for (seq *q = s->running.head, *next; q; q = next) {
        next = q->next;
        if (q->n_tokens - q->n_computed != 1)
            continue;
        int preempted_self = 0;
        while (grow_blocks(s, q, q->n_computed + 1) < 0) {
            seq *victim = s->running.tail;
            preempt(s, victim);
            if (victim == q) {
                preempted_self = 1;
                break;
            }
        }
        if (preempted_self)
            break; /* q was the newest: nothing runs after it */
        next = q->next; /* the tail may have gone */
        q->plan_step = step;
        plan_add(s, &n_plan, &n_tok, q, 1);
    }
    /* With no sequence decoding, nobody's inter-token latency is at stake:
     * prefill at the full size (time to first token is all that counts). */
    *ret_decoding = n_plan > 0;
    if (n_plan == 0)
        budget = s->cfg.max_step_tokens;

    /* Pass 2: prefilling running sequences (new prompts in pieces, resumed
     * ones), oldest first, with what budget is left. A piece shrinks to the
     * blocks there are; when not even one token fits, the newest running
     * sequence is preempted, unless it was planned in pass 1 (then q waits
     * for decoders to finish: they hold the blocks and make progress). */
    int32_t bs = s->cfg.block_size;
    for (seq *q = s->running.head, *next; q && n_tok < budget; q = next) {
        next = q->next;
        if (q->plan_step == step)
            continue;
        int32_t len = q->n_tokens - q->n_computed;
        if (len > chunk_max)
            len = chunk_max;
        if (len > budget - n_tok)
            len = budget - n_tok;
        int32_t room = (q->n_blocks + kvcache_available(s->kv)) * bs - q->n_computed;
        while (room < 1) {
            seq *victim = s->running.tail;
            if (victim == q || victim->plan_step == step)
                break;
            preempt(s, victim);
            room = (q->n_blocks + kvcache_available(s->kv)) * bs - q->n_computed;
        }
        next = q->next;
        if (room < 1)
            continue;
        if (len > room)
            len = room;
        grow_blocks(s, q, q->n_computed + len);
        q->plan_step = step;
        plan_add(s, &n_plan, &n_tok, q, len);
    }

    /* Admissions: FCFS from the head of waiting, never past it. While
     * others run, keep a 1% reserve of blocks so that running decoders do
     * not preempt a sequence the very step after it was admitted. */
    int32_t reserve = kvcache_n_blocks(s->kv) / 100;
    while (s->waiting.head && s->running.n < limit && n_tok < budget) {
        seq *q = s->waiting.head;
        if (s->cfg.prefix_cache) {
            prefix_lookup(s, q);
            s->st.prefix_tokens_reused += (uint64_t)q->n_computed;
        }
        int32_t len = q->n_tokens - q->n_computed;
        if (len > chunk_max)
            len = chunk_max;
        if (len > budget - n_tok)
            len = budget - n_tok;
        int32_t need = (q->n_computed + len + s->cfg.block_size - 1) / s->cfg.block_size -
                       q->n_blocks;
        if (kvcache_available(s->kv) - (s->running.n ? reserve : 0) < need) {
            if (s->cfg.prefix_cache)
                s->st.prefix_tokens_reused -= (uint64_t)q->n_computed;
            seq_release_blocks(s, q);
            break;
        }
        grow_blocks(s, q, q->n_computed + len);
        if (!q->admitted_once) {
            q->admitted_once = 1;
            q->cached_prompt_tokens = q->n_computed < q->n_prompt ? q->n_computed : q->n_prompt;
        }
        list_remove(&s->waiting, q);
        list_insert_sorted(&s->running, q); /* running stays in id order: tail = newest */
        plan_add(s, &n_plan, &n_tok, q, len);
    }
    *ret_tokens = n_tok;
    return n_plan;
}

static int is_stop(const sched *s, const seq *q, int32_t tok)
{
    if (!q->ignore_eos)
        for (int32_t i = 0; i < s->cfg.n_eos_ids; i++)
            if (s->eos_ids[i] == tok)
                return 1;
    for (int32_t i = 0; i < q->n_stop; i++)
        if (q->stop_ids[i] == tok)
            return 1;
    return 0;
}

/* Drop cancelled and expired requests from both lists. */
static void reap_cancelled(sched *s)
{
    int64_t now = now_ns();
    seq_list *lists[2] = {&s->running, &s->waiting};
    for (int l = 0; l < 2; l++)
        for (seq *q = lists[l]->head, *next; q; q = next) {
            next = q->next;
            sched_finish why = SCHED_FINISH_NONE;
            if (atomic_load(&q->cancel))
                why = SCHED_FINISH_CANCELLED;
            else if (q->deadline_ns && now >= q->deadline_ns)
                why = SCHED_FINISH_DEADLINE;
            if (why != SCHED_FINISH_NONE) {
                list_remove(lists[l], q);
                seq_finish(s, q, why, NULL);
            }
        }
}

/*
 * Device sampling: fill picks[0, n_logits) for the rows of this step and
 * their penalty lists. Returns the number of penalty entries, or -1 when
 * the lists do not fit info.max_penalties: the step then samples on the
 * host, and no rng has been drawn (the draws are taken only once every
 * list fits, one per pick that draws (sample_draws), as sample_pick takes it).
 */
static int32_t plan_picks(sched *s, int32_t n_logits)
{
    const int32_t vocab = s->info.vocab, room = s->info.max_penalties;
    int32_t used = 0;
    for (int32_t r = 0; r < n_logits; r++) {
        seq *q = s->plan[s->b_logit_seq[r]];
        const int32_t n_out = q->n_tokens - q->n_prompt;
        int32_t n = 0;
        if (sample_has_penalties(&q->sp)) {
            /* sample_penalty_list writes up to sample_penalty_list_bound()
             * entries: straight into the step's list when that much room is
             * left, else into pen_row, kept if the actual list fits. */
            const int64_t bound = sample_penalty_list_bound(&q->sp, q->n_prompt, n_out, vocab);
            if (bound <= room - used) {
                n = sample_penalty_list(&q->sp, q->tokens, q->n_prompt, q->tokens + q->n_prompt,
                                        n_out, vocab, s->sample_scratch, s->penalties + used);
            } else {
                n = sample_penalty_list(&q->sp, q->tokens, q->n_prompt, q->tokens + q->n_prompt,
                                        n_out, vocab, s->sample_scratch, s->pen_row);
                if (n > room - used)
                    return -1;
                if (n)
                    memcpy(s->penalties + used, s->pen_row, (size_t)n * sizeof *s->pen_row);
            }
        }
        s->picks[r] = (backend_pick){.p = &q->sp, .draw = 0, .pen_begin = used, .n_pen = n};
        used += n;
    }
    for (int32_t r = 0; r < n_logits; r++) {
        seq *q = s->plan[s->b_logit_seq[r]];
        if (sample_draws(&q->sp))
            s->picks[r].draw = sample_rng_next(&q->rng);
    }
    return used;
}

/* A device pick as sample_pick would have returned it: the result, or the
 * host sampler's message for logits that cannot be sampled. */
static int pick_take(const sched *s, const backend_pick_out *o, sample_result *ret, lm_err *err)
{
    if (o->status)
        return sample_pick_error(err, o->bad_token, o->bad_value);
    if (o->r.token < 0 || o->r.token >= s->info.vocab)
        return lm_err_set(err, -EPROTO,
                          "backend '%s': picked token %d outside the vocabulary [0, %d)",
                          s->info.name ? s->info.name : "?", o->r.token, s->info.vocab);
    *ret = o->r;
    return 0;
}

/* Row r's pick on the host: sample_pick of its request, with `scratch`
 * (sample_scratch_bytes). Touches only that request's rng and the row. */
static int host_pick(sched *s, int32_t r, void *scratch, sample_result *ret, lm_err *err)
{
    seq *q = s->plan[s->b_logit_seq[r]];
    float *row = s->logits + (size_t)r * s->info.vocab;
    return sample_pick(row, s->info.vocab, &q->sp, &q->rng, q->tokens, q->n_prompt,
                       q->tokens + q->n_prompt, q->n_tokens - q->n_prompt, scratch, ret, err);
}

/* cpu_task_fn: rows [b, e)' host picks into their slots, with the
 * thread's scratch. */
static void pool_pick(void *ctx, int64_t b, int64_t e, int thread)
{
    sched *s = ctx;
    size_t floats;
    void *scratch = cpu_pool_scratch(s->pool, thread, &floats);
    for (int64_t r = b; r < e; r++) {
        row_pick *o = &s->rows[r];
        o->thread = thread;
        o->rc = host_pick(s, (int32_t)r, scratch, &o->tok, &o->err);
    }
}

/* How many threads pick this step's n_rows host rows: as many as get a
 * row and SCHED_SAMPLE_LOGITS_PER_THREAD logits each (waking a thread
 * costs microseconds to tens of them; a row of qwen's vocabulary
 * 0.3-3 ms, one of 384 logits 2 us), at least 1. */
static int32_t step_sample_threads(const sched *s, int32_t n_rows)
{
    int64_t n = (int64_t)n_rows * s->info.vocab / SCHED_SAMPLE_LOGITS_PER_THREAD;
    if (n > n_rows)
        n = n_rows;
    const int32_t most = cpu_pool_threads(s->pool);
    return n < 1 ? 1 : n < most ? (int32_t)n : most;
}

/* Deliver row r's pick: its TOKEN event, then a stop or the length ends
 * the request; a pick that failed (rc < 0, `message` why) fails its
 * request alone. */
static void deliver_row(sched *s, int32_t r, int rc, const sample_result *tok,
                        const char *message)
{
    seq *q = s->plan[s->b_logit_seq[r]];
    if (rc < 0) {
        list_remove(&s->running, q);
        seq_finish(s, q, SCHED_FINISH_ERROR, message);
        return;
    }
    sched_event ev = {.type = SCHED_EVENT_TOKEN, .id = q->id, .tok = *tok};
    q->tokens[q->n_tokens++] = ev.tok.token;
    s->st.tokens_generated++;
    q->on_event(q->user, &ev);
    sched_finish why = SCHED_FINISH_NONE;
    if (is_stop(s, q, ev.tok.token))
        why = SCHED_FINISH_STOP;
    else if (q->n_tokens == q->cap || q->n_tokens >= s->info.max_context)
        why = SCHED_FINISH_LENGTH;
    if (why != SCHED_FINISH_NONE) {
        list_remove(&s->running, q);
        seq_finish(s, q, why, NULL);
    }
}

/* Run one step over the planned pieces. Returns the tokens forwarded. */
static int32_t run_step(sched *s, int *ret_decoding)
{
    int32_t n_tok = 0;
    int32_t n_plan = plan_step(s, &n_tok, ret_decoding);
    if (n_plan == 0)
        return 0;

    int32_t bs = s->cfg.block_size, mb = s->max_blocks;
    int32_t n_logits = 0, pos = 0;
    s->b_seq_start[0] = 0;
    for (int32_t i = 0; i < n_plan; i++) {
        seq *q = s->plan[i];
        int32_t len = s->plan_len[i];
        memcpy(s->b_tokens + pos, q->tokens + q->n_computed, (size_t)len * sizeof(int32_t));
        s->b_start_pos[i] = q->n_computed;
        memcpy(s->b_block_table + (size_t)i * mb, q->blocks, (size_t)q->n_blocks * sizeof(int32_t));
        pos += len;
        s->b_seq_start[i + 1] = pos;
        if (q->n_computed + len == q->n_tokens) {
            s->b_logit_rows[n_logits] = pos - 1;
            s->b_logit_seq[n_logits] = i;
            n_logits++;
        }
        int32_t prompt_part = q->n_prompt - q->n_computed;
        if (prompt_part > 0)
            s->st.prompt_tokens_computed += (uint64_t)(prompt_part < len ? prompt_part : len);
    }
    /* n_pen >= 0: the backend picks (this many penalty entries) */
    const int32_t n_pen = s->info.device_sampling ? plan_picks(s, n_logits) : -1;
    const int device = n_pen >= 0;
    backend_batch batch = {
        .n_seqs = n_plan,
        .n_tokens = pos,
        .tokens = s->b_tokens,
        .seq_start = s->b_seq_start,
        .start_pos = s->b_start_pos,
        .block_table = s->b_block_table,
        .max_blocks = mb,
        .n_logits = n_logits,
        .logit_rows = s->b_logit_rows,
        .logits = device ? NULL : s->logits,
        .picks = device ? s->picks : NULL,
        .penalties = device ? s->penalties : NULL,
        .n_penalties = device ? n_pen : 0,
        .picks_out = device ? s->picks_out : NULL,
    };
    lm_err err = {0};
    int rc = backend_forward(s->be, &batch, &err);
    s->st.steps++;
    if (rc < 0) {
        /* The KV of these pieces is undefined now: fail their requests (the
         * rest keep running; a broken backend fails them on their turn). */
        for (int32_t i = 0; i < n_plan; i++) {
            list_remove(&s->running, s->plan[i]);
            seq_finish(s, s->plan[i], SCHED_FINISH_ERROR, err.msg);
        }
        return n_tok;
    }

    for (int32_t i = 0; i < n_plan; i++) {
        seq *q = s->plan[i];
        q->n_computed += s->plan_len[i];
        if (s->cfg.prefix_cache) {
            int32_t full = q->n_computed / bs;
            hash_blocks(s, q, full);
            for (int32_t k = (q->n_computed - s->plan_len[i]) / bs; k < full; k++)
                kvcache_publish(s->kv, q->blocks[k], q->hashes[k],
                                k ? q->hashes[k - 1] : KVCACHE_HASH_ROOT,
                                q->tokens + (size_t)k * bs);
        }
    }

    int64_t t_sample = now_ns();
    const int32_t n_threads = device ? 1 : step_sample_threads(s, n_logits);
    if (n_threads > 1) {
        /* every row picked on the pool first, then delivered in order: a row
         * at a time when every thread has a place, else n_threads shares */
        const int32_t chunk = n_threads == cpu_pool_threads(s->pool)
                                  ? 1
                                  : (n_logits + n_threads - 1) / n_threads;
        cpu_pool_run(s->pool, pool_pick, s, n_logits, chunk);
        s->st.sample_parallel_steps++;
        for (int32_t r = 0; r < n_logits; r++) {
            const row_pick *o = &s->rows[r];
            s->st.sample_rows_helped += o->thread != 0;
            deliver_row(s, r, o->rc, &o->tok, o->err.msg);
        }
    } else {
        for (int32_t r = 0; r < n_logits; r++) {
            sample_result tok;
            rc = device ? pick_take(s, &s->picks_out[r], &tok, &err)
                        : host_pick(s, r, s->sample_scratch, &tok, &err);
            deliver_row(s, r, rc, &tok, err.msg);
        }
    }
    double sample_ms = (double)(now_ns() - t_sample) / 1e6;
    s->st.last_sample_ms = sample_ms;
    s->st.sample_ms_total += sample_ms;
    return n_tok;
}

static void *engine_main(void *arg)
{
    sched *s = arg;
    for (;;) {
        pthread_mutex_lock(&s->mu);
        while (s->inbox.head) {
            seq *q = s->inbox.head;
            list_remove(&s->inbox, q);
            list_insert_sorted(&s->waiting, q);
            s->stats.waiting++; /* so that submit counts it before the next publish */
        }
        if (s->stopping) {
            pthread_mutex_unlock(&s->mu);
            break;
        }
        if (!s->waiting.head && !s->running.head) {
            /* Idle: sleep until a submit or the next tick. */
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            int64_t ns = ts.tv_nsec + (int64_t)(s->cfg.idle_tick_ms ? s->cfg.idle_tick_ms : 100) *
                                          1000000;
            ts.tv_sec += ns / 1000000000;
            ts.tv_nsec = ns % 1000000000;
            pthread_cond_timedwait(&s->cv, &s->mu, &ts);
            pthread_mutex_unlock(&s->mu);
            if (s->cfg.on_tick)
                s->cfg.on_tick(s->cfg.tick_user);
            continue;
        }
        pthread_mutex_unlock(&s->mu);

        int64_t t0 = now_ns();
        reap_cancelled(s);
        int decoding = 0;
        int32_t n_tok = run_step(s, &decoding);
        double ms = (double)(now_ns() - t0) / 1e6;
        if (n_tok > 0)
            sched_ctl_observe(&s->ctl, n_tok, ms, decoding);
        publish_stats(s, n_tok > 0 ? ms : -1);
        if (s->cfg.on_tick)
            s->cfg.on_tick(s->cfg.tick_user);
        if (n_tok == 0 && (s->waiting.head || s->running.head)) {
            /* Nothing could run (cannot happen with a consistent cache, see
             * plan_step): do not spin. */
            struct timespec ts = {0, 1000000};
            nanosleep(&ts, NULL);
        }
    }
    /* Stopping: everything still queued or running is cancelled. */
    seq_list *lists[2] = {&s->running, &s->waiting};
    for (int l = 0; l < 2; l++)
        while (lists[l]->head) {
            seq *q = lists[l]->head;
            list_remove(lists[l], q);
            seq_finish(s, q, SCHED_FINISH_CANCELLED, NULL);
        }
    publish_stats(s, -1);
    return NULL;
}

/* ---- create / destroy ---------------------------------------------------- */

static void sched_free(sched *s)
{
    kvcache_destroy(s->kv);
    free(s->eos_ids);
    free(s->plan);
    free(s->plan_len);
    free(s->b_tokens);
    free(s->b_seq_start);
    free(s->b_start_pos);
    free(s->b_block_table);
    free(s->b_logit_rows);
    free(s->b_logit_seq);
    free(s->logits);
    cpu_pool_destroy(s->pool); /* joins the sampling threads; owns sample_scratch */
    free(s->rows);
    free(s->picks);
    free(s->picks_out);
    free(s->penalties);
    free(s->pen_row);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cv);
    free(s);
}

int sched_create(backend *be, const sched_config *cfg, sched **ret, lm_err *err)
{
    if (!be)
        return lm_err_set(err, -EINVAL, "sched_create: no backend");
    sched_config def;
    if (!cfg) {
        sched_config_default(&def);
        cfg = &def;
    }
    int rc = check_config(cfg, err);
    if (rc < 0)
        return rc;
    backend_info info;
    backend_get_info(be, &info);
    if (info.vocab < 1 || info.max_context < 1 || !info.kv_bytes_per_token)
        return lm_err_set(err, -EINVAL,
                          "sched_create: backend '%s' reports vocab %d, max_context %d, "
                          "kv_bytes_per_token %zu",
                          info.name ? info.name : "?", info.vocab, info.max_context,
                          info.kv_bytes_per_token);

    /* KV size: explicit bytes, else a fraction of free device memory, else
     * (free memory unknown) enough for max_running full contexts, capped. */
    size_t bytes = cfg->kv_bytes;
    const char *how = "kv_bytes";
    if (!bytes && info.device_memory_free) {
        bytes = (size_t)((double)info.device_memory_free * cfg->kv_fraction);
        how = "kv_fraction of free device memory";
    }
    if (!bytes) {
        double want = (double)cfg->max_running * info.max_context * (double)info.kv_bytes_per_token;
        bytes = want < (double)SCHED_KV_FALLBACK_BYTES ? (size_t)want : SCHED_KV_FALLBACK_BYTES;
        how = "default (free device memory unknown)";
    }
    int32_t n_blocks = kvcache_blocks_for_bytes(bytes, info.kv_bytes_per_token, cfg->block_size);
    if (n_blocks < 1)
        return lm_err_set(err, -ENOMEM,
                          "sched_create: KV budget %zu bytes (%s) holds no block of %d tokens x "
                          "%zu bytes",
                          bytes, how, cfg->block_size, info.kv_bytes_per_token);

    sched *s = calloc(1, sizeof *s);
    if (!s)
        return lm_err_set(err, -ENOMEM, "sched_create: out of memory");
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    s->be = be;
    s->info = info;
    s->cfg = *cfg;
    s->cfg.eos_ids = NULL;
    s->cfg.kv_bytes = bytes;
    s->max_blocks = (info.max_context + cfg->block_size - 1) / cfg->block_size;
    size_t mr = (size_t)cfg->max_running;
    if (cfg->n_eos_ids) {
        s->eos_ids = malloc((size_t)cfg->n_eos_ids * sizeof(int32_t));
        if (s->eos_ids)
            memcpy(s->eos_ids, cfg->eos_ids, (size_t)cfg->n_eos_ids * sizeof(int32_t));
    }
    s->plan = calloc(mr, sizeof *s->plan);
    s->plan_len = calloc(mr, sizeof *s->plan_len);
    /* Decoders may exceed the budget by up to max_running (see plan_step). */
    s->b_tokens = calloc((size_t)cfg->max_step_tokens + mr, sizeof *s->b_tokens);
    s->b_seq_start = calloc(mr + 1, sizeof *s->b_seq_start);
    s->b_start_pos = calloc(mr, sizeof *s->b_start_pos);
    s->b_block_table = calloc(mr * (size_t)s->max_blocks, sizeof *s->b_block_table);
    s->b_logit_rows = calloc(mr, sizeof *s->b_logit_rows);
    s->b_logit_seq = calloc(mr, sizeof *s->b_logit_seq);
    s->logits = calloc(mr * (size_t)info.vocab, sizeof *s->logits);
    if ((cfg->n_eos_ids && !s->eos_ids) || !s->plan || !s->plan_len || !s->b_tokens ||
        !s->b_seq_start || !s->b_start_pos || !s->b_block_table || !s->b_logit_rows ||
        !s->b_logit_seq || !s->logits) {
        sched_free(s);
        return lm_err_set(err, -ENOMEM, "sched_create: out of memory for step buffers");
    }
    /* The sampling threads, each with its scratch; the engine thread is
     * thread 0 and keeps its scratch for the step's own picks. */
    const int32_t n_sample = sample_threads_for(cfg);
    if ((rc = cpu_pool_create(n_sample, &s->pool, err)) < 0 ||
        (rc = cpu_pool_reserve(s->pool, (sample_scratch_bytes(info.vocab) + 3) / 4, err)) < 0) {
        sched_free(s);
        return lm_err_prefix(err, "sched_create: sampling threads");
    }
    size_t floats;
    s->sample_scratch = cpu_pool_scratch(s->pool, 0, &floats);
    if (n_sample > 1 && !(s->rows = calloc(mr, sizeof *s->rows))) {
        sched_free(s);
        return lm_err_set(err, -ENOMEM, "sched_create: out of memory for %zu sampling slots", mr);
    }
    s->st.sample_threads = n_sample;
    if (info.device_sampling) {
        if (info.max_penalties < 0)
            s->info.max_penalties = 0;
        s->picks = calloc(mr, sizeof *s->picks);
        s->picks_out = calloc(mr, sizeof *s->picks_out);
        s->pen_row = calloc((size_t)info.vocab, sizeof *s->pen_row);
        if (s->info.max_penalties)
            s->penalties = calloc((size_t)s->info.max_penalties, sizeof *s->penalties);
        if (!s->picks || !s->picks_out || !s->pen_row ||
            (s->info.max_penalties && !s->penalties)) {
            sched_free(s);
            return lm_err_set(err, -ENOMEM,
                              "sched_create: out of memory for device sampling (%d penalty "
                              "entries)",
                              info.max_penalties);
        }
    }
    s->cfg.eos_ids = s->eos_ids;
    rc = kvcache_create(n_blocks, cfg->block_size, &s->kv, err);
    if (rc < 0) {
        sched_free(s);
        return lm_err_prefix(err, "sched_create");
    }
    rc = backend_kv_init(be, cfg->block_size, n_blocks, err);
    if (rc < 0) {
        sched_free(s);
        return lm_err_prefix(err, "sched_create: backend kv_init (%d blocks)", n_blocks);
    }
    int32_t max_seqs = cfg->max_running;
    sched_ctl_init(&s->ctl, cfg->target_itl_ms, cfg->min_step_tokens, cfg->max_step_tokens,
                   max_seqs);
    publish_stats(s, 0);
    rc = pthread_create(&s->thread, NULL, engine_main, s);
    if (rc) {
        sched_free(s);
        return lm_err_set(err, -rc, "sched_create: cannot start the engine thread");
    }
    s->thread_started = 1;
    *ret = s;
    return 0;
}

void sched_destroy(sched *s)
{
    if (!s)
        return;
    pthread_mutex_lock(&s->mu);
    s->stopping = 1;
    pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->mu);
    if (s->thread_started)
        pthread_join(s->thread, NULL);
    sched_free(s);
}
