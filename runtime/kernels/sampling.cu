// lmforge::FusedSample: the step model's sampling block as one CUDA kernel launch.
//
// Inputs (the order of runtime.sampler_graph.ROW_INPUTS, after the logits):
//   0 logits [b, V] float16 or float32
//   1 temperature [b] f32   2 top_k [b] i64   3 top_p [b] f32   4 min_p [b] f32
//   5 repetition_penalty [b] f32   6 presence_penalty [b] f32   7 frequency_penalty [b] f32
//   8 min_new_tokens [b] i64   9 stop_mask [b, V] bool   10 uniforms [b, steps] f32
//   11 last_step [b] i64   12 seen [b, V] bool   13 counts [b, V] f32   14 step [b] i64
// Outputs: next_ids [b, 1] i64, seen_out [b, V] bool, counts_out [b, V] f32, step_out [b] i64.
//
// Semantics are those of runtime/sampler_graph.py (transformers' order): stop ids at -inf while
// step < min_new_tokens; repetition penalty on seen tokens, presence / frequency on generated
// counts (float32, the same operations in the same order, no fused multiply-add); greedy rows
// (temperature <= 0 or top_k == 1) take the first index of the maximum; sampled rows
// s = (x - max) / temperature, then one threshold on s: the top-k-th largest value (ties kept),
// top-p as transformers' TopPLogitsWarper over the top-k survivors, min-p as log(min_p); the
// token is the first index whose cumulative kept mass exceeds u * (kept mass), u the row's
// uniform for this step.
//
// No sort: each threshold is found exactly by a search on the value, each round one pass over
// the row that sums a weight (1 for top-k, exp(s) for top-p) over s >= pivot and tightens the
// interval to values that occur in the row, so the search ends on a value of the row. The row
// (x, then s) lives in shared memory when it fits, else in the row of counts_out, which is
// rewritten at the end (no allocation per call; nothing but this kernel is launched, on the
// stream onnxruntime gives the op, so a captured CUDA graph holds it).
//
// Two kernels, the same semantics. fused_sample: one block of 1,024 threads a row (any GPU).
// fused_sample_cluster (sm_90+): a row over a thread-block cluster of 8 blocks, each with a slice of
// the row in its own shared memory; every reduction is a block reduction, then the 8 block totals
// combined through distributed shared memory in rank order (the same bits in every block, and
// from run to run); only the order of float sums differs from the single-block kernel. The op
// takes the cluster kernel when the GPU's compute capability is >= 9.0 and a cluster launch of it
// fits (decided once a kernel object, i.e. a session) and the row's slice fits in shared memory;
// LMFORGE_KERNELS_CLUSTER=0 (read when onnxruntime creates the op's kernel) forces the single-block
// kernel, for A/B timing and as an escape hatch.
//
// Built by runtime/kernels/build.py; headers of onnxruntime's C/C++ API in include/ (MIT).

#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include <cooperative_groups.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFull = 0xffffffffu;
constexpr int kMaxSharedBytes = 200 * 1024;  // the row cached in shared memory up to this size (less
                                              // where the GPU allows less: FusedSampleKernel)

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

