/*
 * numa-vm probe: reports, in one-line key=value records, what an emulated
 * guest offers numa-moe: the x86-64-v3 instructions llama.cpp is built for
 * (checked by executing them, not only by CPUID) and the NUMA syscalls
 * (mbind, get_mempolicy, move_pages) on every node, for anonymous memory and,
 * when a file is given, for its page cache pages (as with an mmap()ed model).
 *
 * Raw syscalls keep it free of libnuma, so it needs nothing but libc.
 * Built by selftest.sh; usage: probe [FILE]
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#define MPOL_BIND 2
#define MPOL_MF_MOVE (1 << 1)
#define MPOL_F_NODE (1 << 0)
#define MPOL_F_ADDR (1 << 1)
#define MASK_WORDS 16 /* 1024 nodes */

static long sys_mbind(void *addr, unsigned long len, int mode, const unsigned long *mask,
                      unsigned long maxnode, unsigned flags) {
    return syscall(SYS_mbind, addr, len, mode, mask, maxnode, flags);
}
static long sys_get_mempolicy(int *mode, unsigned long *mask, unsigned long maxnode,
                              void *addr, unsigned long flags) {
    return syscall(SYS_get_mempolicy, mode, mask, maxnode, addr, flags);
}
static long sys_move_pages(int pid, unsigned long count, void **pages, const int *nodes,
                           int *status, int flags) {
    return syscall(SYS_move_pages, pid, count, pages, nodes, status, flags);
}

static const char *errname(int e) {
    switch (e) {
    case EINVAL: return "EINVAL";
    case ENODEV: return "ENODEV";
    case ENOENT: return "ENOENT";
    case EFAULT: return "EFAULT";
    case EACCES: return "EACCES";
    case EBUSY: return "EBUSY";
    case ENOMEM: return "ENOMEM";
    case EPERM: return "EPERM";
    case ENOSYS: return "ENOSYS";
    case EIO: return "EIO";
    default: {
        static char buf[32];
        snprintf(buf, sizeof buf, "errno%d", e);
        return buf;
    }
    }
}

/* Each function computes something whose result differs if the instruction is
 * missing or emulated wrongly; returns 1 when all results are right. */
__attribute__((target("avx2,fma"))) static int check_fma(void) {
    /* x*y is not exact in float; fma(x, y, -round(x*y)) yields the rounding
     * error (2^-24) only when the multiply-add is really fused. */
    volatile float xv = 1.0f + 0x1p-12f;
    __m256 x = _mm256_set1_ps(xv);
    __m256 p = _mm256_mul_ps(x, x);
    __m256 r = _mm256_fmadd_ps(x, x, _mm256_sub_ps(_mm256_setzero_ps(), p));
    float out[8];
    _mm256_storeu_ps(out, r);
    for (int i = 0; i < 8; i++)
        if (out[i] != 0x1p-24f) return 0;
    return 1;
}

__attribute__((target("avx2"))) static int check_avx2(void) {
    __m256i a = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256i idx = _mm256_setr_epi32(7, 6, 5, 4, 3, 2, 1, 0);
    __m256i r = _mm256_add_epi32(_mm256_permutevar8x32_epi32(a, idx), _mm256_set1_epi32(100));
    int out[8];
    _mm256_storeu_si256((__m256i *)out, r);
    for (int i = 0; i < 8; i++)
        if (out[i] != 107 - i) return 0;
    return 1;
}

__attribute__((target("avx,f16c"))) static int check_f16c(void) {
    /* 1.0, -2.0, 0.5, 65504 (max half), 2^-24 (smallest subnormal), 0, -0, inf */
    const uint16_t h[8] = {0x3C00, 0xC000, 0x3800, 0x7BFF, 0x0001, 0x0000, 0x8000, 0x7C00};
    const float want[8] = {1.0f, -2.0f, 0.5f, 65504.0f, 0x1p-24f, 0.0f, -0.0f, __builtin_inff()};
    __m256 f = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)h));
    float out[8];
    _mm256_storeu_ps(out, f);
    for (int i = 0; i < 8; i++)
        if (memcmp(&out[i], &want[i], sizeof(float)) != 0) return 0;
    uint16_t back[8];
    _mm_storeu_si128((__m128i *)back, _mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT));
    return memcmp(back, h, sizeof h) == 0;
}

__attribute__((target("bmi,bmi2,lzcnt"))) static int check_bmi(void) {
    volatile uint64_t v = 0xB, m = 0xF0F0;
    return _pdep_u64(v, m) == 0xB0 && _pext_u64(0xB0, m) == 0xB &&
           _bzhi_u64(0xFFFF, 4) == 0xF && _lzcnt_u64(1) == 63 && _tzcnt_u64(8) == 3 &&
           _andn_u64(0xF0, 0xFF) == 0x0F;
}

