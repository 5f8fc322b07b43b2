// ternlm._C: CPU kernels for packed ternary linear layers.
//
// A plain CPython extension (no torch headers, so it builds in seconds): every function takes raw
// data pointers as Python ints (tensor.data_ptr()) plus sizes; the Python side in
// ternlm/kernels/ checks dtypes, shapes and contiguity before calling in.
//
// One binary for every x86-64: each instruction set's kernels are compiled from the same source
// under __attribute__((target(...))) and chosen at run time with __builtin_cpu_supports, so the
// build needs no -march flag. Levels: 0 scalar, 1 AVX2, 2 AVX-512BW, 3 AVX-512 VNNI, 4 AMX-INT8 (the
// VNNI level with the tile GEMM of csrc/amx.inc at several tokens). On other architectures only the
// scalar level exists.
//
// Weight layouts are documented with bit diagrams in ternlm/quant/pack.py. Both store code + 1
// in {0,1,2}; the integer kernels compute sum((c+1) * x) with u8 x s8 dot instructions and
// subtract the token's activation sum, which equals sum(c * x) exactly.

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <pthread.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

// -DTL_PORTABLE_ONLY builds what a non-x86 machine gets (the scalar level only).
#if (defined(__x86_64__) || defined(_M_X64)) && !defined(TL_PORTABLE_ONLY)
#define TL_X86 1
#include <cpuid.h>
#include <immintrin.h>
#else
#define TL_X86 0
#endif

enum { LV_SCALAR = 0, LV_AVX2 = 1, LV_AVX512 = 2, LV_VNNI = 3, LV_AMX = 4, LV_COUNT = 5 };
enum { FMT_2BIT = 0, FMT_BASE3 = 1 };

// out[m * 4 + r] for an MR x NR tile (MR tokens, NR weight rows). n: for the packed 2-bit tiles the
// number of 64-weight planes of a row (np / 4 full blocks, then np % 4 tail planes), for the decoded
// ones the number of 64-byte vectors.
typedef void (*TileI)(const uint8_t* w, int64_t ws, const int8_t* x, int64_t xs, int64_t n, int32_t* out);
// out[r] for one token x NR rows.
typedef void (*TileF)(const uint8_t* w, int64_t ws, const float* x, int64_t n, float* out);
typedef void (*DecodeFn)(const uint8_t* src, int64_t Kp, uint8_t* dst, int64_t Kx, int off);
// One token x 4 rows with per-group scales, groups of ppg whole 64-weight planes: y[r] = sum over
// groups gi < G, in order, of (float)(acc[r][gi] - xgsum[gi]) * sc[r * G + gi] (float32, no FMA).
typedef void (*TileG)(const uint8_t* w, int64_t ws, const int8_t* x, int64_t np, int64_t ppg, int64_t G,
                      const int32_t* xgsum, const float* sc, float* y);
// MR tokens x 4 rows, groups of exactly 64 (G == np): x (MR, xs), xgsum (MR, G), y[m * 4 + r]; each
// token's y is TileG pg64's, bit for bit.
typedef void (*TileGM)(const uint8_t* w, int64_t ws, const int8_t* x, int64_t xs, int64_t np, int64_t G,
                       const int32_t* xgsum, const float* sc, float* y);
typedef void (*QuantFn)(const float* x, int64_t K, int64_t Kx, float qmax, int8_t* q, float* scale,
                        int32_t* sum);
// MLP activations of the compiled decode step: a[i] = gelu_tanh(u[i]), or a[i] = silu(g[i]) * u[i].
typedef void (*GeluFn)(const float* u, float* a, int64_t n);
typedef void (*SiluMulFn)(const float* g, const float* u, float* a, int64_t n);
// Softmax numerator of the decode attention: p[i] = exp(p[i] - mx); returns the sum.
typedef float (*SoftmaxExpFn)(float* p, int64_t n, float mx);
// The decode attention's two loops over the cache, one call per head: p[t] = (q . K[t]) * scale for
// t < T (returns max p), and o = sum_t p[t] V[t]. Each element's operations are those of a dot
// product and of axpys into a zeroed o, in t order, so every level keeps its own rounding.
typedef float (*ScoresFn)(const float* q, const float* K, int64_t T, int64_t hs, float scale, float* p);
typedef void (*WsumFn)(float* o, const float* p, const float* V, int64_t T, int64_t hs);

struct A8GroupJob;
struct A8Job;

struct Isa {
  TileI p2[4][4];   // packed 2-bit weights, int8 activations
  TileI pl[4][4];   // the same, one sum per 64-weight plane: out[(b * 4 + s) * 16 + m * 4 + r]
  TileG pg1;        // the same with the per-group float epilogue, one token x 4 rows
  TileG pg64;       // pg1 for groups of exactly 64 with G == np (ppg 1), or null (the scalar level)
  TileGM pgm[4];    // pg64 for 1-4 tokens at once (pgm[MR - 1]), or null
  int (*amx_g64)(const A8GroupJob& j, int nth);  // the AMX GEMM for groups of 64 (csrc/amx.inc), or null
  int (*amx_a8)(const A8Job& j, int nth);         // the AMX GEMM for per-tensor / per-row scales, or null
  TileI u8[4][4];   // decoded u8 weights, int8 activations
  TileF fs8[4];     // decoded signed int8 codes, float activations (one token)
  DecodeFn dec2, dec3;
  QuantFn quant;
  GeluFn gelu_tanh;  // the vector levels evaluate exp by a polynomial (|error| ~ 3e-7 against tanhf)
  SiluMulFn silu_mul;
  SoftmaxExpFn softmax_exp;
  ScoresFn scores;  // the decode attention: scores of one head, then its weighted sum of values
  WsumFn wsum;
};

#define FILL_ROW(T, F, M) \
  T[M - 1][0] = F<M, 1>;  \
  T[M - 1][1] = F<M, 2>;  \
  T[M - 1][2] = F<M, 3>;  \
  T[M - 1][3] = F<M, 4>;
#define FILL_ROW1(T, F) \
  T[0] = F<1>;            \
  T[1] = F<2>;            \
  T[2] = F<3>;            \
  T[3] = F<4>;
#define FILL_TABLE(T, F) \
  do {                   \
    FILL_ROW(T, F, 1)    \
    FILL_ROW(T, F, 2)    \
    FILL_ROW(T, F, 3)    \
    FILL_ROW(T, F, 4)    \
  } while (0)

