// Throughput of the AVX-512 (and AVX2) instructions the attention kernels are made of, on this core:
// how many of each it retires per nanosecond when nothing depends on anything (eight or twelve
// independent registers), alone and in pairs, and the two kernels' key loops as they are
// compiled (one iteration: the fast kernel's two groups of four channels for four heads, the
// exact kernel's four channels for four heads). Used by docs/performance.md ("Why int4 does
// not reach 0.4× f16", "The fast path on AVX2"). Needs an AVX-512 VNNI/VBMI CPU:
//
//   cc -O2 -o /tmp/vector-pipes docs/vector-pipes.c && /tmp/vector-pipes
#include <stdio.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

#define N 100000000L
#define REP12(op) op(0) op(1) op(2) op(3) op(4) op(5) op(6) op(7) op(8) op(9) op(10) op(11)
#define ALONE(name, op)                                                                    \
    do {                                                                                   \
        double t0 = now();                                                                 \
        for (long n = 0; n < N; n++) __asm__ volatile(REP12(op)::"r"(buf) : "memory");    \
        printf("%-28s %5.2f per ns\n", name, N * 12 / (now() - t0) / 1e9);                 \
    } while (0)

#define FMA(i) "vfmadd231ps %%zmm30, %%zmm31, %%zmm" #i "\n"
#define FMA_BCAST(i) "vfmadd231ps (%0)%{1to16%}, %%zmm31, %%zmm" #i "\n"
#define DPBUSD(i) "vpdpbusd %%zmm30, %%zmm31, %%zmm" #i "\n"
#define DPBUSD_BCAST(i) "vpdpbusd (%0)%{1to16%}, %%zmm31, %%zmm" #i "\n"
#define PERMPS(i) "vpermps %%zmm30, %%zmm31, %%zmm" #i "\n"
#define PERMT2B(i) "vpermt2b %%zmm30, %%zmm29, %%zmm" #i "\n"
#define SRLV(i) "vpsrlvd %%zmm30, %%zmm29, %%zmm" #i "\n"
#define CVT(i) "vcvtdq2ps %%zmm30, %%zmm" #i "\n"
#define LOAD(i) "vmovdqu64 (%0), %%zmm" #i "\n"
#define FMA_SRLV(i) "vfmadd231ps %%zmm30, %%zmm31, %%zmm" #i "\n vpsrlvd %%zmm28, %%zmm29, %%zmm1" #i "\n"
#define FMA_CVT(i) "vfmadd231ps %%zmm30, %%zmm31, %%zmm" #i "\n vcvtdq2ps %%zmm29, %%zmm1" #i "\n"
#define FMA_PERMPS(i) "vfmadd231ps %%zmm30, %%zmm31, %%zmm" #i "\n vpermps %%zmm28, %%zmm29, %%zmm1" #i "\n"
#define FMA_DPBUSD(i) "vfmadd231ps %%zmm30, %%zmm31, %%zmm" #i "\n vpdpbusd %%zmm28, %%zmm29, %%zmm1" #i "\n"
#define FMA_DPWSSD(i) "vfmadd231ps %%zmm30, %%zmm31, %%zmm" #i "\n vpdpwssd %%zmm28, %%zmm29, %%zmm1" #i "\n"
#define FOUR(op) op(0) op(1) op(2) op(3) op(4) op(5) op(6) op(7)
// AVX2's registers (what the forced-AVX2 kernels issue): FMAs, 16-bit integer products
// (vpmaddwd), adds, and pairs
#define FMA_Y(i) "vfmadd231ps %%ymm14, %%ymm15, %%ymm" #i "\n"
#define MADD_Y(i) "vpmaddwd %%ymm14, %%ymm15, %%ymm" #i "\n"
#define FMA_MADD_Y(i) "vfmadd231ps %%ymm14, %%ymm15, %%ymm" #i "\n vpmaddwd %%ymm12, %%ymm13, %%ymm" #i "\n"
#define MADD_ADD_Y(i) "vpmaddwd %%ymm14, %%ymm15, %%ymm" #i "\n vpaddd %%ymm12, %%ymm13, %%ymm8\n"
#define EIGHT(op) op(0) op(1) op(2) op(3) op(4) op(5) op(6) op(7)
#define PAIRED(name, body)                                                                 \
    do {                                                                                   \
        double t0 = now();                                                                 \
        for (long n = 0; n < N; n++) __asm__ volatile(body::: "memory");                   \
        printf("%-28s %5.2f instructions per ns\n", name, N * 16 / (now() - t0) / 1e9);    \
    } while (0)