// An order-preserving map of float32 onto uint32 (larger float, larger key).
__device__ __forceinline__ uint32_t key_of(float f) {
  uint32_t b = __float_as_uint(f);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ float value_of(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// One round of a threshold search: the weight at or above the pivot, the smallest value at or
// above it and the largest below it (over the elements in play).
struct Round {
  float weight;
  float above_min;
  float below_max;
};

__device__ __forceinline__ Round combine(Round a, Round b) {
  return {a.weight + b.weight, fminf(a.above_min, b.above_min), fmaxf(a.below_max, b.below_max)};
}

__device__ __forceinline__ Round warp_reduce(Round r) {
  for (int o = 16; o > 0; o >>= 1) {
    Round other{__shfl_xor_sync(kFull, r.weight, o), __shfl_xor_sync(kFull, r.above_min, o),
                __shfl_xor_sync(kFull, r.below_max, o)};
    r = combine(r, other);
  }
  return r;
}

// Every thread gets the same total (xor butterflies: a fixed association order, so the sums
// are bit-for-bit the same from run to run).
__device__ Round block_reduce(Round r, Round* shared) {
  r = warp_reduce(r);
  __syncthreads();  // the previous reduction's reads of `shared` are done
  if ((threadIdx.x & 31) == 0) shared[threadIdx.x >> 5] = r;
  __syncthreads();
  return warp_reduce(shared[threadIdx.x & 31]);
}

struct Best {
  float value;
  int index;
};

__device__ __forceinline__ Best better(Best a, Best b) {  // the maximum, first index on ties
  return (b.value > a.value || (b.value == a.value && b.index < a.index)) ? b : a;
}

__device__ Best block_argmax(Best b, Best* shared) {
  for (int o = 16; o > 0; o >>= 1)
    b = better(b, Best{__shfl_xor_sync(kFull, b.value, o), __shfl_xor_sync(kFull, b.index, o)});
  __syncthreads();
  if ((threadIdx.x & 31) == 0) shared[threadIdx.x >> 5] = b;
  __syncthreads();
  b = shared[threadIdx.x & 31];
  for (int o = 16; o > 0; o >>= 1)
    b = better(b, Best{__shfl_xor_sync(kFull, b.value, o), __shfl_xor_sync(kFull, b.index, o)});
  return b;
}

__device__ int block_min_int(int v, int* shared) {
  for (int o = 16; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(kFull, v, o));
  __syncthreads();
  if ((threadIdx.x & 31) == 0) shared[threadIdx.x >> 5] = v;
  __syncthreads();
  v = shared[threadIdx.x & 31];
  for (int o = 16; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

__device__ int block_max_int(int v, int* shared) {
  return -block_min_int(-v, shared);
}

// Exclusive prefix sum of one float a thread (thread order), and the total.
__device__ float block_exclusive_scan(float v, float* shared, float* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float inclusive = v;
  for (int o = 1; o < 32; o <<= 1) {
    float up = __shfl_up_sync(kFull, inclusive, o);
    if (lane >= o) inclusive += up;
  }
  __syncthreads();
  if (lane == 31) shared[warp] = inclusive;
  __syncthreads();
  float warp_total = shared[lane];
  float warp_inclusive = warp_total;
  for (int o = 1; o < 32; o <<= 1) {
    float up = __shfl_up_sync(kFull, warp_inclusive, o);
    if (lane >= o) warp_inclusive += up;
  }
  const float before_warp = __shfl_sync(kFull, warp_inclusive - warp_total, warp);
  *total = __shfl_sync(kFull, warp_inclusive, 31);
  return before_warp + inclusive - v;
}

// The largest value v of the row (among s >= floor) whose weight at or above it,
// G(v) = sum over s_i >= v of (mass ? exp(s_i) : 1), reaches target; `lo` is the smallest value in
// play and `lo_weight` = G(lo). When G(lo) < target (rounding), lo.
//   top-k: G counts, target k: the k-th largest value (ties kept).
//   top-p: G is the mass, target top_p * mass: the value of the first token (descending) whose
//   cumulative mass reaches it, i.e. the last one transformers' TopPLogitsWarper keeps.
__device__ float search(const float* s, int vocab, float floor_value, float lo, float lo_weight, float target,
                        bool mass, Round* shared) {
  if (!(lo_weight >= target)) return lo;
  float hi = 0.0f;  // the row's maximum: s = 0 there
  for (int round = 0; round < 40 && key_of(lo) < key_of(hi); ++round) {
    const uint32_t kl = key_of(lo), kh = key_of(hi);
    const uint32_t km = kl + (kh - kl + 1u) / 2u;  // in (kl, kh]
    const float pivot = value_of(km);
    Round r{0.0f, INFINITY, -INFINITY};
    for (int i = threadIdx.x; i < vocab; i += kThreads) {
      const float v = s[i];
      if (!(v >= floor_value)) continue;
      if (v >= pivot) {
        r.weight += mass ? expf(v) : 1.0f;
        r.above_min = fminf(r.above_min, v);
      } else {
        r.below_max = fmaxf(r.below_max, v);
      }
    }
    r = block_reduce(r, shared);
    if (r.weight >= target) {
      lo = r.above_min;  // an element at or above the pivot: G(lo) = r.weight >= target
    } else {
      hi = r.below_max;  // the answer is below the pivot
    }
  }
  return lo;
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    fused_sample(const T* __restrict__ logits, int vocab, const float* __restrict__ temperature,
                 const int64_t* __restrict__ top_k, const float* __restrict__ top_p, const float* __restrict__ min_p,
                 const float* __restrict__ repetition, const float* __restrict__ presence,
                 const float* __restrict__ frequency, const int64_t* __restrict__ min_new,
                 const bool* __restrict__ stop_mask, const float* __restrict__ uniforms, int steps,
                 const int64_t* __restrict__ last_step, const bool* __restrict__ seen,
                 const float* __restrict__ counts, const int64_t* __restrict__ step, int64_t* __restrict__ next_ids,
                 bool* __restrict__ seen_out, float* __restrict__ counts_out, int64_t* __restrict__ step_out,
                 bool cached) {
  extern __shared__ float cache[];
  __shared__ Round round_shared[kWarps];
  __shared__ Best best_shared[kWarps];
  __shared__ int int_shared[kWarps];
  __shared__ float scan_shared[kWarps];

  const int row = blockIdx.x;
  const size_t base = static_cast<size_t>(row) * vocab;
  float* x = cached ? cache : counts_out + base;  // the row being worked on: x, then s
  const T* in = logits + base;
  const bool early = step[row] < min_new[row];
  const float rep = repetition[row], pres = presence[row], freq = frequency[row];
  const bool penalized = rep != 1.0f || pres != 0.0f || freq != 0.0f;  // otherwise the same values

  // 1. processed logits (in the ONNX sampler's operations and order) and their argmax
  Best best{-INFINITY, 0x7fffffff};
  for (int i = threadIdx.x; i < vocab; i += kThreads) {
    float v = to_float(in[i]);
    if (early && stop_mask[base + i]) v = -INFINITY;
    if (penalized) {
      if (seen[base + i]) v = v > 0.0f ? __fdiv_rn(v, rep) : __fmul_rn(v, rep);
      const float c = counts[base + i];
      const float present = c > 0.0f ? 1.0f : 0.0f;
      v = __fsub_rn(v, __fadd_rn(__fmul_rn(freq, c), __fmul_rn(pres, present)));
    }
    x[i] = v;
    best = better(best, Best{v, i});
  }
  best = block_argmax(best, best_shared);
  int token = best.index;

  const float t = temperature[row];
  const bool greedy = !(t > 0.0f) || top_k[row] == 1;
  if (!greedy) {
    // 2. s = (x - max) / t, the row's smallest s and the total mass
    const float row_max = best.value;
    Round stats{0.0f, INFINITY, -INFINITY};
    for (int i = threadIdx.x; i < vocab; i += kThreads) {
      const float v = __fdiv_rn(__fsub_rn(x[i], row_max), t);
      x[i] = v;
      stats.weight += expf(v);
      stats.above_min = fminf(stats.above_min, v);
    }
    stats = block_reduce(stats, round_shared);
    const float smallest = stats.above_min;

    // 3. the threshold: max(top-k, top-p, min-p)
    const int64_t k = top_k[row];
    float thr_k = -INFINITY;
    if (k > 0 && k < vocab)
      thr_k = search(x, vocab, -INFINITY, smallest, static_cast<float>(vocab), static_cast<float>(k), false,
                     round_shared);
    float thr_p = -INFINITY;
    const float p = top_p[row];
    if (p < 1.0f) {
      float mass = stats.weight;  // top-p renormalizes over the top-k survivors
      float lo = smallest;
      if (k > 0 && thr_k > -INFINITY) {
        Round r{0.0f, INFINITY, -INFINITY};
        for (int i = threadIdx.x; i < vocab; i += kThreads) {
          const float v = x[i];
          if (v >= thr_k) r.weight += expf(v);
        }
        mass = block_reduce(r, round_shared).weight;
        lo = thr_k;
      }
      thr_p = search(x, vocab, lo, lo, mass, __fmul_rn(p, mass), true, round_shared);
    }
    const float mp = min_p[row];
    const float thr_m = mp > 0.0f ? logf(mp) : -INFINITY;
    const float thr = fmaxf(fmaxf(thr_k, thr_p), thr_m);

    // 4. inverse-CDF draw over the kept mass, in vocabulary order: thread t owns a contiguous
    // chunk (an odd length, so that a warp's shared-memory reads fall in distinct banks)
    int chunk = (vocab + kThreads - 1) / kThreads;
    chunk |= 1;
    const int begin = min(vocab, static_cast<int>(threadIdx.x) * chunk), end = min(vocab, begin + chunk);
    float local = 0.0f;
    int last_kept = -1;
    for (int i = begin; i < end; ++i) {
      const float v = x[i];
      if (v >= thr) {
        const float w = expf(v);
        local += w;
        if (w > 0.0f) last_kept = i;
      }
    }
    float total = 0.0f;
    const float before = block_exclusive_scan(local, scan_shared, &total);
    const int64_t column = min(step[row], last_step[row]);
    const float u = uniforms[static_cast<size_t>(row) * steps + column];
    const float target = __fmul_rn(u, total);
    int found = 0x7fffffff;
    if (before + local > target) {
      float c = before;
      for (int i = begin; i < end; ++i) {
        const float v = x[i];
        if (v >= thr) c += expf(v);
        if (c > target) {
          found = i;
          break;
        }
      }
    }
    found = block_min_int(found, int_shared);
    if (found == 0x7fffffff) found = block_max_int(last_kept, int_shared);  // rounding: the last kept
    if (found >= 0) token = found;
  }
  __syncthreads();  // every read of x (possibly counts_out) is done

  // 5. the state the next step reads
  for (int i = threadIdx.x; i < vocab; i += kThreads) {
    const bool hit = i == token;
    seen_out[base + i] = seen[base + i] || hit;
    counts_out[base + i] = counts[base + i] + (hit ? 1.0f : 0.0f);
  }
  if (threadIdx.x == 0) {
    next_ids[row] = token;
    step_out[row] = step[row] + 1;
  }
}

// LMFORGE_PROFILE=1 (a build switch, off by default): the cluster kernel's thread 0 of rank 0 adds each
// row's SM clock cycles per phase, its wall time (%globaltimer, ns) and its search rounds to
// g_profile, which lmforge_profile_read copies out and zeroes: where a row's time goes inside a
// decode step, where CUPTI sees only the whole launch (bench/gpu_profile.py --phases).
#ifndef LMFORGE_PROFILE
#define LMFORGE_PROFILE 0
#endif
enum ProfileSlot {
  kProfRows, kProfSampled, kProfArgmax, kProfStats, kProfTopK, kProfTopP, kProfDraw, kProfState, kProfExit,
  kProfCycles, kProfNanos, kProfRoundsK, kProfRoundsP,
  kProfPass, kProfReduce, kProfInterp,  // the searches' passes and reductions (cycles), interpolated rounds
  kProfSlots
};
#if LMFORGE_PROFILE
__device__ unsigned long long g_profile[kProfSlots];
__device__ __forceinline__ unsigned long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
  return t;
}
struct PhaseClock {  // one per thread; only the recording thread (rank 0, thread 0) adds anything
  bool on;
  long long start, last;
  unsigned long long start_ns;
  __device__ void begin(bool recording) {
    on = recording;
    start = last = clock64();
    start_ns = global_ns();
  }
  __device__ void mark(int slot) {
    if (!on) return;
    const long long now = clock64();
    atomicAdd(&g_profile[slot], static_cast<unsigned long long>(now - last));
    last = now;
  }
  __device__ void end() {
    if (!on) return;
    atomicAdd(&g_profile[kProfCycles], static_cast<unsigned long long>(clock64() - start));
    atomicAdd(&g_profile[kProfNanos], global_ns() - start_ns);
    atomicAdd(&g_profile[kProfRows], 1ull);
  }
};
#define LMFORGE_PROF(statement) statement
#else
#define LMFORGE_PROF(statement)
#endif

// -- the cluster kernel (sm_90+): a row over a cluster of kCluster thread blocks -------------------
//
// Block r of a row's cluster owns the contiguous slice [r * slice, min(vocab, (r + 1) * slice)) of the
// row, slice = ceil(vocab / kCluster), cached in its own shared memory (x, then s); a block whose
// slice is empty (vocab < kCluster * slice ... a tiny vocabulary) takes part in every reduction with
// nothing. Each reduction is a block reduction whose total lands in the block's slot, a cluster
// barrier, then every thread of the cluster combines the kCluster slots read through distributed
// shared memory in rank order 0, 1, …: every thread of every block gets the same bits, and the same
// from run to run. The slots alternate between two buffers: the next reduction writes the other
// one, and the one after it writes this one only after a cluster barrier that every block reaches
// after its reads of this one. No block leaves before every block is past its last remote read.
// LMFORGE_PUSH_REDUCE (below, on by default) replaces the cluster barrier and the remote reads of most
// reductions by pushes into every block's shared memory: the same totals combined in the same order.

constexpr int kCluster = 8;  // blocks a row (the portable maximum)
#ifndef LMFORGE_CLUSTER_THREADS
#define LMFORGE_CLUSTER_THREADS 512
#endif
constexpr int kClusterThreads = LMFORGE_CLUSTER_THREADS;
// Blocks an SM may hold at once (the kernel's launch bound, which caps its registers to fit; a build
// switch, 2 by default, 1 for A/B timing). With one, a GPU holds only as many rows' clusters as its GPCs
// have room for 8 whole SMs: 15 on a 132-SM H200, so the 16th row of a batch ran in a second wave and
// 16 rows took two rows' time. With two, the same GPU holds 30 and a batch of 16 runs in one wave.
// The arithmetic does not change (the same code in fewer registers: 63, no spills on sm_90), so
// neither do the tokens. The selftest prints how many clusters the GPU holds; docs/kernels.md has
// the measurements.
#ifndef LMFORGE_CLUSTER_BLOCKS_PER_SM
#define LMFORGE_CLUSTER_BLOCKS_PER_SM 2
#endif
constexpr int kClusterBlocksPerSm = LMFORGE_CLUSTER_BLOCKS_PER_SM;
constexpr int kClusterWarps = kClusterThreads / 32;
static_assert(kClusterThreads % 32 == 0 && kClusterWarps <= 32, "a block of whole warps, at most 32");

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
#define LMFORGE_CLUSTER_DEVICE 1
#else
#define LMFORGE_CLUSTER_DEVICE 0
#endif

#if LMFORGE_CLUSTER_DEVICE

// Every reduced value travels as a float4 (an int as its bits): `Fields` of them are shuffled.
template <int Fields>
__device__ __forceinline__ float4 shfl_xor4(float4 v, int o) {
  float4 r = v;
  r.x = __shfl_xor_sync(kFull, v.x, o);
  if (Fields > 1) r.y = __shfl_xor_sync(kFull, v.y, o);
  if (Fields > 2) r.z = __shfl_xor_sync(kFull, v.z, o);
  if (Fields > 3) r.w = __shfl_xor_sync(kFull, v.w, o);
  return r;
}

struct RoundOp {  // weight, the smallest value at or above the pivot, the largest below, mass
  static constexpr int kFields = 4;
  __device__ float4 operator()(float4 a, float4 b) const {
    return make_float4(a.x + b.x, fminf(a.y, b.y), fmaxf(a.z, b.z), a.w + b.w);
  }
};
struct BestOp {  // the maximum value (x), first index (y, an int) on ties
  static constexpr int kFields = 2;
  __device__ float4 operator()(float4 a, float4 b) const {
    const int ia = __float_as_int(a.y), ib = __float_as_int(b.y);
    return (b.x > a.x || (b.x == a.x && ib < ia)) ? b : a;
  }
};
// LMFORGE_OWNER_DRAW (a build switch, on by default; 0 for A/B timing): the draw without its last
// cluster reduction (the block whose slice holds the target finds the token and writes the id).
#ifndef LMFORGE_OWNER_DRAW
#define LMFORGE_OWNER_DRAW 1
#endif
#if !LMFORGE_OWNER_DRAW
struct PickOp {  // the smallest found index (x, an int), the largest kept index (y, an int)
  static constexpr int kFields = 2;
  __device__ float4 operator()(float4 a, float4 b) const {
    return make_float4(__int_as_float(min(__float_as_int(a.x), __float_as_int(b.x))),
                       __int_as_float(max(__float_as_int(a.y), __float_as_int(b.y))), 0.0f, 0.0f);
  }
};
#endif

// The draw's scan of a thread's chunk [lo_j, hi_j) of the slice: the first index (begin + j) whose
// cumulative kept mass, from start, passes target, or 0x7fffffff.
__device__ __forceinline__ int first_past(const float* x, int lo_j, int hi_j, float thr, float start, float target,
                                          int begin) {
  float c = start;
  for (int j = lo_j; j < hi_j; ++j) {
    const float v = x[j];
    if (v >= thr) c += expf(v);
    if (c > target) return begin + j;
  }
  return 0x7fffffff;
}

// The exclusive prefix sum of one value a thread over the block (thread order), and the block's total
// in *total; the warps' totals go through `warps` (kClusterWarps entries). Every thread calls it.
template <typename V>
__device__ __forceinline__ V block_exclusive_scan_of(V v, V* warps, V* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  V inclusive = v;
  for (int o = 1; o < 32; o <<= 1) {
    const V up = __shfl_up_sync(kFull, inclusive, o);
    if (lane >= o) inclusive += up;
  }
  if (lane == 31) warps[warp] = inclusive;
  __syncthreads();
  const V warp_total = lane < kClusterWarps ? warps[lane] : V(0);
  V warp_inclusive = warp_total;
  for (int o = 1; o < 32; o <<= 1) {
    const V up = __shfl_up_sync(kFull, warp_inclusive, o);
    if (lane >= o) warp_inclusive += up;
  }
  const V before_warp = __shfl_sync(kFull, warp_inclusive - warp_total, warp);
  *total = __shfl_sync(kFull, warp_inclusive, 31);
  return before_warp + inclusive - v;
}

// Top-p's threshold search tries kPivots values a round: each round is one pass over the row and one
// cluster reduction (for a flat row of a random-weight model, half its cycles), so fewer rounds
// shorten a row; more pivots cost comparisons an element. 3 is the default (docs/kernels.md: 3 against 1 and 7 through onnxruntime).
#ifndef LMFORGE_CLUSTER_PIVOTS
#define LMFORGE_CLUSTER_PIVOTS 3
#endif
constexpr int kPivots = LMFORGE_CLUSTER_PIVOTS;  // pivots a search round (1: bisection)
static_assert(kPivots >= 1 && kPivots <= 7, "1 to 7 pivots a round");
constexpr int kMultiWords = kPivots > 1 ? 4 * kPivots : 4;

// LMFORGE_PUSH_REDUCE (a build switch; 1, the default; 0 for A/B timing): the cluster reductions without
// a cluster barrier. A cluster barrier (cooperative_groups' cluster.sync()) compiles on sm_90 to a
// GPU-scope memory fence, the barrier, and an L1 invalidation, then each block reads the others' totals
// through distributed shared memory: two trips between SMs a reduction. Here warp 0 of each block
// pushes the block's total into every other block's shared memory (st.async: a store into another
// block of the cluster that completes its bytes on that block's mbarrier) and copies it into its own,
// then waits on its own mbarrier until the other kCluster - 1 totals have landed, and combines them in
// rank order as before: the same bits. Two buffers alternate; a block pushes into a buffer again only
// two reductions later, after every block's push of the reduction between, which each block makes
// only after reading that buffer. Every reduction pushes but the gathered top-k + top-p list's and the
// non-owner draw's; the barriers are set up at the start and published by a cluster barrier phase
// that ends before the first (the argmax's).
#ifndef LMFORGE_PUSH_REDUCE
#define LMFORGE_PUSH_REDUCE 1
#endif
#if LMFORGE_PUSH_REDUCE
constexpr int kPushVecs = (kMultiWords + 3) / 4;  // a Multi's words in whole float4s
#endif

struct ClusterShared {
  float4 warps[kClusterWarps];  // the block reduction's warp totals
  float4 slots[2];              // the block's total, read by every block of the cluster (or pushed to it)
  float scan[kClusterWarps];    // the block scan's warp totals
  alignas(16) float multi_warps[kClusterWarps][kMultiWords];  // the same for a search of several pivots
  alignas(16) float multi_slots[2][kMultiWords];
  alignas(16) float multi_result[kMultiWords];
  int2 pick[kClusterWarps];  // the owner draw's block reduction (first index, last kept)
#if LMFORGE_PUSH_REDUCE
  alignas(16) float4 push[2][kCluster][kPushVecs];  // every rank's block total of a reduction, pushed here
  alignas(8) unsigned long long push_bar[2];         // their mbarriers (the two buffers alternate)
  int push_uses;                                     // pushed reductions so far (warp 0 reads and writes it)
  float4 result;                                     // a pushed cluster_reduce's total, for the block
  float totals[kCluster];                            // the pushed draw's block totals, for the block
#endif
};

#if LMFORGE_PUSH_REDUCE
__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ uint32_t rank_address(uint32_t address, int rank) {  // the same place in that block
  uint32_t r;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(address), "r"(rank));
  return r;
}
__device__ __forceinline__ void push_init(ClusterShared& sh) {  // thread 0, before the first cluster barrier
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(shared_address(&sh.push_bar[0])) : "memory");
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(shared_address(&sh.push_bar[1])) : "memory");
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  sh.push_uses = 0;
}
// Warp 0: the block total (Vecs float4s in this block's shared memory) pushed to every other rank and
// copied into this block's own buffer, then that buffer holding every rank's (rank q's at q * kPushVecs)
// once the other ranks' have landed; returns it.
template <int Vecs>
__device__ __forceinline__ const float4* push_exchange(const float4* total, ClusterShared& sh) {
  static_assert(Vecs >= 1 && Vecs <= kPushVecs, "room in the buffer");
  const int lane = threadIdx.x & 31;
  const int use = sh.push_uses;
  const int b = use & 1;
  const uint32_t parity = static_cast<uint32_t>(use >> 1) & 1u;
  const uint32_t bar = shared_address(&sh.push_bar[b]);
  const int rank = static_cast<int>(cooperative_groups::this_cluster().block_rank());
  if (lane == 0)  // the other ranks' bytes; this block's own total is copied by an ordinary store
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar),
                 "r"(static_cast<uint32_t>((kCluster - 1) * Vecs * sizeof(float4))) : "memory");
  if (lane == rank) {
#pragma unroll
    for (int i = 0; i < Vecs; ++i) sh.push[b][rank][i] = total[i];
  } else if (lane < kCluster) {
    const uint32_t to = rank_address(shared_address(&sh.push[b][rank][0]), lane);
    const uint32_t to_bar = rank_address(bar, lane);
#pragma unroll
    for (int i = 0; i < Vecs; ++i) {
      const float4 v = total[i];
      asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.f32 [%0], {%1, %2, %3, %4}, [%5];"
                   ::"r"(to + 16u * i), "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w), "r"(to_bar) : "memory");
    }
  }
  asm volatile(
      "{\n .reg .pred done;\n"
      "PUSH_WAIT_%=:\n"
      " mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 done, [%0], %1;\n"
      " @!done bra PUSH_WAIT_%=;\n}" ::"r"(bar), "r"(parity) : "memory");
  __syncwarp();
  if (lane == 0) sh.push_uses = use + 1;
  return &sh.push[b][0][0];
}
#endif

