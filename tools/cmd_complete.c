/*
 * cmd_complete.c: `lightmoe complete --server ADDR [OPTIONS] PROMPT`: send
 * one prompt to a running lightmoed and print the answer as it streams.
 * PROMPT "-" (or none) reads the prompt from stdin. Exit 0 on OK, 1 when
 * the server answered an error (its status and message on stderr), 2 for
 * usage errors.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "daemon/client.h"
#include "tools/cmd.h"

static void put(void *user, const char *text, size_t len)
{
    fwrite(text, 1, len, stdout);
    fflush(stdout);
}

static char *read_all(FILE *f)
{
    size_t n = 0, cap = 4096;
    char *b = malloc(cap);
    size_t k;
    while (b && (k = fread(b + n, 1, cap - n - 1, f)) > 0) {
        n += k;
        if (cap - n < 2) {
            char *nb = realloc(b, cap *= 2);
            if (!nb) {
                free(b);
                return NULL;
            }
            b = nb;
        }
    }
    if (b)
        b[n] = 0;
    return b;
}

static int complete_main(int argc, char **argv)
{
    lmc_options o;
    lmc_options_default(&o);
    const char *prompt = NULL;
    for (int i = 1; i < argc; i++) {
        int r = lmc_parse_option(&o, argc, argv, &i);
        if (r < 0)
            return 2;
        if (r)
            continue;
        if (!strcmp(argv[i], "--help")) {
            printf("usage: lightmoe complete [OPTIONS] PROMPT|-\n\n%s", lmc_options_help());
            return 0;
        }
        if (argv[i][0] == '-' && argv[i][1]) {
            fprintf(stderr, "lightmoe complete: unknown option '%s' (see --help)\n", argv[i]);
            return 2;
        }
        if (prompt) {
            fprintf(stderr, "lightmoe complete: one PROMPT only (quote it)\n");
            return 2;
        }
        prompt = argv[i];
    }
    char *owned = NULL;
    if (!prompt || !strcmp(prompt, "-")) {
        owned = read_all(stdin);
        prompt = owned ? owned : "";
    }
    lmc *c;
    char err[256];
    if (lmc_connect(&o, &c, err, sizeof err)) {
        fprintf(stderr, "lightmoe complete: %s\n", err);
        free(owned);
        return 2;
    }
    lmc_result res;
    int rc = lmc_generate(c, &o, prompt, NULL, NULL, 0, put, NULL, &res);
    if (rc)
        fprintf(stderr, "lightmoe complete: %s: %s\n", o.server, res.message);
    else if (o.verbose)
        fprintf(stderr, "\n[finish=%s prompt_tokens=%d completion_tokens=%d ttft=%.3fs "
                "total=%.3fs%s]\n", res.finish_reason, res.prompt_tokens, res.completion_tokens,
                res.ttft_s, res.total_s, res.cached ? " cached" : "");
    lmc_close(c);
    free(owned);
    return rc ? 1 : 0;
}

CMD_REGISTER(complete, "complete", "send a prompt to a running lightmoed (streams the answer)",
             complete_main)
