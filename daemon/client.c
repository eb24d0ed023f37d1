/*
 * client.c: the gRPC C core client of client.h.
 *
 * A call is one batch that sends the request and half-closes, receives the
 * initial metadata and (once the call ends) the status, then RECV_MESSAGE
 * batches until the stream ends; all on a pluck completion queue owned by
 * the lmc, so every wait names its tag.
 */
#include "daemon/client.h"

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/time.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lightmoe/v1/lightmoe.pb-c.h"

struct lmc {
    grpc_channel *ch;
    grpc_completion_queue *cq;
    char auth[1100];
};

void lmc_options_default(lmc_options *o)
{
    memset(o, 0, sizeof *o);
    o->server = "127.0.0.1:50051";
    o->stream = 1;
    o->temperature = -1;
    o->top_p = -1;
    o->top_k = -1;
}

const char *lmc_options_help(void)
{
    return "  --server ADDR          daemon address HOST:PORT or unix:/PATH (127.0.0.1:50051)\n"
           "  --token T | --token-file F   bearer token (authorization metadata)\n"
           "  --tls-ca F             PEM roots: use TLS; --tls-cert F --tls-key F for mTLS\n"
           "  --tls-server-name N    name to check in the server certificate\n"
           "  --timeout S            deadline of each call in seconds\n"
           "  --max-tokens N --temperature T --top-p P --top-k K --seed S --stop STR\n"
           "  --request-id ID        echoed in the daemon's log\n"
           "  --no-stream            use Complete (one answer) instead of Generate\n"
           "  --verbose              print finish reason, usage and timing to stderr\n";
}

int lmc_parse_option(lmc_options *o, int argc, char **argv, int *i)
{
    const char *a = argv[*i];
    if (!strcmp(a, "--no-stream")) {
        o->stream = 0;
        return 1;
    }
    if (!strcmp(a, "--verbose") || !strcmp(a, "-v")) {
        o->verbose = 1;
        return 1;
    }
    static const char *const with_value[] = {"--server", "--token", "--token-file", "--tls-ca",
                                             "--tls-cert", "--tls-key", "--tls-server-name",
                                             "--timeout", "--max-tokens", "--temperature",
                                             "--top-p", "--top-k", "--seed", "--stop",
                                             "--request-id"};
    int k = -1;
    for (size_t j = 0; j < sizeof with_value / sizeof *with_value; j++)
        if (!strcmp(a, with_value[j]))
            k = (int)j;
    if (k < 0)
        return 0;
    if (*i + 1 >= argc) {
        fprintf(stderr, "%s needs a value\n", a);
        return -1;
    }
    const char *v = argv[++*i];
    char *end = NULL;
    switch (k) {
    case 0: o->server = v; break;
    case 1: o->token = v; break;
    case 2: o->token_file = v; break;
    case 3: o->tls_ca = v; break;
    case 4: o->tls_cert = v; break;
    case 5: o->tls_key = v; break;
    case 6: o->tls_server_name = v; break;
    case 7: o->timeout_s = strtod(v, &end); break;
    case 8: o->max_tokens = (int32_t)strtol(v, &end, 10); break;
    case 9: o->temperature = strtof(v, &end); break;
    case 10: o->top_p = strtof(v, &end); break;
    case 11: o->top_k = (int32_t)strtol(v, &end, 10); break;
    case 12: o->seed = strtoull(v, &end, 10); o->has_seed = 1; break;
    case 13:
        if (o->n_stop >= 16) {
            fprintf(stderr, "at most 16 --stop strings\n");
            return -1;
        }
        o->stop[o->n_stop++] = v;
        break;
    case 14: o->request_id = v; break;
    }
    if (end && (*end || end == v)) {
        fprintf(stderr, "%s: '%s' is not a number\n", a, v);
        return -1;
    }
    return 1;
}

