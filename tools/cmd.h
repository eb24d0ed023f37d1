/*
 * cmd.h: subcommands of the `lightmoe` command line.
 *
 * Each subcommand lives in its own tools/cmd_<name>.c and registers itself
 * with CMD_REGISTER, so adding one touches no shared table. A subcommand's
 * main gets argv with argv[0] = its name, prints its own usage on bad
 * arguments and returns the process exit status (0 ok, 1 check failed,
 * 2 usage or input error).
 */
#ifndef LIGHTMOE_CMD_H
#define LIGHTMOE_CMD_H

typedef struct cmd_def {
    const char *name;
    const char *summary;        /* one line for `lightmoe --help` */
    int (*main)(int argc, char **argv);
} cmd_def;

void cmd_register(const cmd_def *def);

#define CMD_REGISTER(ident, name_, summary_, fn)                               \
    static const cmd_def cmd_def_##ident = {name_, summary_, fn};              \
    __attribute__((constructor)) static void cmd_register_##ident(void)        \
    {                                                                          \
        cmd_register(&cmd_def_##ident);                                        \
    }

#endif
