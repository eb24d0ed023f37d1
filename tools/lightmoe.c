/*
 * lightmoe.c: the `lightmoe` command line: dispatch to a subcommand.
 *
 * Subcommands register themselves (cmd.h); this file only finds one by
 * name and lists them for --help.
 */
#include "tools/cmd.h"

#include <stdio.h>
#include <string.h>

#define CMD_MAX 64

static const cmd_def *cmds[CMD_MAX];
static int n_cmds;

void cmd_register(const cmd_def *def)
{
    if (n_cmds < CMD_MAX)
        cmds[n_cmds++] = def;
}

static void usage(FILE *f)
{
    fprintf(f, "usage: lightmoe COMMAND [ARGS...]\n\ncommands:\n");
    for (int i = 0; i < n_cmds; i++)
        fprintf(f, "  %-12s %s\n", cmds[i]->name, cmds[i]->summary);
    fprintf(f, "\n`lightmoe COMMAND --help` describes each command.\n");
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
        usage(stdout);
        return 0;
    }
    if (!strcmp(argv[1], "--version")) {
        printf("lightmoe %s\n", LIGHTMOE_VERSION);
        return 0;
    }
    for (int i = 0; i < n_cmds; i++)
        if (!strcmp(cmds[i]->name, argv[1]))
            return cmds[i]->main(argc - 1, argv + 1);
    fprintf(stderr, "lightmoe: unknown command '%s'\n", argv[1]);
    usage(stderr);
    return 2;
}
