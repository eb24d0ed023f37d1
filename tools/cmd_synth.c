/*
 * cmd_synth.c: `lightmoe synth`: write a random-weight checkpoint in the
 * hub layout (engine/synth.h) for a preset.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/synth.h"
#include "tools/cmd.h"

static void usage(FILE *f)
{
    fprintf(f,
            "usage: lightmoe synth --arch ARCH --preset NAME [--gptq] [--group G]\n"
            "                      [--act-order] [--asym] [--seed N] [--layers N]\n"
            "                      [--shard-mb MB] OUTDIR\n"
            "  ARCH    qwen2_moe | qwen3_moe | mixtral\n"
            "  NAME    tiny | qwen1.5-moe-a2.7b | qwen3-30b-a3b | mixtral-8x7b\n"
            "  --gptq  GPTQ 4-bit linears (v1 layout), group G (128)\n");
}

static int synth_main(int argc, char **argv)
{
    synth_options o;
    synth_options_default(&o);
    o.arch = NULL;
    const char *out = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "--gptq")) {
            o.gptq = 1;
        } else if (!strcmp(a, "--act-order")) {
            o.act_order = 1;
        } else if (!strcmp(a, "--asym")) {
            o.asym = 1;
        } else if (v && !strcmp(a, "--arch")) {
            o.arch = argv[++i];
        } else if (v && !strcmp(a, "--preset")) {
            o.preset = argv[++i];
        } else if (v && !strcmp(a, "--group")) {
            o.group = atoi(argv[++i]);
        } else if (v && !strcmp(a, "--seed")) {
            o.seed = strtoull(argv[++i], NULL, 10);
        } else if (v && !strcmp(a, "--layers")) {
            o.layers = atoi(argv[++i]);
        } else if (v && !strcmp(a, "--shard-mb")) {
            o.shard_bytes = (size_t)atol(argv[++i]) << 20;
        } else if (a[0] != '-' && !out) {
            out = a;
        } else {
            fprintf(stderr, "synth: unknown or incomplete argument '%s'\n", a);
            usage(stderr);
            return 2;
        }
    }
    if (!o.arch || !out) {
        usage(stderr);
        return 2;
    }
    lm_err err = {0};
    if (synth_write(out, &o, &err)) {
        fprintf(stderr, "synth: %s\n", err.msg);
        return 2;
    }
    printf("synth: wrote %s (%s %s%s)\n", out, o.arch, o.preset, o.gptq ? ", GPTQ" : "");
    return 0;
}

CMD_REGISTER(synth, "synth", "write a random-weight checkpoint (hub layout) for a preset",
             synth_main)
