// An LD_PRELOAD shim that makes the kernel refuse chosen NUMA syscalls, for the C harness's
// fault tests (scripts/test.sh runs `harness fault_syscalls` under it).
//
//   LD_PRELOAD=build/c/fault_shim.so NUMA_MOE_FAULT="mbind=EPERM,move_pages=ENOSYS" harness fault
//
// numa-moe issues mbind, move_pages, get_mempolicy and set_mempolicy through libc's exported
// `syscall()` (src/sys.rs: libc::syscall(SYS_mbind, ...)), so a preloaded `syscall` sees every
// one of them. A chosen call fails with the chosen errno, as under Docker's default seccomp
// profile (EPERM) or on a kernel built without NUMA (ENOSYS); every other call goes to libc's
// own `syscall`. numa_moe_fault_hits() tells the harness the shim is loaded and how often a
// call was refused.

#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

struct fault {
    long          nr;
    const char *  name;
    int           err;   // 0: not refused
    unsigned long hits;  // times refused
};

static struct fault g_faults[] = {
    { SYS_mbind, "mbind", 0, 0 },
    { SYS_move_pages, "move_pages", 0, 0 },
    { SYS_get_mempolicy, "get_mempolicy", 0, 0 },
    { SYS_set_mempolicy, "set_mempolicy", 0, 0 },
};
#define N_FAULTS (sizeof g_faults / sizeof g_faults[0])

static const struct {
    const char * name;
    int          err;
} k_errnos[] = { { "EPERM", EPERM }, { "ENOSYS", ENOSYS }, { "EACCES", EACCES }, { "EINVAL", EINVAL }, { "ENOMEM", ENOMEM } };

static void bad_spec(const char * spec, const char * why) {
    fprintf(stderr, "fault_shim: NUMA_MOE_FAULT=\"%s\": %s (use call=ERRNO,... with calls mbind, move_pages, "
                    "get_mempolicy, set_mempolicy and errnos EPERM, ENOSYS, EACCES, EINVAL, ENOMEM)\n", spec, why);
    _exit(2);
}

// Reads NUMA_MOE_FAULT before main; a spec the shim cannot read stops the process, so a typo
// never turns a fault test into a test of nothing.
__attribute__((constructor)) static void read_spec(void) {
    const char * spec = getenv("NUMA_MOE_FAULT");
    if (!spec) {
        return;
    }
    const char * p = spec;
    while (*p) {
        const char * eq  = strchr(p, '=');
        const char * end = strchr(p, ',');
        if (!end) {
            end = p + strlen(p);
        }
        if (!eq || eq > end) {
            bad_spec(spec, "an entry has no '='");
        }
        struct fault * f = NULL;
        for (size_t i = 0; i < N_FAULTS; i++) {
            if (strlen(g_faults[i].name) == (size_t) (eq - p) && strncmp(p, g_faults[i].name, (size_t) (eq - p)) == 0) {
                f = &g_faults[i];
            }
        }
        if (!f) {
            bad_spec(spec, "unknown syscall");
        }
        for (size_t i = 0; i < sizeof k_errnos / sizeof k_errnos[0]; i++) {
            if (strlen(k_errnos[i].name) == (size_t) (end - eq - 1) && strncmp(eq + 1, k_errnos[i].name, (size_t) (end - eq - 1)) == 0) {
                f->err = k_errnos[i].err;
            }
        }
        if (!f->err) {
            bad_spec(spec, "unknown errno");
        }
        p = *end ? end + 1 : end;
    }
}

typedef long (*syscall_fn)(long, ...);

long syscall(long nr, ...) {
    // Linux syscalls take at most six register arguments; read six whatever the call (the
    // x86-64 and aarch64 conventions make the extra ones harmless) and pass them on.
    va_list ap;
    va_start(ap, nr);
    long a[6];
    for (int i = 0; i < 6; i++) {
        a[i] = va_arg(ap, long);
    }
    va_end(ap);
    for (size_t i = 0; i < N_FAULTS; i++) {
        if (g_faults[i].nr == nr && g_faults[i].err) {
            __atomic_fetch_add(&g_faults[i].hits, 1, __ATOMIC_RELAXED);
            errno = g_faults[i].err;
            return -1;
        }
    }
    static syscall_fn real;
    syscall_fn        fn = __atomic_load_n(&real, __ATOMIC_ACQUIRE);
    if (!fn) {
        fn = (syscall_fn) dlsym(RTLD_NEXT, "syscall");
        if (!fn) {
            errno = ENOSYS;
            return -1;
        }
        __atomic_store_n(&real, fn, __ATOMIC_RELEASE);
    }
    return fn(nr, a[0], a[1], a[2], a[3], a[4], a[5]);
}

// How many times `name` was refused; (unsigned long) -1 for a name the shim does not know.
unsigned long numa_moe_fault_hits(const char * name) {
    for (size_t i = 0; i < N_FAULTS; i++) {
        if (strcmp(g_faults[i].name, name) == 0) {
            return __atomic_load_n(&g_faults[i].hits, __ATOMIC_RELAXED);
        }
    }
    return (unsigned long) -1;
}