// The block's total of v over its threads (fixed xor butterflies), then the cluster's: the slots of
// ranks 0, 1, …, kCluster - 1 combined in that order. Every thread of the cluster calls it (the
// calls are the same sequence in every block: every branch around them is on cluster-wide values).
// push (LMFORGE_PUSH_REDUCE builds): the slots pushed to every block instead, no cluster barrier.
template <typename Op>
__device__ float4 cluster_reduce(float4 v, float4 identity, Op op, ClusterShared& sh, int& phase,
                                 bool push = false) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int o = 16; o > 0; o >>= 1) v = op(v, shfl_xor4<Op::kFields>(v, o));
  if (lane == 0) sh.warps[warp] = v;  // read by warp 0 below, before the cluster barrier: the next
                                      // reduction writes it only after that barrier
  __syncthreads();
  if (warp == 0) {
    float4 w = lane < kClusterWarps ? sh.warps[lane] : identity;
    for (int o = 16; o > 0; o >>= 1) w = op(w, shfl_xor4<Op::kFields>(w, o));
    if (lane == 0) sh.slots[phase] = w;
#if LMFORGE_PUSH_REDUCE
    if (push) {
      __syncwarp();
      const float4* all = push_exchange<1>(&sh.slots[phase], sh);
      if (lane == 0) {
        float4 total = all[0];
#pragma unroll
        for (int q = 1; q < kCluster; ++q) total = op(total, all[q * kPushVecs]);
        sh.result = total;
      }
    }
#endif
  }
#if LMFORGE_PUSH_REDUCE
  if (push) {
    __syncthreads();
    phase ^= 1;
    return sh.result;  // rewritten by the next reduction only after its first block barrier
  }
#endif
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  cluster.sync();  // every block's slot written (release / acquire at cluster scope)
  float4 parts[kCluster];
#pragma unroll
  for (int q = 0; q < kCluster; ++q) parts[q] = *cluster.map_shared_rank(&sh.slots[phase], q);
  float4 total = parts[0];
#pragma unroll
  for (int q = 1; q < kCluster; ++q) total = op(total, parts[q]);
  phase ^= 1;
  return total;
}

// The threshold search of `search` over the cluster: the same pivots, rounds and result, with the
// elements outside the live interval [lo, hi] skipped (below lo: not at or above the pivot, and lo
// itself, in play, bounds what they would give the largest value below it; above hi: at or above
// every pivot to come, so their weight is carried over from the round that lowered hi). With
// `track_mass`, *lo_mass is the mass (sum of exp(s)) at or above the returned value.
__device__ float cluster_search(const float* s, int n, float lo, float lo_weight, float lo_mass, float target,
                                bool mass, bool track_mass, float* lo_mass_out, ClusterShared& sh, int& phase) {
  *lo_mass_out = lo_mass;
  if (!(lo_weight >= target)) return lo;
  float hi = 0.0f;                                // the row's maximum: s = 0 there
  float above_weight = 0.0f, above_mass = 0.0f;   // of the elements above hi (none yet)
  for (int round = 0; round < 40 && key_of(lo) < key_of(hi); ++round) {
    const uint32_t kl = key_of(lo), kh = key_of(hi);
    const uint32_t km = kl + (kh - kl + 1u) / 2u;  // in (kl, kh]
    const float pivot = value_of(km);
    float4 r = make_float4(0.0f, INFINITY, -INFINITY, 0.0f);
    for (int j = threadIdx.x; j < n; j += kClusterThreads) {
      const float v = s[j];
      if (!(v >= lo) || v > hi) continue;
      if (v >= pivot) {
        const float e = (mass || track_mass) ? expf(v) : 0.0f;
        r.x += mass ? e : 1.0f;
        r.w += e;
        r.y = fminf(r.y, v);
      } else {
        r.z = fmaxf(r.z, v);
      }
    }
    r = cluster_reduce(r, make_float4(0.0f, INFINITY, -INFINITY, 0.0f), RoundOp{}, sh, phase);
    const float weight = above_weight + r.x, at_or_above_mass = above_mass + r.w;
    if (weight >= target) {
      lo = r.y;  // an element at or above the pivot: G(lo) = weight >= target
      *lo_mass_out = at_or_above_mass;
    } else {
      hi = r.z;  // the answer is below the pivot; everything above the new hi is at or above the pivot
      above_weight = weight;
      above_mass = at_or_above_mass;
    }
  }
  return lo;
}