static char *slurp(const char *path, char *err, size_t n)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(err, n, "%s: cannot open", path);
        return NULL;
    }
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *b = len >= 0 ? malloc((size_t)len + 1) : NULL;
    if (b && fread(b, 1, (size_t)len, f) != (size_t)len) {
        free(b);
        b = NULL;
    }
    fclose(f);
    if (!b) {
        snprintf(err, n, "%s: cannot read", path);
        return NULL;
    }
    b[len] = 0;
    return b;
}

int lmc_connect(const lmc_options *o, lmc **ret, char *err, size_t errlen)
{
    lmc *c = calloc(1, sizeof *c);
    if (!c)
        return -1;
    const char *tok = o->token;
    char *file_tok = NULL;
    if (!tok && o->token_file) {
        file_tok = slurp(o->token_file, err, errlen);
        if (!file_tok) {
            free(c);
            return -1;
        }
        file_tok[strcspn(file_tok, "\r\n")] = 0;
        tok = file_tok;
    }
    if (tok)
        snprintf(c->auth, sizeof c->auth, "Bearer %s", tok);
    free(file_tok);
    grpc_init();
    grpc_channel_credentials *creds;
    if (o->tls_ca) {
        char *ca = slurp(o->tls_ca, err, errlen);
        char *cert = ca && o->tls_cert ? slurp(o->tls_cert, err, errlen) : NULL;
        char *key = cert && o->tls_key ? slurp(o->tls_key, err, errlen) : NULL;
        if (!ca || (o->tls_cert && !cert) || (o->tls_key && !key)) {
            free(ca);
            free(cert);
            free(key);
            free(c);
            grpc_shutdown();
            return -1;
        }
        grpc_ssl_pem_key_cert_pair pair = {key, cert};
        creds = grpc_ssl_credentials_create(ca, cert ? &pair : NULL, NULL, NULL);
        free(ca);
        free(cert);
        free(key);
    } else {
        creds = grpc_insecure_credentials_create();
    }
    grpc_arg args[2];
    memset(args, 0, sizeof args);
    int nargs = 0;
    args[nargs].type = GRPC_ARG_INTEGER;
    args[nargs].key = (char *)GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
    args[nargs].value.integer = 64 << 20;
    nargs++;
    if (o->tls_server_name) {
        args[nargs].type = GRPC_ARG_STRING;
        args[nargs].key = (char *)GRPC_SSL_TARGET_NAME_OVERRIDE_ARG;
        args[nargs].value.string = (char *)o->tls_server_name;
        nargs++;
    }
    grpc_channel_args ca = {(size_t)nargs, args};
    c->ch = grpc_channel_create(o->server, creds, &ca);
    grpc_channel_credentials_release(creds);
    c->cq = grpc_completion_queue_create_for_pluck(NULL);
    *ret = c;
    return 0;
}

