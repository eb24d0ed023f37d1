/*
 * cmd_generate.c: `lightmoe generate`, text generation in-process (no
 * daemon): model + backend (engine/backends.h), scheduler, and the text
 * pipeline (engine/gen.h), streaming the text to stdout.
 *
 *   lightmoe generate --model DIR (--prompt TEXT | --chat FILE.json)
 *       [--max-tokens N] [--temperature T] [--top-p P] [--top-k K] [--min-p P]
 *       [--repetition-penalty R] [--presence-penalty P] [--frequency-penalty F]
 *       [--seed S] [--stop S]... [--stop-id ID]... [--ignore-eos] [--logprobs N]
 *       [--device cpu|cuda] [--threads N] [--chat-template FILE]
 *       [--template-vars JSON] [--no-generation-prompt] [--quantize-int4] [--ids]
 *
 * --chat FILE.json: a JSON array of {"role", "content"} messages, or an
 * object with such a "messages" array. --logprobs N prints, per token, its
 * log-probability and the N best alternatives to stderr; --ids prints the
 * generated token ids to stderr at the end. A summary line (finish reason,
 * token counts, speed) goes to stderr.
 *
 * The engine thread only queues text; the main thread prints it, so a slow
 * terminal never stalls the scheduler.
 */
#include <getopt.h>
#include <jansson.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/backends.h"
#include "engine/chat.h"
#include "engine/config.h"
#include "engine/gen.h"
#include "engine/model.h"
#include "engine/tokenizer.h"
#include "tools/cmd.h"

#define MAX_STOP GEN_MAX_STOP
#define MAX_STOP_IDS 64

static void usage(FILE *f)
{
    fprintf(f,
            "usage: lightmoe generate --model DIR (--prompt TEXT | --chat FILE.json)\n"
            "         [--max-tokens N] [--temperature T] [--top-p P] [--top-k K] [--min-p P]\n"
            "         [--repetition-penalty R] [--presence-penalty P] [--frequency-penalty F]\n"
            "         [--seed S] [--stop S]... [--stop-id ID]... [--ignore-eos] [--logprobs N]\n"
            "         [--device cpu|cuda] [--threads N] [--chat-template FILE]\n"
            "         [--template-vars JSON] [--no-generation-prompt] [--quantize-int4] [--ids]\n");
}

/* ---- what the engine thread hands to the printer ---------------------------- */

typedef struct tok_rec {
    sample_result r;
    char text[64]; /* the token's own bytes, for --logprobs lines */
} tok_rec;

typedef struct sink {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    char *text; /* queued text not yet printed */
    size_t n, cap;
    tok_rec *toks; /* every generated token */
    int32_t n_toks, cap_toks, printed_toks;
    int done, oom;
    sched_finish finish;
    char stop[GEN_MAX_STOP_LEN + 1];
    int has_stop;
    int32_t stop_token, prompt_tokens, completion_tokens;
    char message[LM_ERR_MSG_MAX];
    const tokenizer *tok;
    int64_t t_first_ns;
} sink;

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void sink_text(sink *s, const char *p, size_t n)
{
    if (n == 0) return;
    if (s->n + n > s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 4096;
        while (cap < s->n + n)
            cap *= 2;
        char *np = realloc(s->text, cap);
        if (!np) {
            s->oom = 1;
            return;
        }
        s->text = np;
        s->cap = cap;
    }
    memcpy(s->text + s->n, p, n);
    s->n += n;
}