// A search round of P pivots: per pivot, the weight (and mass) at or above it, the smallest value at
// or above it and the largest below it (as keys: min / max are exact in any order).
template <int P, bool Track>
struct Multi {
  static constexpr int kSums = Track ? 2 * P : P;
  static constexpr int kWords = kSums + 2 * P;
  float sum[kSums];  // weights [0, P), then masses
  uint32_t low[P];   // key of the smallest value at or above pivot q (key_of(inf): none)
  uint32_t high[P];  // key of the largest value below pivot q (key_of(-inf): none)
  __device__ void clear() {
#pragma unroll
    for (int i = 0; i < kSums; ++i) sum[i] = 0.0f;
#pragma unroll
    for (int q = 0; q < P; ++q) low[q] = 0xff800000u, high[q] = 0x007fffffu;
  }
  __device__ void store(float* w) const {
#pragma unroll
    for (int i = 0; i < kSums; ++i) w[i] = sum[i];
#pragma unroll
    for (int q = 0; q < P; ++q) w[kSums + q] = __uint_as_float(low[q]), w[kSums + P + q] = __uint_as_float(high[q]);
  }
  __device__ void load(const float* w) {
#pragma unroll
    for (int i = 0; i < kSums; ++i) sum[i] = w[i];
#pragma unroll
    for (int q = 0; q < P; ++q) low[q] = __float_as_uint(w[kSums + q]), high[q] = __float_as_uint(w[kSums + P + q]);
  }
  __device__ void warp_reduce() {  // the same bits in every lane
#pragma unroll
    for (int i = 0; i < kSums; ++i)
      for (int o = 16; o > 0; o >>= 1) sum[i] += __shfl_xor_sync(kFull, sum[i], o);
#pragma unroll
    for (int q = 0; q < P; ++q) low[q] = __reduce_min_sync(kFull, low[q]), high[q] = __reduce_max_sync(kFull, high[q]);
  }
};