static void report_isa(void) {
    __builtin_cpu_init();
    int avx = !!__builtin_cpu_supports("avx"), avx2 = !!__builtin_cpu_supports("avx2");
    int fma = !!__builtin_cpu_supports("fma"), f16c = !!__builtin_cpu_supports("f16c");
    int bmi = !!__builtin_cpu_supports("bmi"), bmi2 = !!__builtin_cpu_supports("bmi2");
    int lzcnt = !!__builtin_cpu_supports("abm") || !!__builtin_cpu_supports("lzcnt");
    int movbe = !!__builtin_cpu_supports("movbe");
    int v3 = avx && avx2 && fma && f16c && bmi && bmi2 && lzcnt && movbe;
    printf("isa avx=%d avx2=%d fma=%d f16c=%d bmi1=%d bmi2=%d lzcnt=%d movbe=%d x86-64-v3=%d",
           avx, avx2, fma, f16c, bmi, bmi2, lzcnt, movbe, v3);
    /* Only executed when CPUID claims support: otherwise they would SIGILL. */
    printf(" exec-avx2=%s", avx2 ? (check_avx2() ? "ok" : "WRONG") : "skip");
    printf(" exec-fma=%s", avx2 && fma ? (check_fma() ? "ok" : "WRONG") : "skip");
    printf(" exec-f16c=%s", avx && f16c ? (check_f16c() ? "ok" : "WRONG") : "skip");
    printf(" exec-bmi=%s\n", bmi && bmi2 && lzcnt ? (check_bmi() ? "ok" : "WRONG") : "skip");
}

static int page_node(void *p) {
    int node = -1;
    if (sys_get_mempolicy(&node, NULL, 0, p, MPOL_F_NODE | MPOL_F_ADDR) != 0) return -1;
    return node;
}

/* move_pages() returns <0 on error, else how many pages it could not move;
 * status then holds the page's node or a negative errno. */
static const char *move_result(long rc, int status, int want) {
    if (rc < 0) return errname(errno);
    if (status < 0) return errname(-status);
    if (status == want) return "ok";
    return rc > 0 ? "notmoved" : "elsewhere";
}

/* move_pages with nodes == NULL only reports where each page is. */
static int where(void *p) {
    int status = -1;
    if (sys_move_pages(0, 1, &p, NULL, &status, 0) != 0) return -1;
    return status;
}

static void report_node(int n, long psz, const char *file) {
    unsigned long mask[MASK_WORDS] = {0};
    mask[n / (8 * sizeof(long))] |= 1UL << (n % (8 * sizeof(long)));

    /* mbind: bind a fresh page to node n, touch it, ask where it landed. */
    char *a = mmap(NULL, psz, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    printf("node %d", n);
    if (sys_mbind(a, psz, MPOL_BIND, mask, MASK_WORDS * 8 * sizeof(long), 0) == 0) {
        a[0] = 1;
        printf(" mbind=ok placed=%d", page_node(a));
    } else {
        printf(" mbind=%s placed=-", errname(errno));
    }
    munmap(a, psz);

    /* move_pages: a default-policy page, moved to node n. */
    char *b = mmap(NULL, psz, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    b[0] = 1;
    int status = -1000;
    void *pg = b;
    long rc = sys_move_pages(0, 1, &pg, &n, &status, MPOL_MF_MOVE);
    printf(" move=%s", move_result(rc, status, n));
    printf(" moved-to=%d", where(b));
    munmap(b, psz);

    /* The same for a shared read-only file mapping: page cache pages of the
     * initramfs (tmpfs or ramfs), as llama.cpp's mmap()ed model would be. */
    if (file) {
        int fd = open(file, O_RDONLY);
        char *f = fd >= 0 ? mmap(NULL, psz, PROT_READ, MAP_SHARED, fd, 0) : MAP_FAILED;
        if (f == MAP_FAILED) {
            printf(" filemove=nofile");
        } else {
            volatile char c = f[0];
            (void)c;
            pg = f;
            status = -1000;
            rc = sys_move_pages(0, 1, &pg, &n, &status, MPOL_MF_MOVE);
            printf(" filemove=%s", move_result(rc, status, n));
            printf(" file-on=%d", where(f));
            munmap(f, psz);
        }
        if (fd >= 0) close(fd);
    }
    printf("\n");
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    report_isa();

    long psz = sysconf(_SC_PAGESIZE);
    DIR *d = opendir("/sys/devices/system/node");
    if (!d) {
        printf("numa none\n");
        return 0;
    }
    int nodes[1024], count = 0;
    struct dirent *e;
    while ((e = readdir(d)) && count < 1024) {
        int n;
        char tail;
        if (sscanf(e->d_name, "node%d%c", &n, &tail) == 1) nodes[count++] = n;
    }
    closedir(d);
    /* readdir order is arbitrary; report in node order. */
    for (int i = 1; i < count; i++)
        for (int j = i; j > 0 && nodes[j - 1] > nodes[j]; j--) {
            int t = nodes[j];
            nodes[j] = nodes[j - 1];
            nodes[j - 1] = t;
        }
    printf("numa nodes=%d\n", count);
    for (int i = 0; i < count; i++) report_node(nodes[i], psz, argc > 1 ? argv[1] : NULL);
    return 0;
}