static void on_event(void *user, const gen_event *ev)
{
    sink *s = user;
    pthread_mutex_lock(&s->mu);
    sink_text(s, ev->text, ev->len);
    if (ev->type == GEN_EVENT_DELTA) {
        if (!s->t_first_ns) s->t_first_ns = now_ns();
        if (s->n_toks == s->cap_toks) {
            int32_t cap = s->cap_toks ? s->cap_toks * 2 : 256;
            tok_rec *nt = realloc(s->toks, sizeof(tok_rec) * (size_t)cap);
            if (nt) {
                s->toks = nt;
                s->cap_toks = cap;
            } else {
                s->oom = 1;
            }
        }
        if (s->n_toks < s->cap_toks) {
            tok_rec *t = &s->toks[s->n_toks++];
            t->r = *ev->tok;
            int k = tokenizer_token_bytes(s->tok, ev->tok->token, t->text, sizeof t->text - 1);
            t->text[k < 0 ? 0 : k < (int)sizeof t->text - 1 ? k : (int)sizeof t->text - 1] = 0;
        }
    } else {
        s->done = 1;
        s->finish = ev->finish;
        s->has_stop = ev->stop != NULL;
        if (ev->stop) snprintf(s->stop, sizeof s->stop, "%s", ev->stop);
        s->stop_token = ev->stop_token;
        s->prompt_tokens = ev->prompt_tokens;
        s->completion_tokens = ev->completion_tokens;
        if (ev->message) snprintf(s->message, sizeof s->message, "%s", ev->message);
    }
    pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->mu);
}

static const char *finish_name(sched_finish f)
{
    switch (f) {
    case SCHED_FINISH_STOP:
        return "stop";
    case SCHED_FINISH_LENGTH:
        return "length";
    case SCHED_FINISH_CANCELLED:
        return "cancelled";
    case SCHED_FINISH_DEADLINE:
        return "deadline";
    case SCHED_FINISH_ERROR:
        return "error";
    default:
        return "none";
    }
}

static void print_quoted(FILE *f, const char *s)
{
    json_t *j = json_string(s);
    char *d = j ? json_dumps(j, JSON_ENCODE_ANY) : NULL;
    fputs(d ? d : "\"?\"", f);
    free(d);
    json_decref(j);
}

static void print_logprobs(const sink *s, const tok_rec *t, int32_t index)
{
    fprintf(stderr, "[%d] %d ", index, t->r.token);
    print_quoted(stderr, t->text);
    fprintf(stderr, " logprob %.4f", (double)t->r.logprob);
    for (int32_t i = 0; i < t->r.n_top; i++) {
        char b[64];
        int k = tokenizer_token_bytes(s->tok, t->r.top_ids[i], b, sizeof b - 1);
        b[k < 0 ? 0 : k < (int)sizeof b - 1 ? k : (int)sizeof b - 1] = 0;
        fprintf(stderr, "%s%d ", i ? ", " : " | ", t->r.top_ids[i]);
        print_quoted(stderr, b);
        fprintf(stderr, " %.4f", (double)t->r.top_logprobs[i]);
    }
    fputc('\n', stderr);
}

/* ---- arguments ----------------------------------------------------------------- */

static int parse_num(const char *flag, const char *s, double lo, double hi, double *ret)
{
    char *end;
    double v = strtod(s, &end);
    if (*s == 0 || *end != 0 || !(v >= lo && v <= hi)) {
        fprintf(stderr, "lightmoe generate: %s %s: expected a number in [%g, %g]\n", flag, s, lo,
                hi);
        return -1;
    }
    *ret = v;
    return 0;
}

/* --chat FILE: messages into msgs (strings owned by *ret_root) */
static int load_chat(const char *path, chat_message **ret_msgs, int32_t *ret_n, json_t **ret_root)
{
    json_error_t jerr;
    json_t *root = json_load_file(path, 0, &jerr);
    if (!root) {
        fprintf(stderr, "lightmoe generate: %s:%d: %s\n", path, jerr.line, jerr.text);
        return -1;
    }
    json_t *arr = json_is_object(root) ? json_object_get(root, "messages") : root;
    if (!json_is_array(arr) || json_array_size(arr) == 0) {
        fprintf(stderr,
                "lightmoe generate: %s: expected a non-empty JSON array of messages "
                "(or {\"messages\": [...]})\n",
                path);
        json_decref(root);
        return -1;
    }
    size_t n = json_array_size(arr);
    chat_message *msgs = calloc(n, sizeof *msgs);
    for (size_t i = 0; msgs && i < n; i++) {
        json_t *m = json_array_get(arr, i);
        msgs[i].role = json_string_value(json_object_get(m, "role"));
        msgs[i].content = json_string_value(json_object_get(m, "content"));
        if (!msgs[i].role || !msgs[i].content) {
            fprintf(stderr,
                    "lightmoe generate: %s: message %zu needs string \"role\" and "
                    "\"content\"\n",
                    path, i);
            free(msgs);
            json_decref(root);
            return -1;
        }
    }
    *ret_msgs = msgs;
    *ret_n = (int32_t)n;
    *ret_root = root;
    return 0;
}