// ---------------------------------------------------------------------------------------------
// Portable scalar level: the model every vector level must match bit for bit (integer path).
namespace scalar_ns {
#define TL_TARGET
#include "isa_common.inc"
#undef TL_TARGET

// One 64-weight plane p of a 2-bit row (full-block planes first, then the tail planes; see
// ternlm/quant/pack.py) dotted with its 64 activations.
static int32_t plane_dot(const uint8_t* wr, const int8_t* x, int64_t p, int64_t nb) {
  int32_t acc = 0;
  if (p < nb * 4) {
    const uint8_t* wb = wr + (p / 4) * 64;
    const int sh = 2 * (int)(p % 4);
    for (int j = 0; j < 64; j++) acc += (int32_t)((wb[j] >> sh) & 3) * x[p * 64 + j];
    return acc;
  }
  const uint8_t* wt = wr + nb * 64 + (p - nb * 4) * 16;
  const int8_t* xt = x + p * 64;
  for (int j = 0; j < 16; j++) {
    const uint8_t byte = wt[j];
    acc += (int32_t)(byte & 3) * xt[j] + (int32_t)((byte >> 2) & 3) * xt[16 + j] +
           (int32_t)((byte >> 4) & 3) * xt[32 + j] + (int32_t)(byte >> 6) * xt[48 + j];
  }
  return acc;
}

// MR tokens x NR rows over np 64-weight planes of packed 2-bit rows.
template <int MR, int NR>
static void tile_p2(const uint8_t* w, int64_t ws, const int8_t* x, int64_t xs, int64_t np, int32_t* out) {
  const int64_t nb = np / 4;
  for (int m = 0; m < MR; m++)
    for (int r = 0; r < NR; r++) {
      int32_t acc = 0;
      const uint8_t* wr = w + r * ws;
      const int8_t* xm = x + m * xs;
      for (int64_t b = 0; b < nb; b++)
        for (int j = 0; j < 64; j++) {
          const uint8_t byte = wr[b * 64 + j];
          const int8_t* xb = xm + b * 256 + j;
          acc += (int32_t)(byte & 3) * xb[0] + (int32_t)((byte >> 2) & 3) * xb[64] +
                 (int32_t)((byte >> 4) & 3) * xb[128] + (int32_t)(byte >> 6) * xb[192];
        }
      for (int64_t p = nb * 4; p < np; p++) acc += plane_dot(wr, xm, p, nb);
      out[m * 4 + r] = acc;
    }
}

// Per-plane sums: plane s of block b holds weights b * 256 + s * 64 .. + 63 (2-bit field s of the
// block's 64 bytes), tail plane t weights nb * 256 + t * 64 .. + 63, so with groups of 64 (or any
// multiple) each plane lies in one group. out[p * 16 + m * 4 + r], p = 0 .. np - 1.
template <int MR, int NR>
static void tile_pl(const uint8_t* w, int64_t ws, const int8_t* x, int64_t xs, int64_t np, int32_t* out) {
  for (int64_t p = 0; p < np; p++)
    for (int m = 0; m < MR; m++)
      for (int r = 0; r < NR; r++) out[p * 16 + m * 4 + r] = plane_dot(w + r * ws, x + m * xs, p, np / 4);
}

static void tile_pg1(const uint8_t* w, int64_t ws, const int8_t* x, int64_t np, int64_t ppg, int64_t G,
                     const int32_t* xgsum, const float* sc, float* y) {
  for (int r = 0; r < 4; r++) {
    float acc = 0.0f;
    for (int64_t gi = 0; gi < G; gi++) {
      int32_t t = 0;
      for (int64_t p = gi * ppg; p < std::min(np, (gi + 1) * ppg); p++) t += plane_dot(w + r * ws, x, p, np / 4);
      acc = acc + (float)(t - xgsum[gi]) * sc[r * G + gi];
    }
    y[r] = acc;
  }
}

template <int NR>
static void tile_f_s8(const uint8_t* w, int64_t ws, const float* x, int64_t nvec, float* out) {
  for (int r = 0; r < NR; r++) {
    float acc = 0.0f;
    const int8_t* wr = (const int8_t*)(w + r * ws);
    for (int64_t k = 0; k < nvec * 64; k++) acc += (float)wr[k] * x[k];
    out[r] = acc;
  }
}

static void quant(const float* x, int64_t K, int64_t Kx, float qmax, int8_t* q, float* scale, int32_t* sum) {
  float amax = 0.0f;
  for (int64_t k = 0; k < K; k++) amax = fabsf(x[k]) > amax ? fabsf(x[k]) : amax;
  const float s = (amax > 1e-5f ? amax : 1e-5f) / qmax;
  int32_t total = 0;
  quant_tail(x, 0, K, Kx, s, qmax, q, &total);
  *scale = s;
  *sum = total;
}

static void gelu_tanh(const float* u, float* a, int64_t n) {
  const float c = 0.7978845608028654f;  // sqrt(2 / pi)
  for (int64_t i = 0; i < n; i++) {
    const float x = u[i];
    a[i] = 0.5f * x * (1.0f + tanhf(c * (x + 0.044715f * (x * x * x))));
  }
}

static void silu_mul(const float* g, const float* u, float* a, int64_t n) {
  for (int64_t i = 0; i < n; i++) a[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

static float scores(const float* q, const float* K, int64_t T, int64_t hs, float scale, float* p) {
  float mx = -INFINITY;
  for (int64_t t = 0; t < T; t++) {
    float s = 0.0f;
    for (int64_t i = 0; i < hs; i++) s += q[i] * K[t * hs + i];
    p[t] = s * scale;
    mx = std::max(mx, p[t]);
  }
  return mx;
}

static void wsum(float* o, const float* p, const float* V, int64_t T, int64_t hs) {
  memset(o, 0, sizeof(float) * (size_t)hs);
  for (int64_t t = 0; t < T; t++)
    for (int64_t i = 0; i < hs; i++) o[i] += p[t] * V[t * hs + i];
}

static float softmax_exp(float* p, int64_t n, float mx) {
  float sum = 0.0f;
  for (int64_t i = 0; i < n; i++) {
    p[i] = expf(p[i] - mx);
    sum += p[i];
  }
  return sum;
}

static void fill(Isa& I) {
  FILL_TABLE(I.p2, tile_p2);
  FILL_TABLE(I.pl, tile_pl);
  I.pg1 = tile_pg1;
  I.gelu_tanh = gelu_tanh;
  I.silu_mul = silu_mul;
  I.softmax_exp = softmax_exp;
  I.scores = scores;
  I.wsum = wsum;
  FILL_TABLE(I.u8, tile_u8_generic);
  FILL_ROW1(I.fs8, tile_f_s8);
  I.dec2 = dec2;
  I.dec3 = dec3;
  I.quant = quant;
}
}  // namespace scalar_ns

#if TL_X86
#define TL_NS avx2_ns
#define TL_TARGET __attribute__((target("avx2,fma")))
#include "isa_avx2.inc"
#undef TL_NS
#undef TL_TARGET

#define TL_NS avx512_ns
#define TL_TARGET __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq")))
#define TL_VNNI 0
#include "isa_avx512.inc"
#undef TL_NS
#undef TL_TARGET
#undef TL_VNNI

#define TL_NS vnni_ns
#define TL_TARGET __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))
#define TL_VNNI 1
#include "isa_avx512.inc"
#undef TL_NS
#undef TL_TARGET
#undef TL_VNNI
#endif

static Isa g_isa[LV_COUNT];
static bool g_have[LV_COUNT];
static int g_best = LV_SCALAR;

#if TL_X86
namespace amx_ns {  // csrc/amx.inc
static bool available();
static int gemm_g64(const A8GroupJob& j, int nth);
static int gemm_a8(const A8Job& j, int nth);
}  // namespace amx_ns
#endif

static void init_isas() {
  scalar_ns::fill(g_isa[LV_SCALAR]);
  g_have[LV_SCALAR] = true;
#if TL_X86
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool bw = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  const bool vnni = bw && __builtin_cpu_supports("avx512vnni");
  avx2_ns::fill(g_isa[LV_AVX2]);
  avx512_ns::fill(g_isa[LV_AVX512]);
  vnni_ns::fill(g_isa[LV_VNNI]);
  // the plane tiles read 32-byte halves: the AVX2 ones serve the AVX-512 levels too
  memcpy(g_isa[LV_AVX512].pl, g_isa[LV_AVX2].pl, sizeof(g_isa[LV_AVX2].pl));
  memcpy(g_isa[LV_VNNI].pl, g_isa[LV_AVX2].pl, sizeof(g_isa[LV_AVX2].pl));
  g_isa[LV_AVX512].pg1 = g_isa[LV_VNNI].pg1 = g_isa[LV_AVX2].pg1;
  g_isa[LV_AVX512].pg64 = g_isa[LV_AVX2].pg64;  // VNNI has its own
  memcpy(g_isa[LV_AVX512].pgm, g_isa[LV_AVX2].pgm, sizeof(g_isa[LV_AVX2].pgm));
  // the activations: 8-wide AVX2 code at every vector level
  g_isa[LV_AVX512].gelu_tanh = g_isa[LV_VNNI].gelu_tanh = g_isa[LV_AVX2].gelu_tanh;
  g_isa[LV_AVX512].silu_mul = g_isa[LV_VNNI].silu_mul = g_isa[LV_AVX2].silu_mul;
  g_isa[LV_AVX512].softmax_exp = g_isa[LV_VNNI].softmax_exp = g_isa[LV_AVX2].softmax_exp;
  g_have[LV_AVX2] = avx2;
  g_have[LV_AVX512] = bw;
  g_have[LV_VNNI] = vnni;
  g_isa[LV_AMX] = g_isa[LV_VNNI];
  g_have[LV_AMX] = vnni && amx_ns::available();
  if (g_have[LV_AMX]) g_isa[LV_AMX].amx_g64 = amx_ns::gemm_g64, g_isa[LV_AMX].amx_a8 = amx_ns::gemm_a8;
#endif
  for (int l = 0; l < LV_COUNT; l++)
    if (g_have[l]) g_best = l;
}

// ---------------------------------------------------------------------------------------------
// Threading: a small persistent pool where tasks are CLAIMED, not assigned. The calling thread
// publishes a job and starts working on it at once; pool threads join when they wake and take
// whatever tasks are left. The caller only ever waits for tasks some thread has already started.
//
// Why not OpenMP: its parallel region ends in a barrier that waits for every team thread. On a
// shared machine a team thread that cannot get a core holds that barrier for a full scheduler
// slice (measured 4-8 ms per call on a busy 2-core VM, against a 20-500 us kernel). Here a
// thread that does not show up costs nothing: the caller does its share.
//
// A decode step hands ~120 GEMVs of 2-10 us each to the pool, so the hand-off itself must cost
// little more than a cache-line transfer:
//   - jobs live in a ring of slots inside the pool (no allocation) and are published with one
//     atomic store of the generation; the mutex and condition variable are touched only when a
//     worker has gone to sleep;
//   - the tasks are split into one contiguous range per thread, each with its own claim counter on
//     its own cache line: a thread claims from its range without contention (and streams contiguous
//     rows), then takes what is left of the others' ranges. A helper that never shows up has its
//     whole range done by the caller.

static const int POOL_SLOTS = 8;
static const int MAX_RANGES = 64;  // more threads than this share ranges

struct alignas(64) Range {
  std::atomic<int64_t> next{0};
  int64_t end = 0;
};

struct Job {
  void (*fn)(void*, int64_t) = nullptr;
  void* ctx = nullptr;
  int64_t n = 0;
  int nranges = 0;
  int max_helpers = 0;
  std::atomic<uint64_t> stamp{0};  // the generation this slot serves; 0 while it is being refilled
  std::atomic<int> refs{0};        // threads inside the job, the caller included
  std::atomic<int> helpers{0};
  Range range[MAX_RANGES];
  alignas(64) std::atomic<int64_t> done{0};  // tasks finished, added once per thread when it stops
};

// Thread t works through range t, then through what is left of the others.
static void job_work(Job* j, int t) {
  int64_t ran = 0;
  const int R = j->nranges;
  for (int k = 0; k < R; k++) {
    Range& r = j->range[(t + k) % R];
    for (;;) {
      const int64_t i = r.next.fetch_add(1, std::memory_order_relaxed);
      if (i >= r.end) break;
      j->fn(j->ctx, i);
      ran++;
    }
  }
  if (ran) j->done.fetch_add(ran, std::memory_order_release);
}

struct Pool {
  Job slots[POOL_SLOTS];
  alignas(64) std::atomic<uint64_t> gen{0};  // the newest published job is slots[gen % POOL_SLOTS]
  std::atomic<int> sleepers{0};
  std::mutex call_mu;  // orders concurrent callers' publications (uncontended in a decode loop)
  std::mutex mu;       // sleeping workers only
  std::condition_variable cv;
  int nthreads = 0;
};

static Pool* g_pool = nullptr;
static long g_pool_pid = 0;

// Pause iterations a worker spins before sleeping (~0.3 ms). A decode step runs a kernel, then
// a few microseconds of norms and attention single-threaded, then the next kernel: a worker that
// stays awake across those gaps joins at once instead of paying a futex wake-up per layer, while
// the core it holds would otherwise sit idle anyway.
//
// Only while torch's own ops run single-threaded (ternlm's decode loops: set_pool_spin(-1) there, 0 after):
// elsewhere a spinning worker holds a core that torch's OpenMP team is waiting for at its barrier, and
// every torch op between two kernels pays for it (SmolLM2 W1.58A8 classifier, 64-token messages at
// batch 1, 2 threads: rotary embedding, norms and SiLU several times slower than in the fp32 model).
#ifndef TL_POOL_SPIN
#define TL_POOL_SPIN 20000
#endif
static std::atomic<int> g_spin{0};

static void pool_worker(Pool* p) {
  uint64_t seen = 0;
  for (;;) {
    uint64_t g = p->gen.load(std::memory_order_acquire);
    const int spins = g_spin.load(std::memory_order_relaxed);
    for (int spin = 0; g == seen && spin < spins; spin++) {
#if TL_X86
      _mm_pause();
#endif
      g = p->gen.load(std::memory_order_acquire);
    }
    if (g == seen) {
      // NOTE: sleepers is raised before gen is read again under the mutex, and a caller stores gen
      // before it reads sleepers (both sequentially consistent): a caller that sees no sleeper
      // published before this worker's check, which then sees the new generation.
      std::unique_lock<std::mutex> lk(p->mu);
      p->sleepers.fetch_add(1);
      p->cv.wait(lk, [&] { return p->gen.load() != seen; });
      p->sleepers.fetch_sub(1);
      g = p->gen.load(std::memory_order_acquire);
    }
    seen = g;
    Job* j = &p->slots[g % POOL_SLOTS];
    j->refs.fetch_add(1);
    // the slot may already serve a newer job, or be refilled: join only the generation seen
    if (j->stamp.load() == g) {
      const int h = j->helpers.fetch_add(1, std::memory_order_relaxed);
      if (h < j->max_helpers) job_work(j, h + 1);
    }
    j->refs.fetch_sub(1, std::memory_order_release);
  }
}

// The pool as the calling process last saw it with at least g_pool_ready threads: read without locks
// or a getpid() system call on every kernel call. A forked child clears it (pthread_atfork), then
// takes the slow path below, which starts the child's own threads.
static std::atomic<Pool*> g_pool_fast{nullptr};
static std::atomic<int> g_pool_ready{0};
static void pool_forget_in_child() { g_pool_fast.store(nullptr, std::memory_order_relaxed); }

static Pool* pool_get(int helpers) {
  Pool* fast = g_pool_fast.load(std::memory_order_acquire);
  if (fast && g_pool_ready.load(std::memory_order_relaxed) >= helpers) return fast;
  static std::mutex create_mu;
  static std::once_flag atfork_once;
  std::call_once(atfork_once, [] { pthread_atfork(nullptr, nullptr, pool_forget_in_child); });
  std::lock_guard<std::mutex> create_lk(create_mu);
  // a forked child inherits the pool's memory but not its threads: start a fresh one
  const long pid = (long)getpid();
  if (!g_pool || g_pool_pid != pid) {
    g_pool = new Pool();  // deliberately leaked: its threads live for the whole process
    g_pool_pid = pid;
  }
  std::lock_guard<std::mutex> lk(g_pool->mu);
  while (g_pool->nthreads < helpers) {
    std::thread(pool_worker, g_pool).detach();
    g_pool->nthreads++;
  }
  g_pool_ready.store(g_pool->nthreads, std::memory_order_relaxed);
  g_pool_fast.store(g_pool, std::memory_order_release);
  return g_pool;
}

template <class F>
static void call_task(void* ctx, int64_t i) {
  (*(const F*)ctx)(i);
}

template <class F>
static void parallel_for(int64_t n, int nth, const F& f) {
  if (nth > n) nth = (int)n;
  if (nth <= 1) {
    for (int64_t i = 0; i < n; i++) f(i);
    return;
  }
  // Concurrent callers (GIL released) are safe: each finishes its own job, a newer job only
  // takes the pool's attention away from an older one.
  Pool* p = pool_get(nth - 1);
  Job* j;
  uint64_t g;
  {
    std::lock_guard<std::mutex> lk(p->call_mu);
    g = p->gen.load(std::memory_order_relaxed) + 1;
    j = &p->slots[g % POOL_SLOTS];
    // retire the slot (POOL_SLOTS jobs old): no thread may still be inside it when it is refilled
    j->stamp.store(0);
    while (j->refs.load(std::memory_order_acquire) != 0) {
#if TL_X86
      _mm_pause();
#endif
    }
    j->fn = call_task<F>;
    j->ctx = (void*)&f;
    j->n = n;
    j->max_helpers = nth - 1;
    j->nranges = std::min(nth, MAX_RANGES);
    for (int k = 0; k < j->nranges; k++) {
      j->range[k].next.store(n * k / j->nranges, std::memory_order_relaxed);
      j->range[k].end = n * (k + 1) / j->nranges;
    }
    j->helpers.store(0, std::memory_order_relaxed);
    j->done.store(0, std::memory_order_relaxed);
    j->refs.fetch_add(1);
    j->stamp.store(g);
    p->gen.store(g);
  }
  if (p->sleepers.load() > 0) {
    { std::lock_guard<std::mutex> lk(p->mu); }
    p->cv.notify_all();
  }
  job_work(j, 0);
  while (j->done.load(std::memory_order_acquire) < n) {  // only tasks already running elsewhere
#if TL_X86
    _mm_pause();
#endif
  }
  j->refs.fetch_sub(1, std::memory_order_release);
}

static inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Tokens per block of the GEMM path: 64 tokens x K int8 stay in L2 while a chunk's decoded rows
// (4 * TILES_PER_CHUNK rows x K bytes) are reused from L1/L2 across them.
static const int64_t TOKENS_PER_BLOCK = 64;
static const int64_t TILES_PER_CHUNK = 8;  // 32 rows
// Below this many tokens the 2-bit kernel reads packed weights directly (decode in registers);
// from here on decoding a chunk once into u8 and reusing it across tokens is cheaper.
static const int64_t DIRECT_MAX_M = 8;

struct A8Job {
  const Isa* I;
  int fmt;
  const int8_t* xq;
  const int32_t* xsum;
  const float* xscale;  // null when only accumulators are wanted
  int64_t M, Kx, N, Kp, wrow;
  const uint8_t* w;
  const float* ws;
  int64_t ws_stride;  // 0: per-tensor scale, 1: per-row
  const float* bias;  // null: none
  float* out;
  int32_t* acc;
};

static inline void a8_store(const A8Job& j, int64_t m0, int64_t n0, int mr, int nr, const int32_t* t) {
  const int64_t N = j.N, wss = j.ws_stride;
  for (int m = 0; m < mr; m++) {
    const int32_t xsum = j.xsum[m0 + m];
    if (j.acc) {
      int32_t* __restrict o = j.acc + (m0 + m) * N + n0;
      for (int r = 0; r < nr; r++) o[r] = t[m * 4 + r] - xsum;
    } else {
      // NOTE: (acc * act_scale) * w_scale (+ bias) in float32, left to right, no FMA -- the
      // reference does the same operations in the same order, so outputs are bitwise equal.
      const float as = j.xscale[m0 + m];
      const float* __restrict ws = j.ws + n0 * wss;
      float* __restrict o = j.out + (m0 + m) * N + n0;
      if (j.bias) {
        const float* __restrict bias = j.bias + n0;
        for (int r = 0; r < nr; r++) o[r] = (float)(t[m * 4 + r] - xsum) * as * ws[r * wss] + bias[r];
      } else {
        for (int r = 0; r < nr; r++) o[r] = (float)(t[m * 4 + r] - xsum) * as * ws[r * wss];
      }
    }
  }
}

// From this many tokens the AMX level runs packed 2-bit and base-3 rows on the tile GEMM (SmolLM2 g64 gate/up 3072 x 576
// and down 576 x 1536, 2 threads, best of 5 against the VNNI tiles: 0.83-0.99x at 4 tokens, 1.3-1.7x at
// 8, 1.7-2.4x at 16, 2.7-3.9x at 64, 2.6-4.3x at 256).
static const int64_t AMX_MIN_M = 8;

static int a8_run(const A8Job& j, int nth) {
  const int64_t ntile = cdiv(j.N, 4);
  if (j.M >= AMX_MIN_M && j.N % 16 == 0 && j.Kx % 64 == 0 && j.I->amx_a8) return j.I->amx_a8(j, nth);
  if (j.fmt == FMT_2BIT && j.M < DIRECT_MAX_M) {
    // NOTE: many short tasks (nth x 64): a helper preempted mid-task stalls the caller less. Tasks of
    // >= 16k multiply-adds were faster with the weights in
    // cache (SmolLM2 576 x 576 groups of 64, two threads: 9.2 -> 7.3 us) but slower in decode, where the
    // weights stream from memory (8 of 8 interleaved rounds, mean 223 -> 207 tok/s).
    const int64_t chunk = cdiv(ntile, std::max<int64_t>(1, (int64_t)nth * 64));
    parallel_for(cdiv(ntile, chunk), nth, [&](int64_t c) {
      for (int64_t nt = c * chunk; nt < std::min(ntile, (c + 1) * chunk); nt++) {
        const int64_t n0 = nt * 4;
        const int nr = (int)std::min<int64_t>(4, j.N - n0);
        for (int64_t m0 = 0; m0 < j.M; m0 += 4) {
          const int mr = (int)std::min<int64_t>(4, j.M - m0);
          int32_t tmp[16];
          j.I->p2[mr - 1][nr - 1](j.w + n0 * j.wrow, j.wrow, j.xq + m0 * j.Kx, j.Kx, j.Kp / 64, tmp);
          a8_store(j, m0, n0, mr, nr, tmp);
        }
      }
    });
    return 0;
  }
  const DecodeFn dec = j.fmt == FMT_2BIT ? j.I->dec2 : j.I->dec3;
  int failed = 0;
  parallel_for(cdiv(ntile, TILES_PER_CHUNK), nth, [&](int64_t c) {
    const int64_t nt0 = c * TILES_PER_CHUNK, nt1 = std::min(ntile, nt0 + TILES_PER_CHUNK);
    const int64_t r0 = nt0 * 4, r1 = std::min(j.N, nt1 * 4);
    uint8_t* buf = (uint8_t*)malloc((size_t)((r1 - r0) * j.Kx));
    if (!buf) {
      failed = 1;
      return;
    }
    for (int64_t r = r0; r < r1; r++) dec(j.w + r * j.wrow, j.Kp, buf + (r - r0) * j.Kx, j.Kx, 0);
    for (int64_t mb = 0; mb < j.M; mb += TOKENS_PER_BLOCK)
      for (int64_t nt = nt0; nt < nt1; nt++) {
        const int64_t n0 = nt * 4;
        const int nr = (int)std::min<int64_t>(4, j.N - n0);
        for (int64_t m0 = mb; m0 < std::min(j.M, mb + TOKENS_PER_BLOCK); m0 += 4) {
          const int mr = (int)std::min<int64_t>(4, j.M - m0);
          int32_t tmp[16];
          j.I->u8[mr - 1][nr - 1](buf + (n0 - r0) * j.Kx, j.Kx, j.xq + m0 * j.Kx, j.Kx, j.Kx / 64, tmp);
          a8_store(j, m0, n0, mr, nr, tmp);
        }
      }
    free(buf);
  });
  return failed;
}

static int a16_run(const Isa* I, int fmt, const float* x, int64_t M, int64_t Kx, const uint8_t* w, int64_t N,
                   int64_t Kp, int64_t wrow, const float* ws, int64_t ws_stride, const float* bias, float* out,
                   int nth) {
  const int64_t ntile = cdiv(N, 4);
  const DecodeFn dec = fmt == FMT_2BIT ? I->dec2 : I->dec3;
  int failed = 0;
  parallel_for(cdiv(ntile, TILES_PER_CHUNK), nth, [&](int64_t c) {
    const int64_t nt0 = c * TILES_PER_CHUNK, nt1 = std::min(ntile, nt0 + TILES_PER_CHUNK);
    const int64_t r0 = nt0 * 4, r1 = std::min(N, nt1 * 4);
    uint8_t* buf = (uint8_t*)malloc((size_t)((r1 - r0) * Kx));
    if (!buf) {
      failed = 1;
      return;
    }
    for (int64_t r = r0; r < r1; r++) dec(w + r * wrow, Kp, buf + (r - r0) * Kx, Kx, -1);
    for (int64_t mb = 0; mb < M; mb += TOKENS_PER_BLOCK)
      for (int64_t nt = nt0; nt < nt1; nt++) {
        const int64_t n0 = nt * 4;
        const int nr = (int)std::min<int64_t>(4, N - n0);
        for (int64_t m = mb; m < std::min(M, mb + TOKENS_PER_BLOCK); m++) {
          float tmp[4];
          I->fs8[nr - 1](buf + (n0 - r0) * Kx, Kx, x + m * Kx, Kx / 64, tmp);
          for (int r = 0; r < nr; r++)
            out[m * N + n0 + r] = tmp[r] * ws[(n0 + r) * ws_stride] + (bias ? bias[n0 + r] : 0.0f);
        }
      }
    free(buf);
  });
  return failed;
}

// ---------------------------------------------------------------------------------------------
// Per-group scales: one float32 scale per group of g consecutive inputs of a row, G = ceil(K / g)
// groups, the last one possibly partial; scale (N, G) row-major. Every kernel here works on
// whole 64-wide vectors, so activations and decoded rows use a GROUPED layout: group gi starts
// at gi * Kg, Kg = g rounded up to 64, zero-padded (activations) past the group's end. For g a
// multiple of 64 that is the plain layout. Padding contributes nothing: its activations are 0.
//
// NOTE on numerics (W1.58A8), the order ternlm.kernels.reference._linear_a8_groups documents:
//   y = 0; for gi in 0..G-1: y = y + (float)acc[gi] * scale[n, gi]     (float32, no FMA)
//   out = y * act_scale (+ bias)
// acc[gi] is the exact int32 sum of the group, so kernel and reference are bitwise equal.

struct Groups {
  int64_t g, G, Kg, R;  // group size, groups, grouped stride of one group, grouped row length
};

static Groups make_groups(int64_t g, int64_t K, int64_t Kx) {
  Groups gp;
  gp.g = g;
  gp.G = cdiv(K, g);
  gp.Kg = cdiv(g, 64) * 64;
  gp.R = std::max(Kx, gp.G * gp.Kg);
  return gp;
}

// Decode one packed row into the grouped layout (row length gp.R); tmp holds Kx bytes when the
// layout is not the plain one.
static void dec_grouped(DecodeFn dec, const uint8_t* w, int64_t Kp, int64_t Kx, const Groups& gp, uint8_t* dst,
                        int off, uint8_t* tmp) {
  if (gp.Kg == gp.g) {
    dec(w, Kp, dst, gp.R, off);
    return;
  }
  dec(w, Kp, tmp, Kx, off);
  memset(dst, (uint8_t)(1 + off), (size_t)gp.R);
  for (int64_t gi = 0; gi < gp.G; gi++)
    memcpy(dst + gi * gp.Kg, tmp + gi * gp.g, (size_t)std::min(gp.g, Kx - gi * gp.g));
}

struct A8GroupJob {
  const Isa* I;
  int fmt;
  const int8_t* xq;      // (M, R) grouped layout
  const int32_t* xgsum;  // (M, G) per-group activation sums
  const float* xscale;   // (M,)
  int64_t M, N, Kp, Kx, wrow;
  Groups gp;
  const uint8_t* w;
  const float* ws;  // (N, G)
  const float* bias;
  float* out;
};

static inline void a8g_acc(const A8GroupJob& j, int64_t gi, int64_t m0, int64_t n0, int mr, int nr,
                           const int32_t* t, float* y) {
  const int64_t G = j.gp.G;
  for (int m = 0; m < mr; m++) {
    const int32_t xs = j.xgsum[(m0 + m) * G + gi];
    for (int r = 0; r < nr; r++) y[m * 4 + r] = y[m * 4 + r] + (float)(t[m * 4 + r] - xs) * j.ws[(n0 + r) * G + gi];
  }
}

static inline void a8g_store(const A8GroupJob& j, int64_t m0, int64_t n0, int mr, int nr, const float* y) {
  for (int m = 0; m < mr; m++) {
    const float as = j.xscale[m0 + m];
    float* __restrict o = j.out + (m0 + m) * j.N + n0;
    for (int r = 0; r < nr; r++) o[r] = j.bias ? y[m * 4 + r] * as + j.bias[n0 + r] : y[m * 4 + r] * as;
  }
}

#if TL_X86
#include "amx.inc"
#endif



static int a8_group_run(const A8GroupJob& j, int nth) {
  const Groups& gp = j.gp;
  const int64_t ntile = cdiv(j.N, 4), R = gp.R;
  if (j.fmt == FMT_2BIT && j.M > 1 && j.M < DIRECT_MAX_M && gp.g % 256 == 0) {
    // groups of whole 256-weight blocks: the packed rows are read directly, one tile call per group
    const int64_t bpg = gp.g / 256, np = j.Kp / 64;
    const int64_t chunk = cdiv(ntile, std::max<int64_t>(1, (int64_t)nth * 64));
    parallel_for(cdiv(ntile, chunk), nth, [&](int64_t c) {
      for (int64_t nt = c * chunk; nt < std::min(ntile, (c + 1) * chunk); nt++) {
        const int64_t n0 = nt * 4;
        const int nr = (int)std::min<int64_t>(4, j.N - n0);
        for (int64_t m0 = 0; m0 < j.M; m0 += 4) {
          const int mr = (int)std::min<int64_t>(4, j.M - m0);
          float y[16] = {0};
          for (int64_t gi = 0; gi < gp.G; gi++) {
            int32_t tmp[16];
            j.I->p2[mr - 1][nr - 1](j.w + n0 * j.wrow + gi * bpg * 64, j.wrow, j.xq + m0 * R + gi * gp.g, R,
                                    std::min(bpg * 4, np - gi * bpg * 4), tmp);
            a8g_acc(j, gi, m0, n0, mr, nr, tmp, y);
          }
          a8g_store(j, m0, n0, mr, nr, y);
        }
      }
    });
    return 0;
  }
  if (j.fmt == FMT_2BIT && j.M >= AMX_MIN_M && gp.g == 64 && gp.G == j.Kp / 64 && j.N % 16 == 0 && j.I->amx_g64)
    return j.I->amx_g64(j, nth);
  if (j.fmt == FMT_2BIT && j.M > 1 && gp.g == 64 && gp.G == j.Kp / 64 && j.N % 4 == 0 && j.I->pgm[0]) {
    // groups of exactly 64, several tokens: the decode tile's epilogue for up to 4 tokens per weight
    // load instead of the plane sums below and their scalar epilogue (SmolLM2 g64, one layer's q/k/v, o,
    // gate/up and down at 16 tokens, 2 threads: 1012 -> 463 us on the VNNI tile; the AVX2 tile, which
    // the AVX-512BW level shares, 1.8x at 2-16 tokens on one 3072 x 576 layer: see tile_pg64m)
    const int64_t np = j.Kp / 64, G = gp.G;
    const int64_t chunk = cdiv(ntile, std::max<int64_t>(1, (int64_t)nth * 64));
    parallel_for(cdiv(ntile, chunk), nth, [&](int64_t c) {
      for (int64_t nt = c * chunk; nt < std::min(ntile, (c + 1) * chunk); nt++) {
        const int64_t n0 = nt * 4;
        for (int64_t m0 = 0; m0 < j.M; m0 += 4) {
          const int mr = (int)std::min<int64_t>(4, j.M - m0);
          float y[16];
          j.I->pgm[mr - 1](j.w + n0 * j.wrow, j.wrow, j.xq + m0 * R, R, np, G, j.xgsum + m0 * G, j.ws + n0 * G, y);
          a8g_store(j, m0, n0, mr, 4, y);
        }
      }
    });
    return 0;
  }
  if (j.fmt == FMT_2BIT && gp.g % 64 == 0) {
    // groups of whole 64-weight planes (64, 128, 192, ...): one plane-sum tile call per 4 rows, planes
    // summed into their group's exact int32 accumulator, then the float epilogue as above. At every
    // batch size: decoding the rows to u8 first and calling the u8 tile once per group (below) has a
    // call, 16 zeroed accumulators and 16 reductions per group (AVX2, SmolLM2 groups of 64, prefill
    // of 16 / 128 / 512 tokens, best of 5, two runs: 190-274 / 294-325 / 257-268 tok/s that way,
    // 351-356 / 411-426 / 356-362 this way).
    const int64_t np = j.Kp / 64, ppg = gp.g / 64, G = gp.G;
    const int64_t chunk = cdiv(ntile, std::max<int64_t>(1, (int64_t)nth * 64));
    int failed = 0;
    parallel_for(cdiv(ntile, chunk), nth, [&](int64_t c) {
      int32_t* pl = NULL;  // plane sums, only off the decode tile (batch > 1 or a short last tile)
      for (int64_t nt = c * chunk; nt < std::min(ntile, (c + 1) * chunk); nt++) {
        const int64_t n0 = nt * 4;
        const int nr = (int)std::min<int64_t>(4, j.N - n0);
        if (j.M == 1 && nr == 4) {  // decode: the epilogue in the tile
          float y[16];
          const TileG tile = ppg == 1 && G == np && j.I->pg64 ? j.I->pg64 : j.I->pg1;
          tile(j.w + n0 * j.wrow, j.wrow, j.xq, np, ppg, G, j.xgsum, j.ws + n0 * G, y);
          a8g_store(j, 0, n0, 1, 4, y);
          continue;
        }
        if (!pl && !(pl = (int32_t*)calloc((size_t)(np * 16), sizeof(int32_t)))) {
          failed = 1;
          return;
        }
        for (int64_t m0 = 0; m0 < j.M; m0 += 4) {
          const int mr = (int)std::min<int64_t>(4, j.M - m0);
          j.I->pl[mr - 1][nr - 1](j.w + n0 * j.wrow, j.wrow, j.xq + m0 * R, R, np, pl);
          float y[16] = {0};
          for (int64_t gi = 0; gi < G; gi++) {
            int32_t t[16] = {0};
            const int64_t p1 = std::min(np, (gi + 1) * ppg);
            for (int64_t p = gi * ppg; p < p1; p++)
              for (int i = 0; i < 16; i++) t[i] += pl[p * 16 + i];
            a8g_acc(j, gi, m0, n0, mr, nr, t, y);
          }
          a8g_store(j, m0, n0, mr, nr, y);
        }
      }
      free(pl);
    });
    return failed;
  }
  const DecodeFn dec = j.fmt == FMT_2BIT ? j.I->dec2 : j.I->dec3;
  int failed = 0;
  parallel_for(cdiv(ntile, TILES_PER_CHUNK), nth, [&](int64_t c) {
    const int64_t nt0 = c * TILES_PER_CHUNK, nt1 = std::min(ntile, nt0 + TILES_PER_CHUNK);
    const int64_t r0 = nt0 * 4, r1 = std::min(j.N, nt1 * 4);
    uint8_t* buf = (uint8_t*)malloc((size_t)((r1 - r0) * R + j.Kx));
    if (!buf) {
      failed = 1;
      return;
    }
    uint8_t* tmpdec = buf + (r1 - r0) * R;
    for (int64_t r = r0; r < r1; r++) dec_grouped(dec, j.w + r * j.wrow, j.Kp, j.Kx, gp, buf + (r - r0) * R, 0, tmpdec);
    for (int64_t mb = 0; mb < j.M; mb += TOKENS_PER_BLOCK)
      for (int64_t nt = nt0; nt < nt1; nt++) {
        const int64_t n0 = nt * 4;
        const int nr = (int)std::min<int64_t>(4, j.N - n0);
        for (int64_t m0 = mb; m0 < std::min(j.M, mb + TOKENS_PER_BLOCK); m0 += 4) {
          const int mr = (int)std::min<int64_t>(4, j.M - m0);
          float y[16] = {0};
          for (int64_t gi = 0; gi < gp.G; gi++) {
            int32_t tmp[16];
            j.I->u8[mr - 1][nr - 1](buf + (n0 - r0) * R + gi * gp.Kg, R, j.xq + m0 * R + gi * gp.Kg, R,
                                    gp.Kg / 64, tmp);
            a8g_acc(j, gi, m0, n0, mr, nr, tmp, y);
          }
          a8g_store(j, m0, n0, mr, nr, y);
        }
      }
    free(buf);
  });
  return failed;
}

// W1.58A16 with per-group scales: x (M, R) float32 in the grouped layout.
static int a16_group_run(const Isa* I, int fmt, const float* x, int64_t M, int64_t Kx, const uint8_t* w, int64_t N,
                         int64_t Kp, int64_t wrow, const Groups& gp, const float* ws, const float* bias, float* out,
                         int nth) {
  const int64_t ntile = cdiv(N, 4), R = gp.R, G = gp.G;
  const DecodeFn dec = fmt == FMT_2BIT ? I->dec2 : I->dec3;
  int failed = 0;
  parallel_for(cdiv(ntile, TILES_PER_CHUNK), nth, [&](int64_t c) {
    const int64_t nt0 = c * TILES_PER_CHUNK, nt1 = std::min(ntile, nt0 + TILES_PER_CHUNK);
    const int64_t r0 = nt0 * 4, r1 = std::min(N, nt1 * 4);
    uint8_t* buf = (uint8_t*)malloc((size_t)((r1 - r0) * R + Kx));
    if (!buf) {
      failed = 1;
      return;
    }
    uint8_t* tmpdec = buf + (r1 - r0) * R;
    for (int64_t r = r0; r < r1; r++) dec_grouped(dec, w + r * wrow, Kp, Kx, gp, buf + (r - r0) * R, -1, tmpdec);
    for (int64_t mb = 0; mb < M; mb += TOKENS_PER_BLOCK)
      for (int64_t nt = nt0; nt < nt1; nt++) {
        const int64_t n0 = nt * 4;
        const int nr = (int)std::min<int64_t>(4, N - n0);
        for (int64_t m = mb; m < std::min(M, mb + TOKENS_PER_BLOCK); m++) {
          float y[4] = {0.0f, 0.0f, 0.0f, 0.0f};
          for (int64_t gi = 0; gi < G; gi++) {
            float tmp[4];
            I->fs8[nr - 1](buf + (n0 - r0) * R + gi * gp.Kg, R, x + m * R + gi * gp.Kg, gp.Kg / 64, tmp);
            for (int r = 0; r < nr; r++) y[r] = y[r] + tmp[r] * ws[(n0 + r) * G + gi];
          }
          for (int r = 0; r < nr; r++) out[m * N + n0 + r] = y[r] + (bias ? bias[n0 + r] : 0.0f);
        }
      }
    free(buf);
  });
  return failed;
}

// ---------------------------------------------------------------------------------------------
// Python bindings

static const Isa* pick_isa(int level) {
  if (level < 0) level = g_best;
  if (level >= LV_COUNT || !g_have[level]) {
    PyErr_Format(PyExc_ValueError, "kernel level %d is not available on this CPU/build", level);
    return NULL;
  }
  return &g_isa[level];
}

static int check_fmt(int fmt, int64_t K, int64_t Kp) {
  const int64_t qk = fmt == FMT_2BIT ? 64 : 160;  // 2-bit rows: whole planes (full blocks + tail)
  if ((fmt != FMT_2BIT && fmt != FMT_BASE3) || Kp % qk || K > Kp || K < 0) {
    PyErr_Format(PyExc_ValueError, "bad format/shape: fmt=%d K=%lld Kp=%lld", fmt, (long long)K, (long long)Kp);
    return -1;
  }
  return 0;
}

static inline int64_t row_bytes(int fmt, int64_t Kp) { return fmt == FMT_2BIT ? Kp / 4 : Kp / 5; }
static inline int64_t x_stride(int64_t Kp) { return cdiv(Kp, 64) * 64; }

static int resolve_threads(int nth) {
  if (nth <= 0) nth = (int)std::max(1u, std::thread::hardware_concurrency());
  return std::min(nth, 256);
}

// Below ~128k multiply-adds per thread (a few microseconds of work) the hand-off costs more than it
// saves. (At 1M, SmolLM2's 576-wide decode GEMVs all ran on one thread.)
static const int64_t MIN_WORK_PER_EXTRA_THREAD = (int64_t)1 << 17;

static int threads_for(int nth, int64_t M, int64_t N, int64_t Kp) {
  const int64_t by_work = (M * N * Kp) / MIN_WORK_PER_EXTRA_THREAD;
  return (int)std::max<int64_t>(1, std::min<int64_t>(nth, by_work));
}

// Per-group scale arguments: group 0 means per tensor / per row (stride 0 / 1); group g > 0
// means (N, ceil(K / g)) scales, whose row stride must then be ceil(K / g).
static int check_groups(int64_t group, int64_t K, int64_t wss) {
  if (group < 0 || (group > 0 && (K < 1 || wss != cdiv(K, group))) || (group == 0 && wss != 0 && wss != 1)) {
    PyErr_Format(PyExc_ValueError, "bad scale layout: group=%lld K=%lld stride=%lld", (long long)group, (long long)K,
                 (long long)wss);
    return -1;
  }
  return 0;
}

// One token's activations for the per-group kernels: int8 by absmax (scale xs, sum xsum) laid out
// group by group at stride Kg in row (R bytes, zero-padded), and each group's sum in xgsum. tmp
// (Kx bytes) holds the plain quantized row when Kg != g; with g a multiple of 64 it may be NULL.
static void quant_grouped(const Isa* I, const float* x, int64_t K, int64_t Kx, const Groups& gp, float qmax,
                          int8_t* row, int8_t* tmp, float* xs, int32_t* xsum, int32_t* xgsum) {
  if (gp.Kg == gp.g) {
    I->quant(x, K, gp.R, qmax, row, xs, xsum);
  } else {
    I->quant(x, K, Kx, qmax, tmp, xs, xsum);
    memset(row, 0, (size_t)gp.R);
    for (int64_t gi = 0; gi < gp.G; gi++)
      memcpy(row + gi * gp.Kg, tmp + gi * gp.g, (size_t)std::min(gp.g, Kx - gi * gp.g));
  }
  for (int64_t gi = 0; gi < gp.G; gi++) {
    int32_t acc = 0;
    for (int64_t k = gi * gp.Kg; k < (gi + 1) * gp.Kg; k++) acc += row[k];
    xgsum[gi] = acc;
  }
}

static int linear_a8_grouped(const Isa* I, int fmt, const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t N,
                             int64_t Kp, const float* ws, int64_t group, const float* bias, float qmax, float* out,
                             int nth) {
  const int64_t Kx = x_stride(Kp);
  const Groups gp = make_groups(group, K, Kx);
  const int64_t R = gp.R, G = gp.G;
  const bool plain = gp.Kg == gp.g;
  int8_t* xq = (int8_t*)malloc((size_t)(M * R) + 64);
  int8_t* tq = plain ? NULL : (int8_t*)malloc((size_t)(M * Kx) + 64);
  float* xs = (float*)malloc(sizeof(float) * (size_t)(M + 1));
  int32_t* xsum = (int32_t*)malloc(sizeof(int32_t) * (size_t)(M + 1));
  int32_t* xgsum = (int32_t*)malloc(sizeof(int32_t) * (size_t)(M * G + 1));
  int failed = !xq || (!plain && !tq) || !xs || !xsum || !xgsum;
  if (!failed) {
    Py_BEGIN_ALLOW_THREADS
    parallel_for(M, M * K < 65536 ? 1 : nth, [&](int64_t m) {
      quant_grouped(I, x + m * K, K, Kx, gp, qmax, xq + m * R, plain ? NULL : tq + m * Kx, xs + m, xsum + m,
                    xgsum + m * G);
    });
    A8GroupJob j = {I, fmt, xq, xgsum, xs, M, N, Kp, Kx, row_bytes(fmt, Kp), gp, w, ws, bias, out};
    failed = a8_group_run(j, threads_for(nth, M, N, Kp));
    Py_END_ALLOW_THREADS
  }
  free(xq);
  free(tq);
  free(xs);
  free(xsum);
  free(xgsum);
  return failed;
}

static int linear_a16_grouped(const Isa* I, int fmt, const float* x, int64_t M, int64_t K, const uint8_t* w,
                              int64_t N, int64_t Kp, const float* ws, int64_t group, const float* bias, float* out,
                              int nth) {
  const int64_t Kx = x_stride(Kp);
  const Groups gp = make_groups(group, K, Kx);
  float* xg = (float*)calloc((size_t)(M * gp.R), sizeof(float));
  if (!xg) return 1;
  for (int64_t m = 0; m < M; m++)
    for (int64_t gi = 0; gi < gp.G; gi++)
      memcpy(xg + m * gp.R + gi * gp.Kg, x + m * K + gi * gp.g, sizeof(float) * (size_t)std::min(gp.g, K - gi * gp.g));
  int failed;
  Py_BEGIN_ALLOW_THREADS
  failed = a16_group_run(I, fmt, xg, M, Kx, w, N, Kp, row_bytes(fmt, Kp), gp, ws, bias, out, nth);
  Py_END_ALLOW_THREADS
  free(xg);
  return failed;
}

static PyObject* py_quantize(PyObject*, PyObject* args) {
  int level, nth;
  unsigned long long xp, qp, sp, sump;
  long long M, K, Kx;
  float qmax;
  if (!PyArg_ParseTuple(args, "iKLLLfKKKi", &level, &xp, &M, &K, &Kx, &qmax, &qp, &sp, &sump, &nth)) return NULL;
  const Isa* I = pick_isa(level);
  if (!I) return NULL;
  nth = resolve_threads(nth);
  const float* x = (const float*)xp;
  int8_t* q = (int8_t*)qp;
  float* s = (float*)sp;
  int32_t* sum = (int32_t*)sump;
  Py_BEGIN_ALLOW_THREADS
  parallel_for(M, M * K < 65536 ? 1 : nth, [&](int64_t m) { I->quant(x + m * K, K, Kx, qmax, q + m * Kx, s + m, sum + m); });
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

static PyObject* py_gemm_acc(PyObject*, PyObject* args) {
  int fmt, level, nth;
  unsigned long long xqp, sump, wp, accp;
  long long M, Kx, N, Kp;
  if (!PyArg_ParseTuple(args, "iiKKLLKLLKi", &fmt, &level, &xqp, &sump, &M, &Kx, &wp, &N, &Kp, &accp, &nth))
    return NULL;
  const Isa* I = pick_isa(level);
  if (!I || check_fmt(fmt, Kp, Kp)) return NULL;
  if (Kx != x_stride(Kp)) return PyErr_Format(PyExc_ValueError, "activation stride must be %lld", (long long)x_stride(Kp));
  nth = threads_for(resolve_threads(nth), M, N, Kp);
  A8Job j = {I, fmt, (const int8_t*)xqp, (const int32_t*)sump, NULL, M, Kx, N, Kp, row_bytes(fmt, Kp),
             (const uint8_t*)wp, NULL, 0, NULL, NULL, (int32_t*)accp};
  int failed;
  Py_BEGIN_ALLOW_THREADS
  failed = a8_run(j, nth);
  Py_END_ALLOW_THREADS
  if (failed) return PyErr_NoMemory();
  Py_RETURN_NONE;
}

static PyObject* py_linear_a8(PyObject*, PyObject* args) {
  int fmt, level, nth;
  unsigned long long xp, wp, wsp, bp, outp;
  long long M, K, N, Kp, wss, group;
  float qmax;
  if (!PyArg_ParseTuple(args, "iiKLLKLLKLLKfKi", &fmt, &level, &xp, &M, &K, &wp, &N, &Kp, &wsp, &wss, &group, &bp,
                        &qmax, &outp, &nth))
    return NULL;
  const Isa* I = pick_isa(level);
  if (!I || check_fmt(fmt, K, Kp) || check_groups(group, K, wss)) return NULL;
  nth = resolve_threads(nth);
  if (group > 0) {
    if (linear_a8_grouped(I, fmt, (const float*)xp, M, K, (const uint8_t*)wp, N, Kp, (const float*)wsp, group,
                          (const float*)bp, qmax, (float*)outp, nth))
      return PyErr_NoMemory();
    Py_RETURN_NONE;
  }
  const int64_t Kx = x_stride(Kp);
  int8_t* xq = (int8_t*)malloc((size_t)(M * Kx) + 64);
  float* xs = (float*)malloc(sizeof(float) * (size_t)(M + 1));
  int32_t* xsum = (int32_t*)malloc(sizeof(int32_t) * (size_t)(M + 1));
  int failed = !xq || !xs || !xsum;
  if (!failed) {
    const float* x = (const float*)xp;
    Py_BEGIN_ALLOW_THREADS
    parallel_for(M, M * K < 65536 ? 1 : nth, [&](int64_t m) { I->quant(x + m * K, K, Kx, qmax, xq + m * Kx, xs + m, xsum + m); });
    A8Job j = {I, fmt, xq, xsum, xs, M, Kx, N, Kp, row_bytes(fmt, Kp), (const uint8_t*)wp, (const float*)wsp, wss,
               (const float*)bp, (float*)outp, NULL};
    failed = a8_run(j, threads_for(nth, M, N, Kp));
    Py_END_ALLOW_THREADS
  }
  free(xq);
  free(xs);
  free(xsum);
  if (failed) return PyErr_NoMemory();
  Py_RETURN_NONE;
}

static PyObject* py_linear_a16(PyObject*, PyObject* args) {
  int fmt, level, nth;
  unsigned long long xp, wp, wsp, bp, outp;
  long long M, K, N, Kp, wss, group;
  if (!PyArg_ParseTuple(args, "iiKLLKLLKLLKKi", &fmt, &level, &xp, &M, &K, &wp, &N, &Kp, &wsp, &wss, &group, &bp,
                        &outp, &nth))
    return NULL;
  const Isa* I = pick_isa(level);
  if (!I || check_fmt(fmt, K, Kp) || check_groups(group, K, wss)) return NULL;
  nth = threads_for(resolve_threads(nth), M, N, Kp);
  if (group > 0) {
    if (linear_a16_grouped(I, fmt, (const float*)xp, M, K, (const uint8_t*)wp, N, Kp, (const float*)wsp, group,
                           (const float*)bp, (float*)outp, nth))
      return PyErr_NoMemory();
    Py_RETURN_NONE;
  }
  const int64_t Kx = x_stride(Kp);
  const float* x = (const float*)xp;
  float* xpad = NULL;
  if (Kx != K) {  // the kernels read whole 64-wide vectors: give them a zero-padded copy
    xpad = (float*)calloc((size_t)(M * Kx), sizeof(float));
    if (!xpad) return PyErr_NoMemory();
    for (int64_t m = 0; m < M; m++) memcpy(xpad + m * Kx, x + m * K, sizeof(float) * (size_t)K);
    x = xpad;
  }
  int failed;
  Py_BEGIN_ALLOW_THREADS
  failed = a16_run(I, fmt, x, M, Kx, (const uint8_t*)wp, N, Kp, row_bytes(fmt, Kp), (const float*)wsp, wss,
                   (const float*)bp, (float*)outp, nth);
  Py_END_ALLOW_THREADS
  free(xpad);
  if (failed) return PyErr_NoMemory();
  Py_RETURN_NONE;
}

// Dense float32 (N, K) weight code * scale. Large float batches use it with torch's sgemm, which
// beats any add/subtract kernel once the decode is amortized over many tokens.
static PyObject* py_dequantize(PyObject*, PyObject* args) {
  int fmt, level, nth;
  unsigned long long wp, wsp, outp;
  long long N, Kp, K, wss, group;
  if (!PyArg_ParseTuple(args, "iiKLLLKLLKi", &fmt, &level, &wp, &N, &Kp, &K, &wsp, &wss, &group, &outp, &nth))
    return NULL;
  const Isa* I = pick_isa(level);
  if (!I || check_fmt(fmt, K, Kp) || check_groups(group, K, wss)) return NULL;
  nth = threads_for(resolve_threads(nth), 1, N, Kp);
  const DecodeFn dec = fmt == FMT_2BIT ? I->dec2 : I->dec3;
  const uint8_t* w = (const uint8_t*)wp;
  const float* ws = (const float*)wsp;
  float* out = (float*)outp;
  const int64_t wrow = row_bytes(fmt, Kp), Kx = x_stride(Kp), rows = 64;
  int failed = 0;
  Py_BEGIN_ALLOW_THREADS
  parallel_for(cdiv(N, rows), nth, [&](int64_t c) {
    uint8_t* buf = (uint8_t*)malloc((size_t)Kx);
    if (!buf) {
      failed = 1;
      return;
    }
    for (int64_t n = c * rows; n < std::min<int64_t>(N, (c + 1) * rows); n++) {
      dec(w + n * wrow, Kp, buf, Kx, -1);
      const int8_t* __restrict c = (const int8_t*)buf;
      float* __restrict o = out + n * K;
      if (group > 0) {  // per group: code * scale[n, k / g], the same single multiply
        const float* __restrict sg = ws + n * wss;
        for (int64_t k0 = 0, gi = 0; k0 < K; k0 += group, gi++) {
          const float s = sg[gi];
          for (int64_t k = k0; k < std::min<int64_t>(K, k0 + group); k++) o[k] = (float)c[k] * s;
        }
        continue;
      }
      const float s = ws[n * wss];
      for (int64_t k = 0; k < K; k++) o[k] = (float)c[k] * s;
    }
    free(buf);
  });
  Py_END_ALLOW_THREADS
  if (failed) return PyErr_NoMemory();
  Py_RETURN_NONE;
}

static PyObject* py_set_pool_spin(PyObject*, PyObject* args) {
  int n;
  if (!PyArg_ParseTuple(args, "i", &n)) return NULL;
  return PyLong_FromLong(g_spin.exchange(n < 0 ? TL_POOL_SPIN : n));
}

static PyObject* py_levels(PyObject*, PyObject*) {
  PyObject* l = PyList_New(0);
  for (int i = 0; i < LV_COUNT; i++)
    if (g_have[i]) {
      PyObject* v = PyLong_FromLong(i);
      PyList_Append(l, v);
      Py_DECREF(v);
    }
  return l;
}

#include "int8_gemv.inc"
#include "attn_decode.inc"
#include "decode_step.inc"

static PyMethodDef methods[] = {
    {"quantize_act", py_quantize, METH_VARARGS,
     "quantize_act(level, x, M, K, Kx, qmax, xq, scale, xsum, nthreads): per-token absmax int8"},
    {"gemm_acc", py_gemm_acc, METH_VARARGS,
     "gemm_acc(fmt, level, xq, xsum, M, Kx, w, N, Kp, acc, nthreads): int32 accumulators (M, N)"},
    {"linear_a8", py_linear_a8, METH_VARARGS,
     "linear_a8(fmt, level, x, M, K, w, N, Kp, wscale, wscale_stride, group, bias_or_0, qmax, out, nthreads)"},
    {"linear_a16", py_linear_a16, METH_VARARGS,
     "linear_a16(fmt, level, x, M, K, w, N, Kp, wscale, wscale_stride, group, bias_or_0, out, nthreads)"},
    {"dequantize", py_dequantize, METH_VARARGS,
     "dequantize(fmt, level, w, N, Kp, K, wscale, wscale_stride, group, out, nthreads): float32 (N, K)"},
    {"levels", py_levels, METH_NOARGS, "kernel levels usable on this CPU (0 scalar .. 3 AVX-512 VNNI, 4 AMX)"},
    {"set_pool_spin", py_set_pool_spin, METH_VARARGS,
     "set_pool_spin(n): pause iterations an idle pool thread spins before sleeping (-1: the decode default); "
     "returns the previous value"},
    INT8_GEMV_METHODS
    ATTN_DECODE_METHODS
    STEP_METHODS
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "ternlm CPU kernels for packed ternary weights",
                                    -1, methods};

PyMODINIT_FUNC PyInit__C(void) {
  init_isas();
  return PyModule_Create(&module);
}