void lmc_close(lmc *c)
{
    if (!c)
        return;
    grpc_channel_destroy(c->ch);
    grpc_completion_queue_shutdown(c->cq);
    while (grpc_completion_queue_pluck(c->cq, NULL, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type !=
           GRPC_QUEUE_SHUTDOWN) {
    }
    grpc_completion_queue_destroy(c->cq);
    free(c);
    grpc_shutdown();
}

/* Field 1 (text) of a serialized GenerateResponse, read from the wire:
 * protobuf-c hands strings over as C strings, which would cut the text at
 * a U+0000 the model may well produce. The last occurrence wins. */
static void wire_text(const uint8_t *p, size_t n, const uint8_t **ret, size_t *ret_len)
{
    size_t i = 0;
    *ret = NULL;
    *ret_len = 0;
    while (i < n) {
        uint64_t key = 0, v = 0;
        for (int sh = 0; i < n && sh < 64; sh += 7) {
            key |= (uint64_t)(p[i] & 0x7f) << sh;
            if (!(p[i++] & 0x80))
                break;
        }
        switch (key & 7) {
        case 0:
            while (i < n && (p[i++] & 0x80)) {
            }
            break;
        case 1: i += 8; break;
        case 5: i += 4; break;
        case 2:
            for (int sh = 0; i < n && sh < 64; sh += 7) {
                v |= (uint64_t)(p[i] & 0x7f) << sh;
                if (!(p[i++] & 0x80))
                    break;
            }
            if (v > n - i)
                return;
            if ((key >> 3) == 1) {
                *ret = p + i;
                *ret_len = (size_t)v;
            }
            i += (size_t)v;
            break;
        default:
            return;
        }
    }
}

static int wait_tag(lmc *c, void *tag)
{
    grpc_event ev = grpc_completion_queue_pluck(c->cq, tag, gpr_inf_future(GPR_CLOCK_REALTIME),
                                                NULL);
    return ev.type == GRPC_OP_COMPLETE && ev.success;
}

int lmc_generate(lmc *c, const lmc_options *o, const char *prompt, const char *const *roles,
                 const char *const *contents, int n_messages,
                 void (*on_delta)(void *user, const char *text, size_t len), void *user,
                 lmc_result *ret)
{
    memset(ret, 0, sizeof *ret);
    Lightmoe__V1__GenerateRequest q = LIGHTMOE__V1__GENERATE_REQUEST__INIT;
    Lightmoe__V1__ChatMessage *msgs = calloc((size_t)n_messages + 1, sizeof *msgs);
    Lightmoe__V1__ChatMessage **msgp = calloc((size_t)n_messages + 1, sizeof *msgp);
    for (int i = 0; i < n_messages; i++) {
        lightmoe__v1__chat_message__init(&msgs[i]);
        msgs[i].role = (char *)roles[i];
        msgs[i].content = (char *)contents[i];
        msgp[i] = &msgs[i];
    }
    q.prompt = (char *)(prompt ? prompt : "");
    q.n_messages = (size_t)n_messages;
    q.messages = msgp;
    if (o->max_tokens != 0) {
        q._max_tokens_case = LIGHTMOE__V1__GENERATE_REQUEST___MAX_TOKENS_MAX_TOKENS;
        q.max_tokens = o->max_tokens;
    }
    if (o->temperature >= 0) {
        q._temperature_case = LIGHTMOE__V1__GENERATE_REQUEST___TEMPERATURE_TEMPERATURE;
        q.temperature = o->temperature;
    }
    if (o->top_p >= 0) {
        q._top_p_case = LIGHTMOE__V1__GENERATE_REQUEST___TOP_P_TOP_P;
        q.top_p = o->top_p;
    }
    if (o->top_k >= 0) {
        q._top_k_case = LIGHTMOE__V1__GENERATE_REQUEST___TOP_K_TOP_K;
        q.top_k = o->top_k;
    }
    if (o->has_seed) {
        q._seed_case = LIGHTMOE__V1__GENERATE_REQUEST___SEED_SEED;
        q.seed = o->seed;
    }
    q.n_stop = (size_t)o->n_stop;
    q.stop = (char **)o->stop;
    q.request_id = (char *)(o->request_id ? o->request_id : "");
    size_t len = lightmoe__v1__generate_request__get_packed_size(&q);
    grpc_slice s = grpc_slice_malloc(len);
    lightmoe__v1__generate_request__pack(&q, GRPC_SLICE_START_PTR(s));
    grpc_byte_buffer *req = grpc_raw_byte_buffer_create(&s, 1);
    grpc_slice_unref(s);
    free(msgs);
    free(msgp);

    gpr_timespec deadline = o->timeout_s > 0
        ? gpr_time_add(gpr_now(GPR_CLOCK_REALTIME),
                       gpr_time_from_millis((int64_t)(o->timeout_s * 1000), GPR_TIMESPAN))
        : gpr_inf_future(GPR_CLOCK_REALTIME);
    grpc_slice method = grpc_slice_from_static_string(
        o->stream ? "/lightmoe.v1.LightMoE/Generate" : "/lightmoe.v1.LightMoE/Complete");
    grpc_call *call = grpc_channel_create_call(c->ch, NULL, GRPC_PROPAGATE_DEFAULTS, c->cq, method,
                                               NULL, deadline, NULL);
    grpc_metadata md[1];
    memset(md, 0, sizeof md);
    size_t n_md = 0;
    if (c->auth[0]) {
        md[0].key = grpc_slice_from_static_string("authorization");
        md[0].value = grpc_slice_from_copied_string(c->auth);
        n_md = 1;
    }
    grpc_metadata_array init_md, trail_md;
    grpc_metadata_array_init(&init_md);
    grpc_metadata_array_init(&trail_md);
    grpc_status_code status = GRPC_STATUS_UNKNOWN;
    grpc_slice details = grpc_empty_slice();
    grpc_op ops[5];
    memset(ops, 0, sizeof ops);
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[0].data.send_initial_metadata.count = n_md;
    ops[0].data.send_initial_metadata.metadata = md;
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = req;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &init_md;
    ops[4].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    ops[4].data.recv_status_on_client.trailing_metadata = &trail_md;
    ops[4].data.recv_status_on_client.status = &status;
    ops[4].data.recv_status_on_client.status_details = &details;
    void *main_tag = (void *)1, *recv_tag = (void *)2;
    grpc_call_start_batch(call, ops, 5, main_tag, NULL);

    for (;;) {
        grpc_byte_buffer *resp = NULL;
        grpc_op rop;
        memset(&rop, 0, sizeof rop);
        rop.op = GRPC_OP_RECV_MESSAGE;
        rop.data.recv_message.recv_message = &resp;
        if (grpc_call_start_batch(call, &rop, 1, recv_tag, NULL) != GRPC_CALL_OK)
            break;
        if (!wait_tag(c, recv_tag) || !resp)
            break;
        grpc_byte_buffer_reader rd;
        grpc_byte_buffer_reader_init(&rd, resp);
        grpc_slice all = grpc_byte_buffer_reader_readall(&rd);
        grpc_byte_buffer_reader_destroy(&rd);
        grpc_byte_buffer_destroy(resp);
        Lightmoe__V1__GenerateResponse *r = lightmoe__v1__generate_response__unpack(
            NULL, GRPC_SLICE_LENGTH(all), GRPC_SLICE_START_PTR(all));
        const uint8_t *text;
        size_t text_len;
        wire_text(GRPC_SLICE_START_PTR(all), GRPC_SLICE_LENGTH(all), &text, &text_len);
        if (r && text_len && on_delta)
            on_delta(user, (const char *)text, text_len);
        grpc_slice_unref(all);
        if (!r)
            break;
        if (r->finish_reason && r->finish_reason[0])
            snprintf(ret->finish_reason, sizeof ret->finish_reason, "%s", r->finish_reason);
        if (r->usage) {
            ret->prompt_tokens = r->usage->prompt_tokens;
            ret->completion_tokens = r->usage->completion_tokens;
        }
        if (r->timing) {
            ret->ttft_s = r->timing->time_to_first_token;
            ret->total_s = r->timing->total;
        }
        ret->cached |= r->cached;
        lightmoe__v1__generate_response__free_unpacked(r, NULL);
    }
    wait_tag(c, main_tag);
    ret->status = (int)status;
    snprintf(ret->message, sizeof ret->message, "%.*s", (int)GRPC_SLICE_LENGTH(details),
             (const char *)GRPC_SLICE_START_PTR(details));
    grpc_slice_unref(details);
    grpc_metadata_array_destroy(&init_md);
    grpc_metadata_array_destroy(&trail_md);
    if (n_md)
        grpc_slice_unref(md[0].value);
    grpc_byte_buffer_destroy(req);
    grpc_call_unref(call);
    return ret->status ? -1 : 0;
}
