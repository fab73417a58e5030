// lmforge::FusedSample: the step model's sampling block as one CUDA kernel (one thread block a row).
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
// Built by runtime/kernels/build.py; headers of onnxruntime's C/C++ API in include/ (MIT).

#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
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

template <typename T>
void launch(Ort::KernelContext& ctx, int64_t batch, int64_t vocab, int64_t steps, int64_t shared_limit,
            cudaStream_t stream) {
  std::vector<int64_t> ids_shape{batch, 1}, row_shape{batch, vocab}, one{batch};
  auto next_ids = ctx.GetOutput(0, ids_shape);
  auto seen_out = ctx.GetOutput(1, row_shape);
  auto counts_out = ctx.GetOutput(2, row_shape);
  auto step_out = ctx.GetOutput(3, one);
  trace("outputs allocated, stream", stream);
  if (batch == 0) return;
  const bool cached = vocab * static_cast<int64_t>(sizeof(float)) <= shared_limit;
  const size_t shared = cached ? static_cast<size_t>(vocab) * sizeof(float) : 0;
  fused_sample<T><<<static_cast<unsigned>(batch), kThreads, shared, stream>>>(
      input<T>(ctx, 0), static_cast<int>(vocab), input<float>(ctx, 1),
      input<int64_t>(ctx, 2), input<float>(ctx, 3), input<float>(ctx, 4),
      input<float>(ctx, 5), input<float>(ctx, 6), input<float>(ctx, 7),
      input<int64_t>(ctx, 8), input<bool>(ctx, 9), input<float>(ctx, 10),
      static_cast<int>(steps), input<int64_t>(ctx, 11), input<bool>(ctx, 12),
      input<float>(ctx, 13), input<int64_t>(ctx, 14), output<int64_t>(next_ids),
      output<bool>(seen_out), output<float>(counts_out),
      output<int64_t>(step_out), cached);
  trace("launched");
  check_cuda(cudaGetLastError(), "kernel launch");
  if (tracing()) {
    check_cuda(cudaStreamSynchronize(stream), "stream synchronize (trace)");
    trace("kernel done");
  }
}

struct FusedSampleKernel {
  FusedSampleKernel() : shared_limit_(raise_shared_limit()) {}

  int64_t shared_limit_ = 0;  // bytes of dynamic shared memory a launch may use (the cached row)

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
        launch<float>(ctx, shape[0], shape[1], uniform_shape[1], shared_limit_, stream);
        break;
      case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16:
        launch<__half>(ctx, shape[0], shape[1], uniform_shape[1], shared_limit_, stream);
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

extern "C" {

// What build.py and the loader check: the op's interface version (bumped with its inputs/outputs).
__attribute__((visibility("default"))) int lmforge_kernels_version() { return 1; }

__attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                               const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) return nullptr;  // an onnxruntime older than these headers: nothing registered
  Ort::InitApi(api);
  static const FusedSampleOp fused_sample_op;
  try {
    Ort::CustomOpDomain domain{"lmforge"};
    domain.Add(&fused_sample_op);
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
