// lmforge::SiluMul: a SwiGLU gate over a fused gate|up projection, one kernel launch.
//
//   input  0  h [..., 2I] float16 or float32 (the gate's I columns, then the up projection's I)
//   output 0  y [..., I], the input's type:  y = silu(h[..., :I]) * h[..., I:],  silu(a) = a / (1 + e^-a)
//
// Replaces Split -> Sigmoid -> Mul -> Mul (runtime/kernels/graph.py, fuse_silu_gates), which
// onnxruntime runs as three or four small kernels a layer (its optimizer fuses Sigmoid + Mul into
// QuickGelu). The arithmetic is float32 whatever the storage type, rounded once to the output type
// (the unfused fp16 graph rounds after the sigmoid, the silu and the product). Each thread reads 8
// elements of each half with 16-byte loads when I is a multiple of 8 (16 bytes is 8 halves or 4
// floats, so float32 takes two loads), else one element at a time. Nothing is allocated, nothing
// is launched but the kernel, on the stream onnxruntime gives the op: a captured CUDA graph holds it.
//
// Registered with FusedSample's domain by sampling.cu's RegisterCustomOps (lmforge_silu_mul_op).

#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

namespace {

constexpr int kSiluThreads = 256;
constexpr int kVector = 8;  // elements of each half a thread handles on the vector path

__device__ __forceinline__ float as_float(float v) { return v; }
__device__ __forceinline__ float as_float(__half v) { return __half2float(v); }
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

__device__ __forceinline__ float silu_times(float gate, float up) { return gate / (1.0f + expf(-gate)) * up; }

// One element of each half a thread: any I.
template <typename T>
__global__ void silu_mul_scalar(const T* __restrict__ h, T* __restrict__ y, int64_t rows, int64_t inner) {
  const int64_t total = rows * inner;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = e / inner, col = e - row * inner;
    const T* src = h + row * 2 * inner;
    y[e] = from_float<T>(silu_times(as_float(src[col]), as_float(src[inner + col])));
  }
}

// kVector elements of each half a thread, 16-byte loads and stores: I % kVector == 0.
template <typename T>
__global__ void silu_mul_vector(const T* __restrict__ h, T* __restrict__ y, int64_t rows, int64_t inner) {
  constexpr int kLoads = kVector * sizeof(T) / sizeof(uint4);
  const int64_t groups = rows * (inner / kVector);
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < groups;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = g * kVector, row = e / inner, col = e - row * inner;
    const T* src = h + row * 2 * inner + col;
    union Pack {
      uint4 raw[kLoads];
      T v[kVector];
    } gate, up, out;
#pragma unroll
    for (int i = 0; i < kLoads; ++i) {
      gate.raw[i] = reinterpret_cast<const uint4*>(src)[i];
      up.raw[i] = reinterpret_cast<const uint4*>(src + inner)[i];
    }
#pragma unroll
    for (int i = 0; i < kVector; ++i) out.v[i] = from_float<T>(silu_times(as_float(gate.v[i]), as_float(up.v[i])));
#pragma unroll
    for (int i = 0; i < kLoads; ++i) reinterpret_cast<uint4*>(y + e)[i] = out.raw[i];
  }
}

// The grid's bound: 16 blocks of kSiluThreads an SM (the loops stride past it).
int blocks_cap() {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms < 1)
    sms = 1;
  return sms * 16;
}

template <typename T>
void launch_silu_mul(const T* h, T* y, int64_t rows, int64_t inner, int blocks_cap, cudaStream_t stream) {
  // 16-byte alignment of every row's halves: the base pointers (onnxruntime allocates aligned)
  // and I elements a multiple of kVector keep each vector load aligned.
  const bool vector = inner % kVector == 0 && reinterpret_cast<uintptr_t>(h) % 16 == 0 &&
                      reinterpret_cast<uintptr_t>(y) % 16 == 0;
  const int64_t work = vector ? rows * (inner / kVector) : rows * inner;
  const int64_t wanted = (work + kSiluThreads - 1) / kSiluThreads;
  const int blocks = static_cast<int>(wanted < 1 ? 1 : (wanted < blocks_cap ? wanted : blocks_cap));
  if (vector)
    silu_mul_vector<T><<<blocks, kSiluThreads, 0, stream>>>(h, y, rows, inner);
  else
    silu_mul_scalar<T><<<blocks, kSiluThreads, 0, stream>>>(h, y, rows, inner);
}

struct SiluMulKernel {
  SiluMulKernel() : blocks_cap_(blocks_cap()) {}
  int blocks_cap_;

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    try {
      Compute(context);
    } catch (const std::exception& e) {
      return Ort::GetApi().CreateStatus(ORT_RUNTIME_EXCEPTION, e.what());
    }
    return nullptr;
  }

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    auto h = ctx.GetInput(0);
    auto info = h.GetTensorTypeAndShapeInfo();
    auto shape = info.GetShape();
    if (shape.empty() || shape.back() % 2 != 0)
      ORT_CXX_API_THROW("lmforge SiluMul: the input's last axis must hold the gate and up halves (an even size)",
                        ORT_INVALID_ARGUMENT);
    const int64_t inner = shape.back() / 2;
    int64_t rows = 1;
    for (size_t i = 0; i + 1 < shape.size(); ++i) rows *= shape[i];
    shape.back() = inner;
    auto y = ctx.GetOutput(0, shape);
    if (rows == 0 || inner == 0) return;
    auto stream = static_cast<cudaStream_t>(ctx.GetGPUComputeStream());
    switch (info.GetElementType()) {
      case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT:
        launch_silu_mul<float>(h.GetTensorData<float>(), y.GetTensorMutableData<float>(), rows, inner, blocks_cap_,
                               stream);
        break;
      case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16:
        launch_silu_mul<__half>(h.GetTensorData<__half>(), y.GetTensorMutableData<__half>(), rows, inner,
                                blocks_cap_, stream);
        break;
      default:
        ORT_CXX_API_THROW("lmforge SiluMul: the input must be float16 or float32", ORT_INVALID_ARGUMENT);
    }
    const cudaError_t status = cudaGetLastError();
    if (status != cudaSuccess)
      ORT_CXX_API_THROW(std::string("lmforge SiluMul: launch failed: ") + cudaGetErrorString(status), ORT_FAIL);
  }
};

struct SiluMulOp : Ort::CustomOpBase<SiluMulOp, SiluMulKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* /*info*/, void** kernel) const {
    try {
      *kernel = new SiluMulKernel();
    } catch (const std::exception& e) {
      return api.CreateStatus(ORT_FAIL, e.what());
    }
    return nullptr;
  }
  const char* GetName() const { return "SiluMul"; }
  const char* GetExecutionProviderType() const { return "CUDAExecutionProvider"; }
  size_t GetInputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetInputType(size_t /*index*/) const {
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;  // float16 or float32; the output takes its type
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t /*index*/) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED; }
};

}  // namespace

// The op, for sampling.cu's RegisterCustomOps (one static instance for the process).
const OrtCustomOp* lmforge_silu_mul_op() {
  static const SiluMulOp op;
  return &op;
}