int main(void) {
    static char buf[4096] __attribute__((aligned(64)));
    ALONE("vfmadd231ps", FMA);
    ALONE("vfmadd231ps, broadcast load", FMA_BCAST);
    ALONE("vpdpbusd", DPBUSD);
    ALONE("vpdpbusd, broadcast load", DPBUSD_BCAST);
    ALONE("vpermps", PERMPS);
    ALONE("vpermt2b", PERMT2B);
    ALONE("vpsrlvd", SRLV);
    ALONE("vcvtdq2ps", CVT);
    ALONE("64-byte load", LOAD);
    struct { const char *name; int which; } pairs[] = {{"vfmadd231ps + vpsrlvd", 0},
                                                       {"vfmadd231ps + vcvtdq2ps", 1},
                                                       {"vfmadd231ps + vpermps", 2}};
    for (int p = 0; p < 3; p++) {
        double t0 = now();
        for (long n = 0; n < N; n++) {
            if (pairs[p].which == 0) __asm__ volatile(FOUR(FMA_SRLV)::: "memory");
            else if (pairs[p].which == 1) __asm__ volatile(FOUR(FMA_CVT)::: "memory");
            else __asm__ volatile(FOUR(FMA_PERMPS)::: "memory");
        }
        printf("%-28s %5.2f instructions per ns\n", pairs[p].name, N * 16 / (now() - t0) / 1e9);
    }
    // integer products and FMAs compete for the same pipes on a Zen 4 (one 512-bit of
    // either per cycle, together as alone)
    PAIRED("vfmadd231ps + vpdpbusd", FOUR(FMA_DPBUSD));
    PAIRED("vfmadd231ps + vpdpwssd", FOUR(FMA_DPWSSD));
    {
        double t0 = now();
        for (long n = 0; n < N; n++) __asm__ volatile(EIGHT(FMA_Y) EIGHT(FMA_Y)::: "memory");
        printf("%-28s %5.2f instructions per ns\n", "ymm vfmadd231ps", N * 16 / (now() - t0) / 1e9);
        t0 = now();
        for (long n = 0; n < N; n++) __asm__ volatile(EIGHT(MADD_Y) EIGHT(MADD_Y)::: "memory");
        printf("%-28s %5.2f instructions per ns\n", "ymm vpmaddwd", N * 16 / (now() - t0) / 1e9);
    }
    PAIRED("ymm vfmadd231ps + vpmaddwd", EIGHT(FMA_MADD_Y));
    PAIRED("ymm vpmaddwd + vpaddd", EIGHT(MADD_ADD_Y));

    static int q[256];
    double t0 = now();
    for (long n = 0; n < N / 2; n++)
        __asm__ volatile(
            "vmovdqu64 (%0), %%zmm4\n vpermt2b 64(%0), %%zmm8, %%zmm4\n vpandq %%zmm9, %%zmm4, %%zmm4\n"
            "vpdpbusd (%1)%{1to16%}, %%zmm4, %%zmm10\n vpdpbusd 4(%1)%{1to16%}, %%zmm4, %%zmm11\n"
            "vpdpbusd 8(%1)%{1to16%}, %%zmm4, %%zmm12\n vpdpbusd 12(%1)%{1to16%}, %%zmm4, %%zmm13\n"
            "vpdpbusd 16(%1)%{1to16%}, %%zmm4, %%zmm14\n vpdpbusd 20(%1)%{1to16%}, %%zmm4, %%zmm15\n"
            "vpdpbusd 24(%1)%{1to16%}, %%zmm4, %%zmm16\n vpdpbusd 28(%1)%{1to16%}, %%zmm4, %%zmm17\n"
            "vmovdqu64 128(%0), %%zmm6\n vpermt2b 192(%0), %%zmm8, %%zmm6\n vpandq %%zmm9, %%zmm6, %%zmm6\n"
            "vpdpbusd 32(%1)%{1to16%}, %%zmm6, %%zmm18\n vpdpbusd 36(%1)%{1to16%}, %%zmm6, %%zmm19\n"
            "vpdpbusd 40(%1)%{1to16%}, %%zmm6, %%zmm20\n vpdpbusd 44(%1)%{1to16%}, %%zmm6, %%zmm21\n"
            "vpdpbusd 48(%1)%{1to16%}, %%zmm6, %%zmm22\n vpdpbusd 52(%1)%{1to16%}, %%zmm6, %%zmm23\n"
            "vpdpbusd 56(%1)%{1to16%}, %%zmm6, %%zmm24\n vpdpbusd 60(%1)%{1to16%}, %%zmm6, %%zmm25\n"
            ::"r"(buf), "r"(q) : "memory");
    double fast = (now() - t0) / (N / 2) * 1e9;
    t0 = now();
    for (long n = 0; n < N / 2; n++)
        __asm__ volatile(
            "vpbroadcastq (%0), %%zmm4\n vpsrlvd %%zmm30, %%zmm4, %%zmm4\n vpermps %%zmm31, %%zmm4, %%zmm4\n"
            "vpbroadcastq 8(%0), %%zmm5\n vpsrlvd %%zmm30, %%zmm5, %%zmm5\n vpermps %%zmm31, %%zmm5, %%zmm5\n"
            "vpbroadcastq 16(%0), %%zmm6\n vpsrlvd %%zmm30, %%zmm6, %%zmm6\n vpermps %%zmm31, %%zmm6, %%zmm6\n"
            "vpbroadcastq 24(%0), %%zmm7\n vpsrlvd %%zmm30, %%zmm7, %%zmm7\n vpermps %%zmm31, %%zmm7, %%zmm7\n"
            "vfmadd231ps (%1)%{1to16%}, %%zmm4, %%zmm10\n vfmadd231ps 4(%1)%{1to16%}, %%zmm5, %%zmm11\n"
            "vfmadd231ps 8(%1)%{1to16%}, %%zmm6, %%zmm12\n vfmadd231ps 12(%1)%{1to16%}, %%zmm7, %%zmm13\n"
            "vfmadd231ps 256(%1)%{1to16%}, %%zmm4, %%zmm14\n vfmadd231ps 260(%1)%{1to16%}, %%zmm5, %%zmm15\n"
            "vfmadd231ps 264(%1)%{1to16%}, %%zmm6, %%zmm16\n vfmadd231ps 268(%1)%{1to16%}, %%zmm7, %%zmm17\n"
            "vfmadd231ps 512(%1)%{1to16%}, %%zmm4, %%zmm18\n vfmadd231ps 516(%1)%{1to16%}, %%zmm5, %%zmm19\n"
            "vfmadd231ps 520(%1)%{1to16%}, %%zmm6, %%zmm20\n vfmadd231ps 524(%1)%{1to16%}, %%zmm7, %%zmm21\n"
            "vfmadd231ps 768(%1)%{1to16%}, %%zmm4, %%zmm22\n vfmadd231ps 772(%1)%{1to16%}, %%zmm5, %%zmm23\n"
            "vfmadd231ps 776(%1)%{1to16%}, %%zmm6, %%zmm24\n vfmadd231ps 780(%1)%{1to16%}, %%zmm7, %%zmm25\n"
            ::"r"(buf), "r"(buf + 1024) : "memory");
    double exact = (now() - t0) / (N / 2) * 1e9;
    printf("int4 key loop, fast kernel:  %.3f ns per 4 channels x 4 heads x 16 tokens\n", fast / 2);
    printf("int4 key loop, exact kernel: %.3f ns per 4 channels x 4 heads x 16 tokens\n", exact);

    long z = 0;
    t0 = now();
    for (long n = 0; n < N; n++) __asm__ volatile("add $1, %0\n add $1, %0\n add $1, %0\n add $1, %0" : "+r"(z));
    printf("clock (a chain of dependent adds): %.2f GHz\n", 4.0 * N / (now() - t0) / 1e9);
    return 0;
}