enum {
    OPT_MODEL = 1,
    OPT_PROMPT,
    OPT_CHAT,
    OPT_MAX,
    OPT_TEMP,
    OPT_TOPP,
    OPT_TOPK,
    OPT_MINP,
    OPT_REP,
    OPT_PRES,
    OPT_FREQ,
    OPT_SEED,
    OPT_STOP,
    OPT_STOPID,
    OPT_IGNORE_EOS,
    OPT_LOGPROBS,
    OPT_DEVICE,
    OPT_THREADS,
    OPT_TEMPLATE,
    OPT_VARS,
    OPT_NOGEN,
    OPT_INT4,
    OPT_IDS,
    OPT_HELP,
};

static int generate_main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"model", required_argument, 0, OPT_MODEL},
        {"prompt", required_argument, 0, OPT_PROMPT},
        {"chat", required_argument, 0, OPT_CHAT},
        {"max-tokens", required_argument, 0, OPT_MAX},
        {"temperature", required_argument, 0, OPT_TEMP},
        {"top-p", required_argument, 0, OPT_TOPP},
        {"top-k", required_argument, 0, OPT_TOPK},
        {"min-p", required_argument, 0, OPT_MINP},
        {"repetition-penalty", required_argument, 0, OPT_REP},
        {"presence-penalty", required_argument, 0, OPT_PRES},
        {"frequency-penalty", required_argument, 0, OPT_FREQ},
        {"seed", required_argument, 0, OPT_SEED},
        {"stop", required_argument, 0, OPT_STOP},
        {"stop-id", required_argument, 0, OPT_STOPID},
        {"ignore-eos", no_argument, 0, OPT_IGNORE_EOS},
        {"logprobs", required_argument, 0, OPT_LOGPROBS},
        {"device", required_argument, 0, OPT_DEVICE},
        {"threads", required_argument, 0, OPT_THREADS},
        {"chat-template", required_argument, 0, OPT_TEMPLATE},
        {"template-vars", required_argument, 0, OPT_VARS},
        {"no-generation-prompt", no_argument, 0, OPT_NOGEN},
        {"quantize-int4", no_argument, 0, OPT_INT4},
        {"ids", no_argument, 0, OPT_IDS},
        {"help", no_argument, 0, OPT_HELP},
        {0, 0, 0, 0},
    };
    const char *dir = NULL, *prompt = NULL, *chat_path = NULL, *device = "cpu";
    const char *tmpl_path = NULL, *vars = NULL;
    const char *stops[MAX_STOP];
    int32_t stop_ids[MAX_STOP_IDS];
    int n_stop = 0, n_stop_ids = 0, ignore_eos = 0, no_gen = 0, int4 = 0, print_ids = 0;
    int threads = 0;
    gen_request q;
    gen_request_default(&q);
    q.max_tokens = 128;
    double v;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case OPT_MODEL:
            dir = optarg;
            break;
        case OPT_PROMPT:
            prompt = optarg;
            break;
        case OPT_CHAT:
            chat_path = optarg;
            break;
        case OPT_MAX:
            if (parse_num("--max-tokens", optarg, 1, 1 << 30, &v)) return 2;
            q.max_tokens = (int32_t)v;
            break;
        case OPT_TEMP:
            if (parse_num("--temperature", optarg, 0, 100, &v)) return 2;
            q.sampling.temperature = (float)v;
            break;
        case OPT_TOPP:
            if (parse_num("--top-p", optarg, 1e-9, 1, &v)) return 2;
            q.sampling.top_p = (float)v;
            break;
        case OPT_TOPK:
            if (parse_num("--top-k", optarg, 0, 1 << 30, &v)) return 2;
            q.sampling.top_k = (int32_t)v;
            break;
        case OPT_MINP:
            if (parse_num("--min-p", optarg, 0, 1, &v)) return 2;
            q.sampling.min_p = (float)v;
            break;
        case OPT_REP:
            if (parse_num("--repetition-penalty", optarg, 1e-9, 10, &v)) return 2;
            q.sampling.repetition_penalty = (float)v;
            break;
        case OPT_PRES:
            if (parse_num("--presence-penalty", optarg, -2, 2, &v)) return 2;
            q.sampling.presence_penalty = (float)v;
            break;
        case OPT_FREQ:
            if (parse_num("--frequency-penalty", optarg, -2, 2, &v)) return 2;
            q.sampling.frequency_penalty = (float)v;
            break;
        case OPT_SEED: {
            char *end;
            q.sampling.seed = strtoull(optarg, &end, 10);
            if (*optarg == 0 || *end != 0) {
                fprintf(stderr, "lightmoe generate: --seed %s: expected an integer\n", optarg);
                return 2;
            }
            break;
        }
        case OPT_STOP:
            if (n_stop == MAX_STOP) {
                fprintf(stderr, "lightmoe generate: at most %d --stop strings\n", MAX_STOP);
                return 2;
            }
            stops[n_stop++] = optarg;
            break;
        case OPT_STOPID:
            if (n_stop_ids == MAX_STOP_IDS || parse_num("--stop-id", optarg, 0, 1 << 30, &v))
                return 2;
            stop_ids[n_stop_ids++] = (int32_t)v;
            break;
        case OPT_IGNORE_EOS:
            ignore_eos = 1;
            break;
        case OPT_LOGPROBS:
            if (parse_num("--logprobs", optarg, 0, SAMPLE_MAX_LOGPROBS, &v)) return 2;
            q.sampling.logprobs = (int32_t)v;
            break;
        case OPT_DEVICE:
            device = optarg;
            break;
        case OPT_THREADS:
            if (parse_num("--threads", optarg, 0, 1024, &v)) return 2;
            threads = (int)v;
            break;
        case OPT_TEMPLATE:
            tmpl_path = optarg;
            break;
        case OPT_VARS:
            vars = optarg;
            break;
        case OPT_NOGEN:
            no_gen = 1;
            break;
        case OPT_INT4:
            int4 = 1;
            break;
        case OPT_IDS:
            print_ids = 1;
            break;
        case OPT_HELP:
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "lightmoe generate: unexpected argument '%s'\n", argv[optind]);
        usage(stderr);
        return 2;
    }
    if (!dir || (!prompt) == (!chat_path)) {
        fprintf(stderr, "lightmoe generate: give --model and exactly one of --prompt, --chat\n");
        usage(stderr);
        return 2;
    }
    if (strcmp(device, "cpu") != 0 && strcmp(device, "cuda") != 0) {
        fprintf(stderr, "lightmoe generate: --device %s: expected cpu or cuda\n", device);
        return 2;
    }
    lm_err err = {0};
    if (sample_params_check(&q.sampling, &err)) {
        fprintf(stderr, "lightmoe generate: %s\n", err.msg);
        return 2;
    }
    chat_message *msgs = NULL;
    int32_t n_msgs = 0;
    json_t *chat_root = NULL;
    if (chat_path && load_chat(chat_path, &msgs, &n_msgs, &chat_root)) return 2;

    int rc = 0, status = 2; /* until generation starts: input errors */
    model *m = NULL;
    backend *be = NULL;
    tokenizer *tok = NULL;
    chat_template *tmpl = NULL;
    sched *s = NULL;
    gen *g = NULL;
    sink snk;
    memset(&snk, 0, sizeof snk);
    pthread_mutex_init(&snk.mu, NULL);
    pthread_cond_init(&snk.cv, NULL);

    model_load_options mo;
    model_load_options_default(&mo);
    mo.quantize_int4 = int4;
    if ((rc = model_load(dir, &mo, &m, &err))) goto fail;
    backend_options bo;
    backend_options_default(&bo);
    bo.device = device;
    bo.threads = threads;
    if ((rc = backend_open(m, &bo, &be, &err))) goto fail;
    if ((rc = tokenizer_load(dir, &tok, &err))) goto fail;
    const tokenizer_info *ti = tokenizer_get_info(tok);
    rc = chat_template_load(dir, tmpl_path, ti->bos_token, ti->eos_token, &tmpl, &err);
    if (rc && (chat_path || tmpl_path)) goto fail; /* a plain prompt needs no template */
    sched_config sc;
    sched_config_default(&sc);
    sc.eos_ids = m->cfg.eos_ids;
    sc.n_eos_ids = m->cfg.n_eos;
    if (strcmp(device, "cpu") == 0) sc.kv_bytes = 512u << 20;
    if ((rc = sched_create(be, &sc, &s, &err))) goto fail;
    gen_config gc = {tok, tmpl, s, m->cfg.eos_ids, m->cfg.n_eos};
    if ((rc = gen_create(&gc, &g, &err))) goto fail;

    snk.tok = tok;
    q.prompt = prompt;
    q.messages = msgs;
    q.n_messages = n_msgs;
    q.add_generation_prompt = !no_gen;
    q.chat_extra_json = vars;
    q.stop = stops;
    q.n_stop = n_stop;
    q.stop_ids = stop_ids;
    q.n_stop_ids = n_stop_ids;
    q.ignore_eos = ignore_eos;
    q.on_event = on_event;
    q.user = &snk;
    int64_t t0 = now_ns();
    uint64_t id;
    if ((rc = gen_submit(g, &q, &id, &err)))
        goto fail; /* a bad request (prompt, template, limits): status 2 */
    /* print as text arrives */
    char *out = NULL;
    pthread_mutex_lock(&snk.mu);
    for (;;) {
        while (!snk.done && snk.n == 0 && snk.printed_toks == snk.n_toks)
            pthread_cond_wait(&snk.cv, &snk.mu);
        size_t n = snk.n;
        out = realloc(out, n + 1);
        if (n) memcpy(out, snk.text, n);
        snk.n = 0;
        int32_t from = snk.printed_toks, to = snk.n_toks;
        snk.printed_toks = to;
        int done = snk.done;
        pthread_mutex_unlock(&snk.mu);
        for (int32_t i = from; i < to && q.sampling.logprobs > 0; i++)
            print_logprobs(&snk, &snk.toks[i], i);
        fwrite(out, 1, n, stdout);
        fflush(stdout);
        pthread_mutex_lock(&snk.mu);
        if (done && snk.n == 0) break;
    }
    pthread_mutex_unlock(&snk.mu);
    free(out);
    int64_t t1 = now_ns();
    fputc('\n', stdout);
    if (print_ids) {
        fprintf(stderr, "ids:");
        for (int32_t i = 0; i < snk.n_toks; i++)
            fprintf(stderr, " %d", snk.toks[i].r.token);
        fputc('\n', stderr);
    }
    double secs = (double)(t1 - t0) / 1e9;
    double decode_s = snk.t_first_ns ? (double)(t1 - snk.t_first_ns) / 1e9 : 0;
    fprintf(stderr, "[finish: %s", finish_name(snk.finish));
    if (snk.has_stop) {
        fprintf(stderr, " (stop string ");
        print_quoted(stderr, snk.stop);
        fputc(')', stderr);
    } else if (snk.finish == SCHED_FINISH_STOP && snk.stop_token >= 0) {
        fprintf(stderr, " (token %d)", snk.stop_token);
    }
    fprintf(stderr, "; %d prompt + %d completion tokens in %.2f s", snk.prompt_tokens,
            snk.completion_tokens, secs);
    if (snk.completion_tokens > 1 && decode_s > 0)
        fprintf(stderr, ", %.1f tokens/s after the first", (snk.completion_tokens - 1) / decode_s);
    fprintf(stderr, "]\n");
    if (snk.finish == SCHED_FINISH_ERROR) fprintf(stderr, "lightmoe generate: %s\n", snk.message);
    status = snk.finish == SCHED_FINISH_ERROR || snk.oom ? 1 : 0;
    rc = 0;
fail:
    if (rc) fprintf(stderr, "lightmoe generate: %s\n", err.msg);
    sched_destroy(s);
    gen_destroy(g);
    backend_destroy(be);
    model_free(m);
    chat_template_free(tmpl);
    tokenizer_free(tok);
    free(snk.text);
    free(snk.toks);
    pthread_mutex_destroy(&snk.mu);
    pthread_cond_destroy(&snk.cv);
    free(msgs);
    json_decref(chat_root);
    return status;
}

CMD_REGISTER(generate, "generate", "generate text with a model in-process (streams to stdout)",
             generate_main)
