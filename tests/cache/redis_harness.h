/*
 * redis_harness.h: start a real redis-server for the cache tests.
 *
 * Each server runs in its own temporary folder (mkdtemp under TMPDIR) on a
 * free TCP port of 127.0.0.1 and a unix socket in that folder, with no
 * persistence, and DEBUG enabled (for DEBUG SLEEP). The test process keeps
 * the pid to kill, pause (SIGSTOP) and restart it on the same port. Each
 * server is in a session of its own, so that nothing but the test resumes
 * it (see redis_start).
 */
#ifndef LIGHTMOE_TEST_REDIS_HARNESS_H
#define LIGHTMOE_TEST_REDIS_HARNESS_H

#include <sys/types.h>

typedef struct redis_proc {
    pid_t pid;
    int port;
    char dir[256];              /* temp folder */
    char sock[300];             /* unix socket path */
    char password[64];          /* requirepass, "" = none */
} redis_proc;

/* Start (port 0 = pick a free one); waits until it answers PING. 0 or -1. */
int redis_start(redis_proc *r, int port, const char *password);
/* SIGKILL and reap (the folder stays for a restart). */
void redis_kill(redis_proc *r);
/* SIGSTOP, then wait (up to 2 s) until the kernel shows the server
 * stopped. 0 or -1. */
int redis_pause(redis_proc *r);
/* SIGCONT. 0 if the server was still stopped, -1 if something had resumed
 * it meanwhile (whatever was checked "against a stopped Redis" was not). */
int redis_resume(redis_proc *r);
/* Kill if running and remove the folder. */
void redis_cleanup(redis_proc *r);
/* Run one command on a fresh connection (as the admin); returns 0 if the
 * reply was not an error. Text reply copied into out when given. */
int redis_admin(const redis_proc *r, char *out, size_t n, const char *fmt, ...);

#endif
