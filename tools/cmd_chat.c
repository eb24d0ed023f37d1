/*
 * cmd_chat.c: `lightmoe chat --server ADDR [OPTIONS] [--system TEXT]`: a
 * conversation with a running lightmoed. Each line read from stdin is a
 * user turn; the answer streams to stdout and joins the history, so the
 * model sees the whole conversation (rendered with its chat template by
 * the server). An empty line or end of input ends the chat.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "daemon/client.h"
#include "tools/cmd.h"

#define MAX_TURNS 256

typedef struct answer {
    char *text;
    size_t len, cap;
} answer;

static void collect(void *user, const char *text, size_t len)
{
    answer *a = user;
    fwrite(text, 1, len, stdout);
    fflush(stdout);
    if (a->len + len + 1 > a->cap) {
        size_t nc = (a->cap ? a->cap * 2 : 256) + len;
        char *t = realloc(a->text, nc);
        if (!t)
            return;
        a->text = t;
        a->cap = nc;
    }
    memcpy(a->text + a->len, text, len);
    a->len += len;
    a->text[a->len] = 0;
}

static int chat_main(int argc, char **argv)
{
    lmc_options o;
    lmc_options_default(&o);
    const char *system = NULL;
    for (int i = 1; i < argc; i++) {
        int r = lmc_parse_option(&o, argc, argv, &i);
        if (r < 0)
            return 2;
        if (r)
            continue;
        if (!strcmp(argv[i], "--system") && i + 1 < argc) {
            system = argv[++i];
            continue;
        }
        if (!strcmp(argv[i], "--help")) {
            printf("usage: lightmoe chat [OPTIONS] [--system TEXT]\n\n"
                   "Each line on stdin is a user turn; an empty line ends the chat.\n\n%s",
                   lmc_options_help());
            return 0;
        }
        fprintf(stderr, "lightmoe chat: unknown argument '%s' (see --help)\n", argv[i]);
        return 2;
    }
    lmc *c;
    char err[256];
    if (lmc_connect(&o, &c, err, sizeof err)) {
        fprintf(stderr, "lightmoe chat: %s\n", err);
        return 2;
    }
    const char *roles[MAX_TURNS];
    char *contents[MAX_TURNS];
    int n = 0, rc = 0, tty = isatty(STDIN_FILENO);
    if (system) {
        roles[n] = "system";
        contents[n++] = strdup(system);
    }
    char line[8192];
    for (;;) {
        if (tty) {
            fputs("> ", stderr);
            fflush(stderr);
        }
        if (!fgets(line, sizeof line, stdin))
            break;
        line[strcspn(line, "\r\n")] = 0;
        if (!line[0])
            break;
        if (n + 2 > MAX_TURNS) {
            fprintf(stderr, "lightmoe chat: conversation too long (%d turns)\n", MAX_TURNS);
            break;
        }
        roles[n] = "user";
        contents[n++] = strdup(line);
        answer a = {0};
        lmc_result res;
        if (lmc_generate(c, &o, NULL, roles, (const char *const *)contents, n, collect, &a,
                         &res)) {
            fprintf(stderr, "\nlightmoe chat: %s: %s\n", o.server, res.message);
            free(a.text);
            rc = 1;
            break;
        }
        fputc('\n', stdout);
        if (o.verbose)
            fprintf(stderr, "[finish=%s prompt_tokens=%d completion_tokens=%d ttft=%.3fs]\n",
                    res.finish_reason, res.prompt_tokens, res.completion_tokens, res.ttft_s);
        roles[n] = "assistant";
        contents[n++] = a.text ? a.text : strdup("");
    }
    for (int i = 0; i < n; i++)
        free(contents[i]);
    lmc_close(c);
    return rc;
}

CMD_REGISTER(chat, "chat", "talk with a running lightmoed (one line per turn, streamed)",
             chat_main)