// cluster_reduce for a Multi: block totals as there; warp 0 combines the cluster's slots (lane q
// reads rank q's; sums in rank order) and hands the result to the block through shared memory.
template <int P, bool Track>
__device__ void multi_reduce(Multi<P, Track>& v, ClusterShared& sh, int& phase) {
  static_assert(Multi<P, Track>::kWords <= kMultiWords, "room for the words");
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v.warp_reduce();
  if (lane == 0) v.store(sh.multi_warps[warp]);
  __syncthreads();
#if LMFORGE_PUSH_REDUCE
  if (warp == 0) {
    Multi<P, Track> w;
    if (lane < kClusterWarps) w.load(sh.multi_warps[lane]); else w.clear();
    w.warp_reduce();
    if (lane == 0) w.store(sh.multi_slots[phase]);
    __syncwarp();
    const float4* all = push_exchange<kPushVecs>(reinterpret_cast<const float4*>(sh.multi_slots[phase]), sh);
    Multi<P, Track> r;
    if (lane < kCluster) r.load(reinterpret_cast<const float*>(all + lane * kPushVecs)); else r.clear();
#else
  if (warp == 0) {
    Multi<P, Track> w;
    if (lane < kClusterWarps) w.load(sh.multi_warps[lane]); else w.clear();
    w.warp_reduce();
    if (lane == 0) w.store(sh.multi_slots[phase]);
  }
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  cluster.sync();
  if (warp == 0) {
    Multi<P, Track> r;
    if (lane < kCluster) r.load(cluster.map_shared_rank(&sh.multi_slots[phase][0], lane)); else r.clear();
#endif
#pragma unroll
    for (int i = 0; i < Multi<P, Track>::kSums; ++i) {
      float total = __shfl_sync(kFull, r.sum[i], 0);
#pragma unroll
      for (int q = 1; q < kCluster; ++q) total += __shfl_sync(kFull, r.sum[i], q);
      r.sum[i] = total;
    }
#pragma unroll
    for (int q = 0; q < P; ++q) r.low[q] = __reduce_min_sync(kFull, r.low[q]), r.high[q] = __reduce_max_sync(kFull, r.high[q]);
    if (lane == 0) r.store(sh.multi_result);
  }
  __syncthreads();
  v.load(sh.multi_result);  // rewritten by the next reduction only after its own barriers
  phase ^= 1;
}

// LMFORGE_PIVOT_RULE (a build switch; 1, the default; 0 for A/B timing): where a round of
// cluster_search_multi puts its P pivots. Any pivots in (lo, hi] end on the same value, the largest
// whose weight reaches the target, so the rule moves only the number of rounds (and, where two sums
// meet, the order of float sums).
//   0: the keys (lo, hi] split in P + 1 equal parts.
//   1: the same split over the span with its empty ends cut off: below the row's smallest finite s
//      (s = -inf for masked tokens) and between the largest s below 0 and the maximum at 0 (the keys of
//      every tiny magnitude, which the split would otherwise spend its first round on). Once the span
//      is within 2^23 keys (about one binade, where keys are linear in the value) and the last such
//      round shrank it at least as much as a split would (else one split round first: a guard on the
//      round count), the pivots go where the weight is estimated to reach the target, the bracket's
//      ends as the model: the count linear in the value (top-k), the mass linear in exp(value) (top-p),
//      the pivots spread +-frac of the bracket around that value, frac quartered after a round whose
//      answer fell between the outer pivots and quadrupled (at most 1/2) after one whose did not.
//      docs/kernels.md has the host replay's round counts.
#ifndef LMFORGE_PIVOT_RULE
#define LMFORGE_PIVOT_RULE 1
#endif
// LMFORGE_LIVE_MASK (a build switch; 0, the default: no gain of its own measured; 1 to try): each thread of a
// search keeps a bit an element of its own (element threadIdx.x + i * kClusterThreads: bit i) that is
// still in play and visits only those, in the same order, so a round costs the elements still in play
// rather than the whole slice (the same sums, bit for bit). A slice of more than 32 elements a thread
// (a vocabulary above 131,072) visits them all, as without the mask.
#ifndef LMFORGE_LIVE_MASK
#define LMFORGE_LIVE_MASK 0
#endif
// LMFORGE_ARGMAX_STAGE (a build switch; 0, the default: no gain of its own measured; 1 to try): the first phase
// loads the slice's logits into shared memory before processing them (below), for greedy and sampled
// rows alike. In a decode step the logits are not in L2 (the weights stream through it between two
// calls), and the phase's loop issues one element's loads only after the previous element's branches.
#ifndef LMFORGE_ARGMAX_STAGE
#define LMFORGE_ARGMAX_STAGE 0
#endif
// LMFORGE_TOPK_GATHER (a build switch; 1, the default; 0 for A/B timing): once top-k's threshold is
// known, a row that also has top-p and at most kGather elements at or above that threshold (k <=
// kGather, and ties that do not pass it) finishes without another cluster round. Every block copies
// every block's such elements through distributed shared memory (rank order, then thread order: the
// same list in every block), then finds top-p's threshold over them and draws from them alone, the
// same arithmetic in every block, so each knows the token. The top-k search then sums no mass (top-p's comes from the
// list), and top-p's search, the draw's pass over the slice and its cluster scan are gone. Each step
// is quadratic in the list's length (every element's mass at or above it, every kept element's
// cumulative mass in vocabulary order), so kGather stays small. A row over kGather takes the
// cluster path (with one more cluster reduction, top-k's mass). A row with top-k alone keeps the
// cluster draw: for it the list costs more than the one pass and scan it saves.
#ifndef LMFORGE_TOPK_GATHER
#define LMFORGE_TOPK_GATHER 1
#endif

#if LMFORGE_PIVOT_RULE
// The pivots of rule 1 for a round over [lo, hi], ascending and in (lo, hi]; returns whether they were
// interpolated, and the span they split in *span_out. lo_weight: G(lo); above_weight: the weight above
// hi (< target <= lo_weight); finite_min and second: the row's smallest finite s and largest s below 0.
template <int P>
__device__ __forceinline__ bool rule_pivots(float lo, float hi, float lo_weight, float above_weight, float target,
                                            bool mass, float finite_min, float second, float frac, bool interp_ok,
                                            float (&pivot)[P], uint32_t* span_out) {
  const uint32_t kl = key_of(lo), kh = key_of(hi);
  uint32_t a = kl, b = kh;  // the pivots' keys are in (a, b]
  if (finite_min > lo) a = max(kl, key_of(finite_min) - 1u);
  if (hi == 0.0f && second < 0.0f) b = min(kh, key_of(second) + 1u);  // (second, 0) holds no element
  if (!(a < b)) a = kl, b = kh;
  const uint32_t span = b - a;
  *span_out = span;
  const bool interp = interp_ok && span <= (1u << 23) && lo_weight > above_weight;
  if (interp) {
    const float vlo = a > kl ? value_of(a + 1u) : lo, vhi = value_of(b);
    const float reach = (target - above_weight) / (lo_weight - above_weight);  // in (0, 1]: from hi down
    const float el = expf(vlo), eh = expf(vhi);
#pragma unroll
    for (int q = 0; q < P; ++q) {
      const float offset = frac * static_cast<float>(P - 1 - 2 * q) / static_cast<float>(P > 1 ? P - 1 : 1);
      const float f = fminf(fmaxf(reach + offset, 0.0f), 1.0f);
      float v;
      if (mass) {
        const float e = eh - f * (eh - el);
        v = e > 0.0f ? logf(e) : vlo;
      } else {
        v = vhi - f * (vhi - vlo);
      }
      uint32_t k = key_of(v);  // clamped into (a, b] and (kl, kh]: any key there is a valid pivot
      k = min(max(max(k, a + 1u), kl + 1u), min(b, kh));
      pivot[q] = value_of(k);
    }
  } else {
#pragma unroll
    for (int q = 0; q < P; ++q) {
      uint32_t k = a + static_cast<uint32_t>((static_cast<uint64_t>(span) * (q + 1) + P) / (P + 1));
      k = min(max(k, kl + 1u), kh);
      pivot[q] = value_of(k);
    }
  }
  return interp;
}
#endif

// cluster_search with P pivots a round, splitting the keys (lo, hi] in P + 1 parts (LMFORGE_PIVOT_RULE:
// where): the same result, in fewer rounds. finite_min and second (the row's smallest finite s, its
// largest s below 0) are read only by pivot rule 1.
template <int P, bool Track>
__device__ float cluster_search_multi(const float* s, int n, float lo, float lo_weight, float lo_mass, float target,
                                      bool mass, float* lo_mass_out, ClusterShared& sh, int& phase,
                                      float finite_min, float second) {
  *lo_mass_out = lo_mass;
  if (!(lo_weight >= target)) return lo;
  float hi = 0.0f;
  float above_weight = 0.0f, above_mass = 0.0f;
#if LMFORGE_PIVOT_RULE
  float frac = 0.125f;   // the interpolated pivots' spread, a fraction of the bracket
  bool interp_ok = true;
#endif
#if LMFORGE_LIVE_MASK
  const int tid = static_cast<int>(threadIdx.x);
  const int mine = tid < n ? (n - 1 - tid) / kClusterThreads + 1 : 0;  // this thread's elements
  const bool masked = mine <= 32;
  uint32_t live = mine >= 32 ? ~0u : (1u << mine) - 1u;  // bit i: element threadIdx.x + i * kClusterThreads
#endif
  LMFORGE_PROF(const bool recording = threadIdx.x == 0 && cooperative_groups::this_cluster().block_rank() == 0);
  for (int round = 0; round < 40 && key_of(lo) < key_of(hi); ++round) {
    LMFORGE_PROF(const long long pass_start = clock64());
    float pivot[P];
#if LMFORGE_PIVOT_RULE
    uint32_t span = 0;
    const bool interpolated = rule_pivots<P>(lo, hi, lo_weight, above_weight, target, mass, finite_min, second, frac,
                                             interp_ok, pivot, &span);
#else
    {
      const uint32_t kl = key_of(lo), span = key_of(hi) - kl;
#pragma unroll
      for (int q = 0; q < P; ++q)  // ceil(span (q + 1) / (P + 1)): in (kl, kh], ascending
        pivot[q] = value_of(kl + static_cast<uint32_t>((static_cast<uint64_t>(span) * (q + 1) + P) / (P + 1)));
    }
#endif
    Multi<P, Track> acc;
    acc.clear();
    auto visit = [&, lo, hi](float v) -> bool {  // false: v is out of play (and stays out: lo rises, hi falls)
      if (!(v >= lo) || v > hi) return false;
      const uint32_t kv = key_of(v);
      if (v >= pivot[0]) {
        const float e = (mass || Track) ? expf(v) : 0.0f;
        const float w = mass ? e : 1.0f;
#pragma unroll
        for (int q = 0; q < P; ++q) {
          if (v >= pivot[q]) {
            acc.sum[q] += w;
            if (Track) acc.sum[Track ? P + q : q] += e;
            acc.low[q] = min(acc.low[q], kv);
          } else {
            acc.high[q] = max(acc.high[q], kv);
          }
        }
      } else {
#pragma unroll
        for (int q = 0; q < P; ++q) acc.high[q] = max(acc.high[q], kv);
      }
      return true;
    };
#if LMFORGE_LIVE_MASK
    if (masked) {
      uint32_t next = 0;
      for (uint32_t m = live; m != 0; m &= m - 1) {  // ascending bits: the elements in the same order
        if (visit(s[static_cast<int>(threadIdx.x) + (__ffs(m) - 1) * kClusterThreads])) next |= m & (0u - m);
      }
      live = next;
    } else {
      for (int j = threadIdx.x; j < n; j += kClusterThreads) visit(s[j]);
    }
#else
    for (int j = threadIdx.x; j < n; j += kClusterThreads) visit(s[j]);
#endif
    LMFORGE_PROF(const long long reduce_start = clock64());
    multi_reduce(acc, sh, phase);
    LMFORGE_PROF(if (recording) {
      const long long now = clock64();
      atomicAdd(&g_profile[mass ? kProfRoundsP : kProfRoundsK], 1ull);
      atomicAdd(&g_profile[kProfPass], static_cast<unsigned long long>(reduce_start - pass_start));
      atomicAdd(&g_profile[kProfReduce], static_cast<unsigned long long>(now - reduce_start));
    });
    int passed = 0;  // pivots whose weight reaches the target (a prefix: the weights do not increase)
#pragma unroll
    for (int q = 0; q < P; ++q)
      if (above_weight + acc.sum[q] >= target) passed = q + 1;
    float new_lo = lo, new_lo_mass = *lo_mass_out, new_lo_weight = lo_weight;
#pragma unroll
    for (int q = 0; q < P; ++q) {
      if (q + 1 == passed) {
        new_lo = value_of(acc.low[q]);
        new_lo_weight = above_weight + acc.sum[q];
        new_lo_mass = above_mass + (Track ? acc.sum[Track ? P + q : q] : 0.0f);
      }
    }
    float new_hi = hi, new_above_weight = above_weight, new_above_mass = above_mass;
#pragma unroll
    for (int q = 0; q < P; ++q) {
      if (q == passed) {
        new_hi = value_of(acc.high[q]);
        new_above_weight = above_weight + acc.sum[q];
        new_above_mass = above_mass + (Track ? acc.sum[Track ? P + q : q] : 0.0f);
      }
    }
    lo = new_lo;
    lo_weight = new_lo_weight;
    *lo_mass_out = new_lo_mass;
    hi = new_hi;
    above_weight = new_above_weight;
    above_mass = new_above_mass;
#if LMFORGE_PIVOT_RULE
    if (interpolated) {
      LMFORGE_PROF(if (recording) atomicAdd(&g_profile[kProfInterp], 1ull));
      frac = passed > 0 && passed < P ? frac * 0.25f : fminf(frac * 4.0f, 0.5f);
      const uint32_t kl = key_of(lo), kh = key_of(hi);
      interp_ok = static_cast<uint64_t>(kh > kl ? kh - kl : 0u) * (P + 1) <= span;  // shrank as a split would
    } else {
      interp_ok = true;
    }
#endif
  }
  return lo;
}

#if LMFORGE_TOPK_GATHER
constexpr int kGather = 256;
constexpr int kNotGathered = -2;
struct GatherShared {
  float v[kGather];  // this block's elements at or above top-k's threshold (read by every block)
  int index[kGather];
  int count;         // how many (may exceed kGather: then nothing past kGather is written)
  float all_v[kGather], all_e[kGather];  // every block's, in rank order; all_e = exp(all_v)
  int all_index[kGather];
  int scan[kClusterWarps];
  uint32_t red[kClusterWarps];
};

// The block's maximum of v (every thread calls it and gets it), through g.red.
__device__ __forceinline__ uint32_t block_max_u32(uint32_t v, GatherShared& g) {
  v = __reduce_max_sync(kFull, v);
  __syncthreads();  // the previous reduction's reads of g.red are done
  if ((threadIdx.x & 31) == 0) g.red[threadIdx.x >> 5] = v;
  __syncthreads();
  return __reduce_max_sync(kFull, (threadIdx.x & 31) < kClusterWarps ? g.red[threadIdx.x & 31] : 0u);
}

// The token drawn (-1: nothing kept has mass, the argmax stands), or kNotGathered when more than kGather
// elements are at or above thr_k; the same answer in every block of the cluster. Every thread calls it.
__device__ int gather_finish(const float* x, int n, int begin, float thr_k, float p, float thr_m, float u,
                             GatherShared& g) {
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  // a. this block's elements at or above thr_k, in thread order (an exclusive scan of the counts)
  int mine = 0;
  for (int j = threadIdx.x; j < n; j += kClusterThreads) mine += x[j] >= thr_k ? 1 : 0;
  int block_total = 0;
  int at = block_exclusive_scan_of(mine, g.scan, &block_total);
  for (int j = threadIdx.x; j < n; j += kClusterThreads) {
    if (x[j] >= thr_k) {
      if (at < kGather) g.v[at] = x[j], g.index[at] = begin + j;
      ++at;
    }
  }
  if (threadIdx.x == 0) g.count = block_total;
  cluster.sync();  // every block's list and count written (none is written again in this call)
  int counts[kCluster];
  int total = 0;
#pragma unroll
  for (int q = 0; q < kCluster; ++q) counts[q] = *cluster.map_shared_rank(&g.count, q), total += counts[q];
  if (total > kGather) return kNotGathered;  // the same totals in every block: every block returns
  // b. the cluster's list, rank by rank
  for (int c = threadIdx.x; c < total; c += kClusterThreads) {
    int q = 0, offset = c;  // rank q's element offset (constant indices into counts: registers)
#pragma unroll
    for (int r = 0; r + 1 < kCluster; ++r)
      if (q == r && offset >= counts[r]) offset -= counts[r], q = r + 1;
    const float v = cluster.map_shared_rank(g.v, q)[offset];
    g.all_v[c] = v;
    g.all_e[c] = expf(v);
    g.all_index[c] = cluster.map_shared_rank(g.index, q)[offset];
  }
  __syncthreads();
  // c. top-p over the list (renormalized over it): the largest value whose mass at or above, summed in
  // list order, reaches p times the list's mass (the smallest, thr_k, always does: its sum is the mass)
  float mass = 0.0f;
  for (int d = 0; d < total; ++d) mass += g.all_e[d];
  const float top_p_target = __fmul_rn(p, mass);
  uint32_t best = key_of(thr_k);
  for (int c = threadIdx.x; c < total; c += kClusterThreads) {
    const float vc = g.all_v[c];
    float at_or_above = 0.0f;
    for (int d = 0; d < total; ++d)
      if (g.all_v[d] >= vc) at_or_above += g.all_e[d];
    if (at_or_above >= top_p_target) best = max(best, key_of(vc));
  }
  const float thr = fmaxf(fmaxf(thr_k, value_of(block_max_u32(best, g))), thr_m);
  // d. the draw over the kept elements (value >= thr) in vocabulary order: the first index whose
  // cumulative kept mass passes u times the kept mass, else the last kept with mass
  float kept = 0.0f;
  for (int d = 0; d < total; ++d)
    if (g.all_v[d] >= thr) kept += g.all_e[d];
  const float target = __fmul_rn(u, kept);
  int found = 0x7fffffff, last = -1;
  for (int c = threadIdx.x; c < total; c += kClusterThreads) {
    if (!(g.all_v[c] >= thr)) continue;
    const int ic = g.all_index[c];
    if (g.all_e[c] > 0.0f) last = max(last, ic);
    float cumulative = 0.0f;  // a superset's sum in the same order is never smaller: monotone in ic
    for (int d = 0; d < total; ++d)
      if (g.all_v[d] >= thr && g.all_index[d] <= ic) cumulative += g.all_e[d];
    if (cumulative > target) found = min(found, ic);
  }
  found = static_cast<int>(0x7fffffffu - block_max_u32(0x7fffffffu - static_cast<uint32_t>(found), g));  // the min
  last = static_cast<int>(block_max_u32(static_cast<uint32_t>(last + 1), g)) - 1;                     // -1: none
  return found != 0x7fffffff ? found : last;
}
#endif  // LMFORGE_TOPK_GATHER

#endif  // LMFORGE_CLUSTER_DEVICE

// The row's work of fused_sample over a cluster of kCluster blocks (grid: batch * kCluster blocks,
// cluster dimension kCluster): the same semantics; sums are combined in another (fixed) order.
template <typename T>
__global__ void __launch_bounds__(kClusterThreads, kClusterBlocksPerSm)
    fused_sample_cluster(const T* __restrict__ logits, int vocab, const float* __restrict__ temperature,
                         const int64_t* __restrict__ top_k, const float* __restrict__ top_p,
                         const float* __restrict__ min_p, const float* __restrict__ repetition,
                         const float* __restrict__ presence, const float* __restrict__ frequency,
                         const int64_t* __restrict__ min_new, const bool* __restrict__ stop_mask,
                         const float* __restrict__ uniforms, int steps, const int64_t* __restrict__ last_step,
                         const bool* __restrict__ seen, const float* __restrict__ counts,
                         const int64_t* __restrict__ step, int64_t* __restrict__ next_ids,
                         bool* __restrict__ seen_out, float* __restrict__ counts_out,
                         int64_t* __restrict__ step_out) {
#if LMFORGE_CLUSTER_DEVICE
  namespace cg = cooperative_groups;
  extern __shared__ float cache[];  // the block's slice: x, then s
  __shared__ ClusterShared sh;
#if LMFORGE_TOPK_GATHER
  __shared__ GatherShared gather;
#endif
  cg::cluster_group cluster = cg::this_cluster();
  int phase = 0;
#if LMFORGE_PUSH_REDUCE
  // the barriers set up, then published to the cluster by a barrier phase whose wait is just before the
  // argmax's reduction (the first push)
  if (threadIdx.x == 0) push_init(sh);
  asm volatile("barrier.cluster.arrive.relaxed;" ::: "memory");
#endif

  const int rank = static_cast<int>(cluster.block_rank());
  LMFORGE_PROF(PhaseClock clock; clock.begin(rank == 0 && threadIdx.x == 0));
  const int row = blockIdx.x / kCluster;
  const int slice = (vocab + kCluster - 1) / kCluster;
  const int begin = min(vocab, rank * slice), n = min(vocab, begin + slice) - begin;  // n >= 0
  const size_t base = static_cast<size_t>(row) * vocab + begin;  // the slice's first element
  float* x = cache;
  const T* in = logits + base;
  const bool early = step[row] < min_new[row];
  const float rep = repetition[row], pres = presence[row], freq = frequency[row];
  const bool penalized = rep != 1.0f || pres != 0.0f || freq != 0.0f;

  // 1. processed logits and their argmax
  float4 best = make_float4(-INFINITY, __int_as_float(0x7fffffff), 0.0f, 0.0f);
#if LMFORGE_ARGMAX_STAGE
  // The slice's logits staged in shared memory first, by loads alone, 16 a thread in flight at once (the
  // loop below holds branches between one element's loads and the next's). Each thread reads back only
  // its own elements: no barrier.
  for (int first = threadIdx.x; first < n; first += 16 * kClusterThreads) {
    T staged[16];
#pragma unroll
    for (int u = 0; u < 16; ++u) {  // every load first, then every store
      const int j = first + u * kClusterThreads;
      if (j < n) staged[u] = in[j];
    }
#pragma unroll
    for (int u = 0; u < 16; ++u) {
      const int j = first + u * kClusterThreads;
      if (j < n) x[j] = to_float(staged[u]);
    }
  }
#endif
  for (int j = threadIdx.x; j < n; j += kClusterThreads) {
#if LMFORGE_ARGMAX_STAGE
    float v = x[j];
#else
    float v = to_float(in[j]);
#endif
    if (early && stop_mask[base + j]) v = -INFINITY;
    if (penalized) {
      if (seen[base + j]) v = v > 0.0f ? __fdiv_rn(v, rep) : __fmul_rn(v, rep);
      const float c = counts[base + j];
      const float present = c > 0.0f ? 1.0f : 0.0f;
      v = __fsub_rn(v, __fadd_rn(__fmul_rn(freq, c), __fmul_rn(pres, present)));
    }
    x[j] = v;
    best = BestOp{}(best, make_float4(v, __int_as_float(begin + j), 0.0f, 0.0f));
  }
#if LMFORGE_PUSH_REDUCE
  asm volatile("barrier.cluster.wait.acquire;" ::: "memory");  // every block's barriers set up
  best = cluster_reduce(best, make_float4(-INFINITY, __int_as_float(0x7fffffff), 0.0f, 0.0f), BestOp{}, sh, phase,
                        true);
#else
  best = cluster_reduce(best, make_float4(-INFINITY, __int_as_float(0x7fffffff), 0.0f, 0.0f), BestOp{}, sh, phase);
#endif
  int token = __float_as_int(best.y);  // the argmax; with the owner draw, a sampled row's token or -1 in
  int writer = 0;                       // every block but the writer's (the one that drew it)
  LMFORGE_PROF(clock.mark(kProfArgmax));

  const float t = temperature[row];
  const bool greedy = !(t > 0.0f) || top_k[row] == 1;
  if (!greedy) {
    LMFORGE_PROF(if (clock.on) atomicAdd(&g_profile[kProfSampled], 1ull));
    // 2. s = (x - max) / t; for the searches, the row's smallest s and its total mass
    const float row_max = best.x;
    const int64_t k = top_k[row];
    const float p = top_p[row];
    const bool top_k_search = k > 0 && k < vocab, top_p_search = p < 1.0f;
#if LMFORGE_PIVOT_RULE
    // also, for pivot rule 1: y the smallest finite s, z the largest s below 0, w how many s are -inf
    float4 stats = make_float4(0.0f, INFINITY, -INFINITY, 0.0f);
    for (int j = threadIdx.x; j < n; j += kClusterThreads) {
      const float v = __fdiv_rn(__fsub_rn(x[j], row_max), t);
      x[j] = v;
      if (top_p_search) stats.x += expf(v);
      if (v > -INFINITY) stats.y = fminf(stats.y, v);
      else if (v == -INFINITY) stats.w += 1.0f;
      if (v < 0.0f) stats.z = fmaxf(stats.z, v);
    }
#else
    float4 stats = make_float4(0.0f, INFINITY, 0.0f, 0.0f);
    for (int j = threadIdx.x; j < n; j += kClusterThreads) {
      const float v = __fdiv_rn(__fsub_rn(x[j], row_max), t);
      x[j] = v;
      if (top_p_search) stats.x += expf(v);
      stats.y = fminf(stats.y, v);
    }
#endif
    if (top_k_search || top_p_search)
      stats = cluster_reduce(stats, make_float4(0.0f, INFINITY, -INFINITY, 0.0f), RoundOp{}, sh, phase, true);
    else
      __syncthreads();  // the block's s written (the draw below reads other threads' elements)
#if LMFORGE_PIVOT_RULE
    const float finite_min = stats.y, second = stats.z;
    const float smallest = stats.w > 0.0f ? -INFINITY : stats.y;  // the row's smallest s, as below
#else
    const float finite_min = stats.y, second = 0.0f;  // read only by pivot rule 1
    const float smallest = stats.y;
#endif
    LMFORGE_PROF(clock.mark(kProfStats));

    // 3. the threshold: max(top-k, top-p, min-p)
    float thr_k = -INFINITY, mass_k = stats.x;
#if LMFORGE_TOPK_GATHER
    const bool try_gather = top_k_search && top_p_search && kPivots > 1 && k <= kGather;
#else
    constexpr bool try_gather = false;
#endif
    if (top_k_search) {
      if (kPivots == 1)
        thr_k = cluster_search(x, n, smallest, static_cast<float>(vocab), stats.x, static_cast<float>(k), false,
                               top_p_search, &mass_k, sh, phase);
      else if (top_p_search && !try_gather)
        thr_k = cluster_search_multi<kPivots, true>(x, n, smallest, static_cast<float>(vocab), stats.x,
                                                    static_cast<float>(k), false, &mass_k, sh, phase, finite_min,
                                                    second);
      else
        thr_k = cluster_search_multi<kPivots, false>(x, n, smallest, static_cast<float>(vocab), stats.x,
                                                     static_cast<float>(k), false, &mass_k, sh, phase, finite_min,
                                                     second);
    }
    LMFORGE_PROF(clock.mark(kProfTopK));
#if LMFORGE_TOPK_GATHER
    const int drawn = try_gather
        ? gather_finish(x, n, begin, thr_k, p, min_p[row] > 0.0f ? logf(min_p[row]) : -INFINITY,
                        uniforms[static_cast<size_t>(row) * steps + min(step[row], last_step[row])], gather)
        : kNotGathered;
    if (drawn == kNotGathered && try_gather) {  // top-k's mass, which its search did not sum
      float4 r = make_float4(0.0f, INFINITY, -INFINITY, 0.0f);
      for (int j = threadIdx.x; j < n; j += kClusterThreads)
        if (x[j] >= thr_k) r.x += expf(x[j]);
      mass_k = cluster_reduce(r, make_float4(0.0f, INFINITY, -INFINITY, 0.0f), RoundOp{}, sh, phase, true).x;
    }
    if (drawn != kNotGathered) {
      if (drawn >= 0) token = drawn;  // every block has it; rank 0 writes the id
      LMFORGE_PROF(clock.mark(kProfDraw));
    } else {  // the cluster's top-p search and draw (at its old indentation: a TOPK_GATHER=0 build is it alone)
#endif
    float thr_p = -INFINITY;
    if (top_p_search) {
      float mass = stats.x;  // top-p renormalizes over the top-k survivors
      float lo = smallest;
      if (k > 0 && thr_k > -INFINITY) {
        mass = mass_k;  // the mass at or above thr_k, summed by the top-k search
        lo = thr_k;
      }
      float unused = 0.0f;
      if (kPivots == 1)
        thr_p = cluster_search(x, n, lo, mass, 0.0f, __fmul_rn(p, mass), true, false, &unused, sh, phase);
      else
        thr_p = cluster_search_multi<kPivots, false>(x, n, lo, mass, 0.0f, __fmul_rn(p, mass), true, &unused, sh,
                                                     phase, finite_min, second);
    }
    const float mp = min_p[row];
    const float thr_m = mp > 0.0f ? logf(mp) : -INFINITY;
    const float thr = fmaxf(fmaxf(thr_k, thr_p), thr_m);
    LMFORGE_PROF(clock.mark(kProfTopP));

    // 4. inverse-CDF draw over the kept mass in vocabulary order: thread t of block r owns a
    // contiguous chunk of block r's slice; block r's offset is the kept mass of ranks < r
    int chunk = (n + kClusterThreads - 1) / kClusterThreads;
    chunk |= 1;
    const int lo_j = min(n, static_cast<int>(threadIdx.x) * chunk), hi_j = min(n, lo_j + chunk);
    float local = 0.0f;
    int last_kept = -1;
    for (int j = lo_j; j < hi_j; ++j) {
      const float v = x[j];
      if (v >= thr) {
        const float w = expf(v);
        local += w;
        if (w > 0.0f) last_kept = begin + j;
      }
    }
    // the block's exclusive scan (thread order) and total (sh.scan: written once a call)
    float block_total = 0.0f;
    const float before = block_exclusive_scan_of(local, sh.scan, &block_total);
    // the cluster's: the block totals of ranks 0, 1, … summed in that order
    if (threadIdx.x == 0) sh.slots[phase] = make_float4(block_total, 0.0f, 0.0f, 0.0f);
    float totals[kCluster];
#if LMFORGE_PUSH_REDUCE
    if (threadIdx.x < 32) {
      __syncwarp();
      const float4* all = push_exchange<1>(&sh.slots[phase], sh);
      if (threadIdx.x < kCluster) sh.totals[threadIdx.x] = all[threadIdx.x * kPushVecs].x;
    }
    __syncthreads();
#pragma unroll
    for (int q = 0; q < kCluster; ++q) totals[q] = sh.totals[q];
#else
    cluster.sync();
#pragma unroll
    for (int q = 0; q < kCluster; ++q) totals[q] = cluster.map_shared_rank(&sh.slots[phase], q)->x;
#endif
    phase ^= 1;
    float offset = 0.0f, total = 0.0f;
#pragma unroll
    for (int q = 0; q < kCluster; ++q) {
      if (q == rank) offset = total;
      total = q == 0 ? totals[0] : total + totals[q];
    }
    const int64_t column = min(step[row], last_step[row]);
    const float u = uniforms[static_cast<size_t>(row) * steps + column];
    const float target = __fmul_rn(u, total);
#if LMFORGE_OWNER_DRAW
    // The block that draws: the first rank whose cumulative mass (the sums above, the same bits in
    // every block) passes the target; where rounding leaves none, the last rank with kept mass; none
    // at all (nothing kept): the argmax stands. Only that block looks for the token in its slice (its
    // first index whose cumulative mass passes the target, else its last kept), so no cluster
    // reduction is needed: no other block's slice holds the token.
    int owner = -1;
    float cumulative = 0.0f;
#pragma unroll
    for (int q = 0; q < kCluster; ++q) {
      cumulative = q == 0 ? totals[0] : cumulative + totals[q];
      if (owner < 0 && cumulative > target) owner = q;
    }
    if (owner < 0) {
#pragma unroll
      for (int q = 0; q < kCluster; ++q)
        if (totals[q] > 0.0f) owner = q;
    }
    if (owner >= 0) {
      writer = owner;
      token = -1;
    }
    if (owner == rank) {
      const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
      const float start = offset + before;
      int found = start + local > target ? first_past(x, lo_j, hi_j, thr, start, target, begin) : 0x7fffffff;
      found = __reduce_min_sync(kFull, found);  // every lane of every warp: the block's first, its last kept
      int kept = __reduce_max_sync(kFull, last_kept);
      if (lane == 0) sh.pick[warp] = make_int2(found, kept);
      __syncthreads();
      const int2 w = lane < kClusterWarps ? sh.pick[lane] : make_int2(0x7fffffff, -1);
      found = __reduce_min_sync(kFull, w.x);
      kept = __reduce_max_sync(kFull, w.y);
      token = found != 0x7fffffff ? found : kept;  // kept >= 0: the block's kept mass is > 0
    }
#else
    const float start = offset + before;
    int found = start + local > target ? first_past(x, lo_j, hi_j, thr, start, target, begin) : 0x7fffffff;
    const float4 pick = cluster_reduce(make_float4(__int_as_float(found), __int_as_float(last_kept), 0.0f, 0.0f),
                                       make_float4(__int_as_float(0x7fffffff), __int_as_float(-1), 0.0f, 0.0f),
                                       PickOp{}, sh, phase);
    found = __float_as_int(pick.x);
    if (found == 0x7fffffff) found = __float_as_int(pick.y);  // rounding: the last kept
    if (found >= 0) token = found;
#endif
    LMFORGE_PROF(clock.mark(kProfDraw));
#if LMFORGE_TOPK_GATHER
    }
#endif
  }
  // every remote read of this block's slots is before this arrival; the wait at the end keeps the
  // block (and its shared memory) alive until every block of the cluster has arrived
  cluster.barrier_arrive();

  // 5. the state the next step reads, the block's slice; the writer (rank 0, or the owner draw's block)
  // writes the row's id and step
  for (int j = threadIdx.x; j < n; j += kClusterThreads) {
    const bool hit = begin + j == token;
    seen_out[base + j] = seen[base + j] || hit;
    counts_out[base + j] = counts[base + j] + (hit ? 1.0f : 0.0f);
  }
  if (rank == writer && threadIdx.x == 0) {
    next_ids[row] = token;
    step_out[row] = step[row] + 1;
  }
  LMFORGE_PROF(clock.mark(kProfState));
  cluster.barrier_wait();
  LMFORGE_PROF(clock.mark(kProfExit));
  LMFORGE_PROF(clock.end());
#endif  // LMFORGE_CLUSTER_DEVICE
}

// -- the onnxruntime custom op ---------------------------------------------------------------------

constexpr size_t kInputs = 15;
constexpr size_t kOutputs = 4;

// LMFORGE_KERNELS_TRACE=1: a line on stderr at each stage of a call, and the stream synchronized
// after the launch (so a call that does not return names its stage). Never under graph capture.
bool tracing() {
  static const bool on = std::getenv("LMFORGE_KERNELS_TRACE") != nullptr;
  return on;
}

void trace(const char* what, const void* pointer = nullptr) {
  if (tracing()) {
    std::fprintf(stderr, "lmforge FusedSample: %s %p\n", what, pointer);
    std::fflush(stderr);
  }
}

void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    ORT_CXX_API_THROW(std::string("lmforge FusedSample: ") + what + ": " + cudaGetErrorString(status), ORT_FAIL);
}

