/*
 * redis_harness.c: see redis_harness.h.
 */
#include "redis_harness.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <hiredis/hiredis.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* Servers still running when the test exits (a failed CHECK calls exit):
 * killed by an atexit handler so that no redis-server outlives its test. */
static pid_t live[16];

static void kill_live(void)
{
    for (int i = 0; i < 16; i++)
        if (live[i] > 0) {
            kill(live[i], SIGCONT);
            kill(live[i], SIGKILL);
            waitpid(live[i], NULL, 0);
            live[i] = 0;
        }
}

static void track(pid_t pid, int add)
{
    static int registered;
    if (!registered) {
        atexit(kill_live);
        registered = 1;
    }
    for (int i = 0; i < 16; i++)
        if (add ? live[i] == 0 : live[i] == pid) {
            live[i] = add ? pid : 0;
            return;
        }
}

static int free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t l = sizeof a;
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) || getsockname(fd, (struct sockaddr *)&a, &l)) {
        if (fd >= 0)
            close(fd);
        return -1;
    }
    close(fd);
    return ntohs(a.sin_port);
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static int ping(const redis_proc *r)
{
    struct timeval tv = {0, 200000};
    redisContext *c = redisConnectWithTimeout("127.0.0.1", r->port, tv);
    if (!c || c->err) {
        if (c)
            redisFree(c);
        return -1;
    }
    redisReply *rep = r->password[0] ? redisCommand(c, "AUTH %s", r->password) : NULL;
    if (rep)
        freeReplyObject(rep);
    rep = redisCommand(c, "PING");
    int ok = rep && rep->type == REDIS_REPLY_STATUS;
    if (rep)
        freeReplyObject(rep);
    redisFree(c);
    return ok ? 0 : -1;
}

int redis_start(redis_proc *r, int port, const char *password)
{
    if (!r->dir[0]) {
        const char *tmp = getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
        snprintf(r->dir, sizeof r->dir, "%s/lmredis.XXXXXX", tmp);
        if (!mkdtemp(r->dir))
            return -1;
        snprintf(r->sock, sizeof r->sock, "%s/redis.sock", r->dir);
    }
    snprintf(r->password, sizeof r->password, "%s", password ? password : "");
    for (int attempt = 0; attempt < 5; attempt++) {
        r->port = port ? port : free_port();
        char ps[16];
        snprintf(ps, sizeof ps, "%d", r->port);
        pid_t pid = fork();
        if (pid < 0)
            return -1;
        if (pid == 0) {
            prctl(PR_SET_PDEATHSIG, SIGKILL); /* never outlive a killed test */
            /* A session (and so a process group) of its own: the tests stop
             * the server with SIGSTOP and expect it to stay stopped until
             * they send SIGCONT. In the test's process group it would not:
             * when that group becomes orphaned (the process linking it to
             * the rest of the session exits: a shell that started the tests
             * in the background, a runner's wrapper) while the server is
             * stopped, the kernel sends SIGHUP and SIGCONT to every member,
             * and the server answers in the middle of a "stopped" check
             * (test_get_stream saw hits from a stopped Redis that way). */
            setsid();
            int dn = open("/dev/null", 1);
            if (dn >= 0) {
                dup2(dn, 1);
                dup2(dn, 2);
            }
            const char *argv[32];
            int n = 0;
            argv[n++] = "redis-server";
            argv[n++] = "--port"; argv[n++] = ps;
            argv[n++] = "--bind"; argv[n++] = "127.0.0.1";
            argv[n++] = "--dir"; argv[n++] = r->dir;
            argv[n++] = "--save"; argv[n++] = "";
            argv[n++] = "--appendonly"; argv[n++] = "no";
            argv[n++] = "--unixsocket"; argv[n++] = r->sock;
            argv[n++] = "--unixsocketperm"; argv[n++] = "700";
            argv[n++] = "--enable-debug-command"; argv[n++] = "yes";
            argv[n++] = "--daemonize"; argv[n++] = "no";
            if (r->password[0]) {
                argv[n++] = "--requirepass";
                argv[n++] = r->password;
            }
            argv[n] = NULL;
            execvp("redis-server", (char *const *)argv);
            _exit(127);
        }
        r->pid = pid;
        track(pid, 1);
        for (int i = 0; i < 100; i++) { /* up to 5 s */
            if (ping(r) == 0)
                return 0;
            int st;
            if (waitpid(pid, &st, WNOHANG) == pid) {
                track(pid, 0);
                r->pid = 0;
                break; /* port taken meanwhile? try another */
            }
            sleep_ms(50);
        }
        if (r->pid) {
            redis_kill(r);
            return -1;
        }
        if (port)
            sleep_ms(200); /* same port wanted: the old socket may linger */
    }
    return -1;
}

void redis_kill(redis_proc *r)
{
    if (r->pid > 0) {
        kill(r->pid, SIGCONT);
        kill(r->pid, SIGKILL);
        waitpid(r->pid, NULL, 0);
        track(r->pid, 0);
        r->pid = 0;
    }
}

/* Main thread's state letter from /proc/<pid>/stat ('T' stopped), or 0. */
static char proc_state(pid_t pid)
{
    char path[64], buf[512];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return 0;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    const char *p = strrchr(buf, ')'); /* the name may hold spaces and ')' */
    return p && p[1] == ' ' ? p[2] : 0;
}

int redis_pause(redis_proc *r)
{
    if (r->pid <= 0 || kill(r->pid, SIGSTOP))
        return -1;
    for (int i = 0; i < 2000; i++) { /* up to 2 s */
        if (proc_state(r->pid) == 'T')
            return 0;
        sleep_ms(1);
    }
    return -1;
}

int redis_resume(redis_proc *r)
{
    int rc = r->pid > 0 && proc_state(r->pid) == 'T' ? 0 : -1;
    if (r->pid > 0)
        kill(r->pid, SIGCONT);
    return rc;
}

void redis_cleanup(redis_proc *r)
{
    redis_kill(r);
    if (!r->dir[0])
        return;
    DIR *d = opendir(r->dir);
    if (d) {
        struct dirent *de;
        while ((de = readdir(d))) {
            if (de->d_name[0] == '.')
                continue;
            char p[600];
            snprintf(p, sizeof p, "%s/%s", r->dir, de->d_name);
            unlink(p);
        }
        closedir(d);
    }
    rmdir(r->dir);
    r->dir[0] = '\0';
}

int redis_admin(const redis_proc *r, char *out, size_t n, const char *fmt, ...)
{
    struct timeval tv = {2, 0};
    redisContext *c = redisConnectWithTimeout("127.0.0.1", r->port, tv);
    if (!c || c->err) {
        if (c)
            redisFree(c);
        return -1;
    }
    if (r->password[0]) {
        redisReply *a = redisCommand(c, "AUTH %s", r->password);
        if (a)
            freeReplyObject(a);
    }
    va_list ap;
    va_start(ap, fmt);
    redisReply *rep = redisvCommand(c, fmt, ap);
    va_end(ap);
    int rc = rep && rep->type != REDIS_REPLY_ERROR ? 0 : -1;
    if (out && n) {
        out[0] = '\0';
        if (rep && (rep->type == REDIS_REPLY_STRING || rep->type == REDIS_REPLY_STATUS ||
                    rep->type == REDIS_REPLY_ERROR))
            snprintf(out, n, "%s", rep->str);
        else if (rep && rep->type == REDIS_REPLY_INTEGER)
            snprintf(out, n, "%lld", rep->integer);
    }
    if (rep)
        freeReplyObject(rep);
    redisFree(c);
    return rc;
}