template <typename U>
const U* input(Ort::KernelContext& ctx, size_t index) {
  return ctx.GetInput(index).GetTensorData<U>();
}

template <typename U>
U* output(Ort::UnownedValue& value) {
  return value.GetTensorMutableData<U>();
}

// More than 48 KB of dynamic shared memory needs the limit raised once per kernel, and to no more
// than the GPU's opt-in limit less the kernel's static shared memory (227 KB on sm_90, 163 KB on
// sm_80, 99 KB on sm_89): a row that does not fit works in global memory instead. Returns the
// bytes a launch may use (at most kMaxSharedBytes), for the current device.
int64_t raise_shared_limit() {
  int device = 0, optin = 0;
  check_cuda(cudaGetDevice(&device), "current device");
  check_cuda(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
             "shared-memory opt-in limit");
  cudaFuncAttributes f32{}, f16{};
  check_cuda(cudaFuncGetAttributes(&f32, fused_sample<float>), "kernel attributes");
  check_cuda(cudaFuncGetAttributes(&f16, fused_sample<__half>), "kernel attributes");
  const int64_t fixed = static_cast<int64_t>(f32.sharedSizeBytes > f16.sharedSizeBytes ? f32.sharedSizeBytes
                                                                                      : f16.sharedSizeBytes);
  int64_t limit = static_cast<int64_t>(optin) - fixed;
  if (limit > kMaxSharedBytes) limit = kMaxSharedBytes;
  if (limit < 0) limit = 0;
  check_cuda(cudaFuncSetAttribute(fused_sample<float>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(limit)),
             "shared-memory limit");
  check_cuda(cudaFuncSetAttribute(fused_sample<__half>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(limit)),
             "shared-memory limit");
  return limit;
}

// The op's device pointers, as the kernels take them (also what selftest.cu fills in).
template <typename T>
struct SampleArgs {
  const T* logits;
  int vocab;
  const float *temperature;
  const int64_t* top_k;
  const float *top_p, *min_p, *repetition, *presence, *frequency;
  const int64_t* min_new;
  const bool* stop_mask;
  const float* uniforms;
  int steps;
  const int64_t* last_step;
  const bool* seen;
  const float* counts;
  const int64_t* step;
  int64_t* next_ids;
  bool* seen_out;
  float* counts_out;
  int64_t* step_out;
};

// The single-block kernel, one block a row (the row in shared memory when it fits in shared_limit).
template <typename T>
cudaError_t launch_single(const SampleArgs<T>& a, int64_t batch, int64_t shared_limit, cudaStream_t stream) {
  const bool cached = a.vocab * static_cast<int64_t>(sizeof(float)) <= shared_limit;
  const size_t shared = cached ? static_cast<size_t>(a.vocab) * sizeof(float) : 0;
  fused_sample<T><<<static_cast<unsigned>(batch), kThreads, shared, stream>>>(
      a.logits, a.vocab, a.temperature, a.top_k, a.top_p, a.min_p, a.repetition, a.presence, a.frequency,
      a.min_new, a.stop_mask, a.uniforms, a.steps, a.last_step, a.seen, a.counts, a.step, a.next_ids, a.seen_out,
      a.counts_out, a.step_out, cached);
  return cudaGetLastError();
}

// Dynamic shared memory of a cluster block: its slice of the row.
int64_t cluster_bytes(int64_t vocab) {
  return (vocab + kCluster - 1) / kCluster * static_cast<int64_t>(sizeof(float));
}

// A launch of the cluster kernel over `rows` rows (kCluster blocks each, `shared` bytes of dynamic shared
// memory a block) on `stream`; *attribute holds its cluster dimension and must outlive the config.
cudaLaunchConfig_t cluster_config(unsigned rows, size_t shared, cudaStream_t stream, cudaLaunchAttribute* attribute) {
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(rows * kCluster, 1, 1);
  config.blockDim = dim3(kClusterThreads, 1, 1);
  config.dynamicSmemBytes = shared;
  config.stream = stream;
  attribute->id = cudaLaunchAttributeClusterDimension;
  attribute->val.clusterDim.x = kCluster;
  attribute->val.clusterDim.y = 1;
  attribute->val.clusterDim.z = 1;
  config.attrs = attribute;
  config.numAttrs = 1;
  return config;
}

// The cluster kernel, kCluster blocks a row (only where enable_cluster said yes and
// cluster_bytes(vocab) is within its limit).
template <typename T>
cudaError_t launch_cluster(const SampleArgs<T>& a, int64_t batch, cudaStream_t stream) {
  cudaLaunchAttribute attribute;
  const cudaLaunchConfig_t config =
      cluster_config(static_cast<unsigned>(batch), static_cast<size_t>(cluster_bytes(a.vocab)), stream, &attribute);
  return cudaLaunchKernelEx(&config, fused_sample_cluster<T>, a.logits, a.vocab, a.temperature, a.top_k, a.top_p,
                            a.min_p, a.repetition, a.presence, a.frequency, a.min_new, a.stop_mask, a.uniforms,
                            a.steps, a.last_step, a.seen, a.counts, a.step, a.next_ids, a.seen_out, a.counts_out,
                            a.step_out);
}

// Whether the cluster kernel serves, decided once a kernel object (the op's, in each session):
// off under LMFORGE_KERNELS_CLUSTER=0, below compute capability 9.0, for a library built for an
// older architecture, or when no cluster of kCluster such blocks can be resident. Returns the
// dynamic shared memory a cluster block may use (0: off, and *why says why); raises the kernels'
// limit to it. Never throws: any failure leaves the single-block kernel.
int64_t enable_cluster(const char** why) {
  const char* setting = std::getenv("LMFORGE_KERNELS_CLUSTER");
  if (setting != nullptr && (std::strcmp(setting, "0") == 0 || std::strcmp(setting, "off") == 0 ||
                             std::strcmp(setting, "false") == 0 || std::strcmp(setting, "no") == 0)) {
    *why = "off: LMFORGE_KERNELS_CLUSTER=0";
    return 0;
  }
  int device = 0, major = 0, optin = 0;
  cudaFuncAttributes f32{}, f16{};
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess ||
      cudaFuncGetAttributes(&f32, fused_sample_cluster<float>) != cudaSuccess ||
      cudaFuncGetAttributes(&f16, fused_sample_cluster<__half>) != cudaSuccess) {
    cudaGetLastError();
    *why = "off: the device or kernel attributes could not be read";
    return 0;
  }
  if (major < 9) {
    *why = "off: compute capability below 9.0";
    return 0;
  }
  if (f32.binaryVersion < 90 || f16.binaryVersion < 90) {
    *why = "off: the library is built for an architecture below sm_90";
    return 0;
  }
  const int64_t fixed = static_cast<int64_t>(f32.sharedSizeBytes > f16.sharedSizeBytes ? f32.sharedSizeBytes
                                                                                      : f16.sharedSizeBytes);
  int64_t limit = static_cast<int64_t>(optin) - fixed;
  if (limit > kMaxSharedBytes) limit = kMaxSharedBytes;
  if (limit < static_cast<int64_t>(sizeof(float))) {
    *why = "off: no shared memory for a slice";
    return 0;
  }
  cudaLaunchAttribute attribute;
  const cudaLaunchConfig_t config = cluster_config(1, static_cast<size_t>(limit), nullptr, &attribute);
  int clusters32 = 0, clusters16 = 0;
  if (cudaFuncSetAttribute(fused_sample_cluster<float>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(limit)) != cudaSuccess ||
      cudaFuncSetAttribute(fused_sample_cluster<__half>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(limit)) != cudaSuccess ||
      cudaOccupancyMaxActiveClusters(&clusters32, fused_sample_cluster<float>, &config) != cudaSuccess ||
      cudaOccupancyMaxActiveClusters(&clusters16, fused_sample_cluster<__half>, &config) != cudaSuccess) {
    cudaGetLastError();
    *why = "off: a cluster launch cannot be configured on this device";
    return 0;
  }
  if (clusters32 < 1 || clusters16 < 1) {
    *why = "off: no cluster of this size fits on this device";
    return 0;
  }
  *why = "on";
  return limit;
}

template <typename T>
void launch(Ort::KernelContext& ctx, int64_t batch, int64_t vocab, int64_t steps, int64_t shared_limit,
            int64_t cluster_limit, cudaStream_t stream) {
  std::vector<int64_t> ids_shape{batch, 1}, row_shape{batch, vocab}, one{batch};
  auto next_ids = ctx.GetOutput(0, ids_shape);
  auto seen_out = ctx.GetOutput(1, row_shape);
  auto counts_out = ctx.GetOutput(2, row_shape);
  auto step_out = ctx.GetOutput(3, one);
  trace("outputs allocated, stream", stream);
  if (batch == 0) return;
  const SampleArgs<T> args{input<T>(ctx, 0), static_cast<int>(vocab), input<float>(ctx, 1),
                           input<int64_t>(ctx, 2), input<float>(ctx, 3), input<float>(ctx, 4),
                           input<float>(ctx, 5), input<float>(ctx, 6), input<float>(ctx, 7),
                           input<int64_t>(ctx, 8), input<bool>(ctx, 9), input<float>(ctx, 10),
                           static_cast<int>(steps), input<int64_t>(ctx, 11), input<bool>(ctx, 12),
                           input<float>(ctx, 13), input<int64_t>(ctx, 14), output<int64_t>(next_ids),
                           output<bool>(seen_out), output<float>(counts_out), output<int64_t>(step_out)};
  const bool cluster = cluster_limit > 0 && cluster_bytes(vocab) <= cluster_limit;
  const cudaError_t launched = cluster ? launch_cluster(args, batch, stream)
                                       : launch_single(args, batch, shared_limit, stream);
  trace(cluster ? "launched (cluster kernel)" : "launched (single-block kernel)");
  check_cuda(launched, "kernel launch");
  if (tracing()) {
    check_cuda(cudaStreamSynchronize(stream), "stream synchronize (trace)");
    trace("kernel done");
  }
}

struct FusedSampleKernel {
  FusedSampleKernel() : shared_limit_(raise_shared_limit()) {
    const char* why = "";
    cluster_limit_ = enable_cluster(&why);
    if (tracing()) {
      std::fprintf(stderr, "lmforge FusedSample: cluster kernel %s\n", why);
      std::fflush(stderr);
    }
  }

  int64_t shared_limit_ = 0;   // bytes of dynamic shared memory a launch may use (the cached row)
  int64_t cluster_limit_ = 0;  // the same for a cluster block (its slice); 0: the cluster kernel is off

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    try {
      Compute(context);
    } catch (const std::exception& e) {
      return Ort::GetApi().CreateStatus(ORT_RUNTIME_EXCEPTION, e.what());
    }
    return nullptr;
  }

  void Compute(OrtKernelContext* context) {
    trace("compute entered");
    Ort::KernelContext ctx(context);
    auto logits = ctx.GetInput(0);
    auto info = logits.GetTensorTypeAndShapeInfo();
    const auto shape = info.GetShape();
    const auto uniform_shape = ctx.GetInput(10).GetTensorTypeAndShapeInfo().GetShape();
    if (shape.size() != 2 || uniform_shape.size() != 2 || uniform_shape[0] != shape[0])
      ORT_CXX_API_THROW("lmforge FusedSample: logits must be [batch, vocab] and uniforms [batch, steps]",
                        ORT_INVALID_ARGUMENT);
    if (shape[1] < 1 || shape[1] > 0x7fffffff / 2 || uniform_shape[1] < 1)
      ORT_CXX_API_THROW("lmforge FusedSample: empty or oversized vocabulary or uniforms", ORT_INVALID_ARGUMENT);
    auto stream = static_cast<cudaStream_t>(ctx.GetGPUComputeStream());
    switch (info.GetElementType()) {
      case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT:
        launch<float>(ctx, shape[0], shape[1], uniform_shape[1], shared_limit_, cluster_limit_, stream);
        break;
      case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16:
        launch<__half>(ctx, shape[0], shape[1], uniform_shape[1], shared_limit_, cluster_limit_, stream);
        break;
      default:
        ORT_CXX_API_THROW("lmforge FusedSample: logits must be float16 or float32", ORT_INVALID_ARGUMENT);
    }
  }
};

struct FusedSampleOp : Ort::CustomOpBase<FusedSampleOp, FusedSampleKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* /*info*/, void** kernel) const {
    try {
      *kernel = new FusedSampleKernel();
    } catch (const std::exception& e) {
      return api.CreateStatus(ORT_FAIL, e.what());
    }
    return nullptr;
  }
  const char* GetName() const { return "FusedSample"; }
  const char* GetExecutionProviderType() const { return "CUDAExecutionProvider"; }
  size_t GetInputTypeCount() const { return kInputs; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    switch (index) {
      case 0:
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;  // float16 or float32
      case 2:
      case 8:
      case 11:
      case 14:
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
      case 9:
      case 12:
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL;
      default:
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    }
  }
  size_t GetOutputTypeCount() const { return kOutputs; }
  ONNXTensorElementDataType GetOutputType(size_t index) const {
    switch (index) {
      case 1:
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL;
      case 2:
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
      default:
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
    }
  }
};

std::mutex domains_mutex;
std::vector<Ort::CustomOpDomain>& domains() {  // alive as long as the process (one per session)
  static std::vector<Ort::CustomOpDomain> held;
  return held;
}

}  // namespace

const OrtCustomOp* lmforge_silu_mul_op();  // silu_mul.cu

extern "C" {

// The library's interface version, bumped when an op is added or its inputs/outputs change: 1 FusedSample,
// 2 FusedSample and SiluMul (runtime.kernels.library_version reads it before swapping in an op).
__attribute__((visibility("default"))) int lmforge_kernels_version() { return 2; }

// LMFORGE_PROFILE builds: copies up to n of the cluster kernel's profile counters (ProfileSlot order) into
// out and zeroes them, after a device synchronize; returns how many were copied, 0 for a build
// without the switch, -1 on a CUDA error.
__attribute__((visibility("default"))) int lmforge_profile_read(unsigned long long* out, int n) {
#if LMFORGE_PROFILE
  if (n > kProfSlots) n = kProfSlots;
  if (n < 0) n = 0;
  unsigned long long zero[kProfSlots] = {};
  if (cudaDeviceSynchronize() != cudaSuccess ||
      cudaMemcpyFromSymbol(out, g_profile, sizeof(unsigned long long) * n) != cudaSuccess ||
      cudaMemcpyToSymbol(g_profile, zero, sizeof(zero)) != cudaSuccess)
    return -1;
  return n;
#else
  (void)out;
  (void)n;
  return 0;
#endif
}

__attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                               const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) return nullptr;  // an onnxruntime older than these headers: nothing registered
  Ort::InitApi(api);
  static const FusedSampleOp fused_sample_op;
  try {
    Ort::CustomOpDomain domain{"lmforge"};
    domain.Add(&fused_sample_op);
    domain.Add(lmforge_silu_mul_op());
    Ort::UnownedSessionOptions session_options(options);
    session_options.Add(domain);
    std::lock_guard<std::mutex> lock(domains_mutex);
    domains().push_back(std::move(domain));
  } catch (const Ort::Exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}

}  // extern "C"
