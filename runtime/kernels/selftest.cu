// A standalone check of the FusedSample kernels, without onnxruntime: `lmforge kernels selftest`
// (runtime/kernels/build.py run_selftest) compiles this file (it includes sampling.cu) into an
// executable and runs it.
//
// It sets up the kernels as the op does (the single-block kernel's shared-memory limit; the cluster
// kernel where the GPU has clusters, unless LMFORGE_KERNELS_CLUSTER=0), then for fp32 and fp16
// logits, vocabularies from 1 to 128,256 and every sampling case below it launches each kernel on the
// same random rows (64 of them, fixed uniforms) and checks
//   - the state outputs (seen_out, counts_out, step_out) of each kernel exactly against its own token;
//   - greedy rows: the token of both kernels equal to a host argmax of the processed logits;
//   - sampled rows: the first rows' tokens equal to a host reference in double precision, and every
//     row where the two kernels disagree explained by summation order (the reference's cumulative
//     mass lies within 1e-4 of the row's mass of the draw's target or of top-p's cut); the count of
//     such rows is printed;
//   - the cluster kernel launched twice: bit-identical outputs;
// and the same for flat rows (fp32 logits of spread 0.5, as a random-weight model gives: many values
// near a top-p cut), printing a line before every launch so that a hang names its stage. Then it
// times each kernel on each case at 1 and 16 rows, vocabularies 49,152 and 128,256 (CUDA events, the
// median of 100 launches after 10), and flat rows at 49,152, and prints summary tables (fp16 logits;
// flat fp32).
// It also prints how many rows' clusters the GPU holds at once, and, in a build with
// -DLMFORGE_PROFILE=1, each timed cluster case's cycles per phase and search rounds (PROFILE lines).

#include "sampling.cu"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <initializer_list>
#include <random>
#include <string>
#include <vector>

namespace {

int64_t g_shared_limit = kMaxSharedBytes;  // the single-block kernel's dynamic shared memory (set in main)
int64_t g_cluster_limit = 0;               // the cluster kernel's (0: off; set in main)
int g_failures = 0;

#define CHECK(call)                                                                              \
  do {                                                                                           \
    cudaError_t e = (call);                                                                      \
    if (e != cudaSuccess) {                                                                      \
      std::printf("FAIL %s:%d %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e));     \
      std::exit(1);                                                                              \
    }                                                                                            \
  } while (0)

struct Case {
  const char* name;
  float temperature;
  int64_t top_k;
  float top_p;
  float min_p;
  float repetition, presence, frequency;
  bool min_new;  // stop ids masked (step < min_new_tokens)
};

const Case kCases[] = {
    {"greedy", 0.0f, 0, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f, false},
    {"temperature 0.7", 0.7f, 0, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f, false},
    {"top-k 50", 1.0f, 50, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f, false},
    {"top-p 0.9", 0.7f, 0, 0.9f, 0.0f, 1.0f, 0.0f, 0.0f, false},
    {"top-k 50 + top-p 0.9", 1.0f, 50, 0.9f, 0.0f, 1.0f, 0.0f, 0.0f, false},
    {"min-p 0.05", 1.0f, 0, 1.0f, 0.05f, 1.0f, 0.0f, 0.0f, false},
    {"greedy + penalties", 0.0f, 0, 1.0f, 0.0f, 1.3f, 0.5f, 0.3f, false},
    {"penalties + top-p 0.9", 0.8f, 0, 0.9f, 0.0f, 1.3f, 0.5f, 0.3f, false},
    {"greedy + min_new_tokens", 0.0f, 0, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f, true},
    {"min_new_tokens + top-p 0.9", 0.7f, 0, 0.9f, 0.0f, 1.0f, 0.0f, 0.0f, true},
};
constexpr int kCaseCount = sizeof(kCases) / sizeof(kCases[0]);
constexpr int kSteps = 4;

template <typename U>
U* upload(const std::vector<U>& host) {
  U* device = nullptr;
  CHECK(cudaMalloc(&device, sizeof(U) * std::max<size_t>(1, host.size())));
  if (!host.empty()) CHECK(cudaMemcpy(device, host.data(), sizeof(U) * host.size(), cudaMemcpyHostToDevice));
  return device;
}

template <typename U>
std::vector<U> download(const U* device, size_t n) {
  std::vector<U> host(n);
  if (n) CHECK(cudaMemcpy(host.data(), device, sizeof(U) * n, cudaMemcpyDeviceToHost));
  return host;
}

// One vocabulary's rows: the logits (as the kernel reads them, and as floats), the state inputs,
// the uniforms and steps; the per-row sampling parameters are set per case.
struct Rows {
  int rows = 0, vocab = 0;
  std::vector<float> logits;  // the logits' values (fp16-rounded for fp16)
  std::vector<uint8_t> stop_mask, seen;
  std::vector<float> counts, uniforms;
  std::vector<int64_t> step, last_step;
};

Rows make_rows(int rows, int vocab, bool half, std::mt19937& rng, float spread = 3.0f) {
  Rows h;
  h.rows = rows;
  h.vocab = vocab;
  const size_t n = static_cast<size_t>(rows) * vocab;
  std::normal_distribution<float> normal(0.0f, spread);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  std::uniform_int_distribution<int> small(0, 63);
  h.logits.resize(n);
  for (auto& v : h.logits) v = half ? __half2float(__float2half(normal(rng))) : normal(rng);
  if (vocab >= 8) {  // ties for the maximum in row 0 (first index wins), a flat row 1
    float* r0 = h.logits.data();
    const float m = *std::max_element(r0, r0 + vocab);
    r0[vocab / 2] = m + 1.0f;
    r0[vocab / 3] = m + 1.0f;
    if (rows > 1) std::fill(h.logits.begin() + vocab, h.logits.begin() + 2 * vocab, -1.5f);
    if (rows > 2)  // a huge negative logit in row 2 (-inf in fp16)
      h.logits[2 * static_cast<size_t>(vocab) + 5] = half ? __half2float(__float2half(-1e30f)) : -1e30f;
  }
  h.stop_mask.resize(n);
  h.seen.resize(n);
  h.counts.resize(n);
  for (size_t i = 0; i < n; ++i) {
    const int a = small(rng);
    h.stop_mask[i] = a == 0;
    h.seen[i] = a < 16;
    h.counts[i] = a < 8 ? static_cast<float>(1 + (a & 3)) : 0.0f;
  }
  for (int r = 0; r < rows; ++r) {  // the row's argmax is a stop id: masking changes the token
    const float* row = h.logits.data() + static_cast<size_t>(r) * vocab;
    h.stop_mask[static_cast<size_t>(r) * vocab + (std::max_element(row, row + vocab) - row)] = 1;
  }
  h.uniforms.resize(static_cast<size_t>(rows) * kSteps);
  for (auto& u : h.uniforms) u = uniform(rng);
  h.step.resize(rows);
  h.last_step.assign(rows, kSteps - 1);
  for (int r = 0; r < rows; ++r) h.step[r] = r % kSteps;
  return h;
}

struct Outputs {
  std::vector<int64_t> ids, step;
  std::vector<uint8_t> seen;
  std::vector<float> counts;
  bool operator==(const Outputs& o) const {
    return ids == o.ids && step == o.step && seen == o.seen &&
           std::equal(counts.begin(), counts.end(), o.counts.begin(), o.counts.end(),
                      [](float a, float b) { return __builtin_memcmp(&a, &b, sizeof(float)) == 0; });
  }
};

// The device copy of a Rows and a case's per-row parameters, and the outputs.
template <typename T>
struct Device {
  int rows, vocab;
  T* logits;
  float *temperature, *top_p, *min_p, *repetition, *presence, *frequency, *uniforms, *counts, *counts_out;
  int64_t *top_k, *min_new, *last_step, *step, *next_ids, *step_out;
  uint8_t *stop_mask, *seen, *seen_out;

  explicit Device(const Rows& h) : rows(h.rows), vocab(h.vocab) {
    std::vector<T> cast(h.logits.size());
    for (size_t i = 0; i < cast.size(); ++i) {
      if constexpr (std::is_same<T, float>::value) {
        cast[i] = h.logits[i];
      } else {
        cast[i] = __float2half(h.logits[i]);
      }
    }
    logits = upload(cast);
    stop_mask = upload(h.stop_mask);
    seen = upload(h.seen);
    counts = upload(h.counts);
    uniforms = upload(h.uniforms);
    step = upload(h.step);
    last_step = upload(h.last_step);
    const std::vector<float> zf(rows, 0.0f);
    const std::vector<int64_t> zi(rows, 0);
    temperature = upload(zf), top_p = upload(zf), min_p = upload(zf), repetition = upload(zf);
    presence = upload(zf), frequency = upload(zf);
    top_k = upload(zi), min_new = upload(zi), next_ids = upload(zi), step_out = upload(zi);
    counts_out = upload(std::vector<float>(h.counts.size()));
    seen_out = upload(std::vector<uint8_t>(h.seen.size()));
  }
  ~Device() {
    for (void* p : {static_cast<void*>(logits), static_cast<void*>(temperature), static_cast<void*>(top_p),
                    static_cast<void*>(min_p), static_cast<void*>(repetition), static_cast<void*>(presence),
                    static_cast<void*>(frequency), static_cast<void*>(uniforms), static_cast<void*>(counts),
                    static_cast<void*>(counts_out), static_cast<void*>(top_k), static_cast<void*>(min_new),
                    static_cast<void*>(last_step), static_cast<void*>(step), static_cast<void*>(next_ids),
                    static_cast<void*>(step_out), static_cast<void*>(stop_mask), static_cast<void*>(seen),
                    static_cast<void*>(seen_out)})
      cudaFree(p);
  }
  Device(const Device&) = delete;
  Device& operator=(const Device&) = delete;

  void set_case(const Case& c) {
    auto fill = [&](float* d, float v) {
      const std::vector<float> h(rows, v);
      CHECK(cudaMemcpy(d, h.data(), sizeof(float) * rows, cudaMemcpyHostToDevice));
    };
    auto fill64 = [&](int64_t* d, int64_t v) {
      const std::vector<int64_t> h(rows, v);
      CHECK(cudaMemcpy(d, h.data(), sizeof(int64_t) * rows, cudaMemcpyHostToDevice));
    };
    fill(temperature, c.temperature), fill(top_p, c.top_p), fill(min_p, c.min_p);
    fill(repetition, c.repetition), fill(presence, c.presence), fill(frequency, c.frequency);
    fill64(top_k, c.top_k), fill64(min_new, c.min_new ? kSteps + 1 : 0);
  }

  SampleArgs<T> args() const {
    return {logits, vocab, temperature, top_k, top_p, min_p, repetition, presence, frequency, min_new,
            reinterpret_cast<const bool*>(stop_mask), uniforms, kSteps, last_step,
            reinterpret_cast<const bool*>(seen), counts, step, next_ids, reinterpret_cast<bool*>(seen_out),
            counts_out, step_out};
  }

  cudaError_t launch(bool cluster, int batch) const {
    return cluster ? launch_cluster(args(), batch, nullptr) : launch_single(args(), batch, g_shared_limit, nullptr);
  }

  Outputs run(bool cluster) {
    CHECK(cudaMemset(next_ids, 0xff, sizeof(int64_t) * rows));  // nothing left from the last launch
    CHECK(cudaMemset(counts_out, 0xff, sizeof(float) * rows * static_cast<size_t>(vocab)));
    CHECK(launch(cluster, rows));
    CHECK(cudaDeviceSynchronize());
    const size_t n = static_cast<size_t>(rows) * vocab;
    return {download(next_ids, rows), download(step_out, rows), download(seen_out, n), download(counts_out, n)};
  }
};

// The host reference of one row: the token (double-precision sums), and whether a summation order
// could change it (the draw's target or top-p's cut within `tolerance` of the row's mass).
struct Reference {
  int64_t token;
  bool near;
};

Reference reference(const Rows& h, const Case& c, int r, double tolerance = 1e-4) {
  const int vocab = h.vocab;
  const size_t base = static_cast<size_t>(r) * vocab;
  const bool early = c.min_new && h.step[r] < kSteps + 1;
  const bool penalized = c.repetition != 1.0f || c.presence != 0.0f || c.frequency != 0.0f;
  std::vector<float> x(vocab);
  int best = 0;
  for (int i = 0; i < vocab; ++i) {  // the same float32 operations as the kernels (no contraction)
    volatile float v = h.logits[base + i];
    if (early && h.stop_mask[base + i]) v = -INFINITY;
    if (penalized) {
      if (h.seen[base + i]) v = v > 0.0f ? v / c.repetition : v * c.repetition;
      const float cnt = h.counts[base + i];
      volatile float f = c.frequency * cnt;
      volatile float p = c.presence * (cnt > 0.0f ? 1.0f : 0.0f);
      volatile float sum = f + p;
      v = v - sum;
    }
    x[i] = v;
    if (x[i] > x[best]) best = i;
  }
  if (!(c.temperature > 0.0f) || c.top_k == 1) return {best, false};
  const float row_max = x[best];
  std::vector<float> s(vocab);
  for (int i = 0; i < vocab; ++i) {
    volatile float d = x[i] - row_max;
    s[i] = d / c.temperature;
  }
  bool near = false;
  float thr_k = -INFINITY;
  if (c.top_k > 0 && c.top_k < vocab) {
    std::vector<float> sorted(s);
    std::nth_element(sorted.begin(), sorted.begin() + (c.top_k - 1), sorted.end(), std::greater<float>());
    thr_k = sorted[c.top_k - 1];
  }
  float thr_p = -INFINITY;
  if (c.top_p < 1.0f) {
    std::vector<float> kept;
    for (float v : s)
      if (v >= thr_k) kept.push_back(v);
    std::sort(kept.begin(), kept.end(), std::greater<float>());
    double mass = 0.0;
    for (float v : kept) mass += std::exp(static_cast<double>(v));
    const double target = static_cast<double>(c.top_p) * mass;
    double cum = 0.0;
    for (size_t i = 0; i < kept.size(); ++i) {  // by value: ties are kept or cut together
      cum += std::exp(static_cast<double>(kept[i]));
      if (i + 1 < kept.size() && kept[i + 1] == kept[i]) continue;
      if (std::fabs(cum - target) <= tolerance * mass) near = true;
      if (cum >= target) {
        thr_p = kept[i];
        break;
      }
    }
    if (thr_p == -INFINITY && !kept.empty()) thr_p = kept.back();
  }
  const float thr_m = c.min_p > 0.0f ? std::log(c.min_p) : -INFINITY;
  const float thr = std::max(std::max(thr_k, thr_p), thr_m);
  if (c.min_p > 0.0f)
    for (float v : s)
      if (std::fabs(v - thr_m) <= 1e-5f) near = true;  // logf may round differently on the host
  double total = 0.0;
  for (float v : s)
    if (v >= thr) total += std::exp(static_cast<double>(v));
  const double target = static_cast<double>(h.uniforms[static_cast<size_t>(r) * kSteps +
                                                       std::min<int64_t>(h.step[r], kSteps - 1)]) * total;
  double cum = 0.0;
  int64_t token = -1;
  for (int i = 0; i < vocab; ++i) {
    if (!(s[i] >= thr)) continue;
    const double w = std::exp(static_cast<double>(s[i]));
    if (std::fabs(cum - target) <= tolerance * total || std::fabs(cum + w - target) <= tolerance * total)
      near = true;
    cum += w;
    if (token < 0 && cum > target) token = i;
  }
  return {token < 0 ? best : token, near};
}

// The state outputs of one kernel against its own tokens.
bool state_ok(const Rows& h, const Outputs& o) {
  for (int r = 0; r < h.rows; ++r) {
    if (o.ids[r] < 0 || o.ids[r] >= h.vocab || o.step[r] != h.step[r] + 1) return false;
    const size_t base = static_cast<size_t>(r) * h.vocab;
    for (int i = 0; i < h.vocab; ++i) {
      const bool hit = i == o.ids[r];
      if (o.seen[base + i] != static_cast<uint8_t>(h.seen[base + i] || hit)) return false;
      if (o.counts[base + i] != h.counts[base + i] + (hit ? 1.0f : 0.0f)) return false;
    }
  }
  return true;
}

void fail(const char* what, const Case& c, int vocab, const char* dtype) {
  std::printf("FAIL %s: %s vocab %d %s\n", what, c.name, vocab, dtype);
  ++g_failures;
}

template <typename T>
void check(const Rows& h, Device<T>& d, const Case& c) {
  const char* dtype = sizeof(T) == 2 ? "fp16" : "fp32";
  d.set_case(c);
  std::printf("  launch single-block %s rows %d vocab %d %s\n", c.name, h.rows, h.vocab, dtype);
  std::fflush(stdout);
  const Outputs single = d.run(false);
  if (!state_ok(h, single)) fail("single-block state outputs", c, h.vocab, dtype);
  Outputs cluster = single;
  const bool clustered = g_cluster_limit > 0 && cluster_bytes(h.vocab) <= g_cluster_limit;
  if (clustered) {
    std::printf("  launch cluster %s rows %d vocab %d %s\n", c.name, h.rows, h.vocab, dtype);
    std::fflush(stdout);
    cluster = d.run(true);
    if (!state_ok(h, cluster)) fail("cluster state outputs", c, h.vocab, dtype);
    std::printf("  launch cluster again %s rows %d vocab %d %s\n", c.name, h.rows, h.vocab, dtype);
    std::fflush(stdout);
    if (!(d.run(true) == cluster)) fail("cluster kernel not bit-identical run to run", c, h.vocab, dtype);
  }
  const bool greedy = !(c.temperature > 0.0f) || c.top_k == 1;
  int differ = 0, explained = 0, off_reference = 0;
  for (int r = 0; r < h.rows; ++r) {
    const bool checked = greedy || r < 4;  // the host reference sorts: the first rows only
    const Reference ref = checked || single.ids[r] != cluster.ids[r] ? reference(h, c, r) : Reference{-1, false};
    if (checked) {
      for (const Outputs* o : std::initializer_list<const Outputs*>{&single, &cluster}) {
        if (o->ids[r] != ref.token && !(ref.near && !greedy)) {
          std::printf("  row %d: %s token %lld, reference %lld\n", r, o == &single ? "single-block" : "cluster",
                      static_cast<long long>(o->ids[r]), static_cast<long long>(ref.token));
          ++off_reference;
        }
      }
    }
    if (single.ids[r] != cluster.ids[r]) {
      ++differ;
      if (!greedy && ref.near) {
        ++explained;
      } else {
        std::printf("  row %d: single-block %lld, cluster %lld (reference %lld)\n", r,
                    static_cast<long long>(single.ids[r]), static_cast<long long>(cluster.ids[r]),
                    static_cast<long long>(ref.token));
      }
    }
  }
  if (off_reference) fail("tokens off the host reference", c, h.vocab, dtype);
  if (differ != explained) fail("the kernels' tokens differ beyond summation order", c, h.vocab, dtype);
  std::printf("CHECK %-27s vocab %6d %s rows %d: %s%d differ (%d explained by summation order)\n", c.name,
              h.vocab, dtype, h.rows, clustered ? "cluster vs single-block, " : "single-block only, ", differ,
              explained);
}

// µs a launch: the median of 100 launches after 10, each between two CUDA events.
template <typename T>
float time_launch(const Device<T>& d, bool cluster, int batch) {
  cudaEvent_t start, stop;
  CHECK(cudaEventCreate(&start));
  CHECK(cudaEventCreate(&stop));
  std::vector<float> ms;
  for (int i = 0; i < 110; ++i) {
    CHECK(cudaEventRecord(start));
    CHECK(d.launch(cluster, batch));
    CHECK(cudaEventRecord(stop));
    CHECK(cudaEventSynchronize(stop));
    float t = 0.0f;
    CHECK(cudaEventElapsedTime(&t, start, stop));
    if (i >= 10) ms.push_back(t);
  }
  CHECK(cudaEventDestroy(start));
  CHECK(cudaEventDestroy(stop));
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2] * 1000.0f;
}

#if LMFORGE_PROFILE
// A cluster timing's profile (LMFORGE_PROFILE builds): a row's mean SM cycles per phase, its wall time,
// the clock they imply and its mean search rounds.
void print_profile(const unsigned long long* p, const char* name, int rows, int vocab, const char* dtype) {
  const double n = p[kProfRows] > 0 ? static_cast<double>(p[kProfRows]) : 1.0;
  const double sampled = p[kProfSampled] > 0 ? static_cast<double>(p[kProfSampled]) : 1.0;
  std::printf("PROFILE %-27s rows %2d vocab %6d %s: cycles a row argmax %.0f stats %.0f top-k %.0f top-p %.0f "
              "draw %.0f state %.0f exit %.0f total %.0f; %.2f us a row at %.0f MHz; rounds top-k %.1f top-p %.1f "
              "(interpolated %.1f); the searches' passes %.0f, reductions %.0f\n",
              name, rows, vocab, dtype, p[kProfArgmax] / n, p[kProfStats] / n, p[kProfTopK] / n, p[kProfTopP] / n,
              p[kProfDraw] / n, p[kProfState] / n, p[kProfExit] / n, p[kProfCycles] / n, p[kProfNanos] / n / 1e3,
              p[kProfNanos] > 0 ? 1e3 * static_cast<double>(p[kProfCycles]) / static_cast<double>(p[kProfNanos]) : 0.0,
              p[kProfRoundsK] / sampled, p[kProfRoundsP] / sampled, p[kProfInterp] / sampled, p[kProfPass] / n,
              p[kProfReduce] / n);
}
#endif

struct Timing {
  float single = 0.0f, cluster = 0.0f;
};

template <typename T>
void time_cases(const Rows& h, Timing (*out)[2]) {
  const char* dtype = sizeof(T) == 2 ? "fp16" : "fp32";
  Device<T> d(h);
  const bool clustered = g_cluster_limit > 0 && cluster_bytes(h.vocab) <= g_cluster_limit;
  for (int ci = 0; ci < kCaseCount; ++ci) {
    const Case& c = kCases[ci];
    d.set_case(c);
    for (int b = 0; b < 2; ++b) {
      const int rows = b == 0 ? 1 : 16;
      std::printf("  launch timing %s rows %d vocab %d %s\n", c.name, rows, h.vocab, dtype);
      std::fflush(stdout);
      Timing t;
      t.single = time_launch(d, false, rows);
#if LMFORGE_PROFILE
      unsigned long long prof[kProfSlots] = {};
      if (clustered) lmforge_profile_read(prof, kProfSlots);  // zeroed
#endif
      if (clustered) t.cluster = time_launch(d, true, rows);
#if LMFORGE_PROFILE
      if (clustered && lmforge_profile_read(prof, kProfSlots) == kProfSlots)
        print_profile(prof, c.name, rows, h.vocab, dtype);
#endif
      out[ci][b] = t;
      if (clustered)
        std::printf("TIME %-27s rows %2d vocab %6d %s: single-block %7.1f us, cluster %6.1f us (%4.1fx)\n",
                    c.name, rows, h.vocab, dtype, t.single, t.cluster, t.single / t.cluster);
      else
        std::printf("TIME %-27s rows %2d vocab %6d %s: single-block %7.1f us\n", c.name, rows, h.vocab, dtype,
                    t.single);
    }
  }
}

}  // namespace

__global__ void empty_kernel(int* out) {
  if (threadIdx.x == 0) *out = 1;
}

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "--quick";  // a few checks, no timing (sanitizers)
  {  // the CUDA runtime and a trivial launch first: a problem here is not the sampling kernel's
    int* flag = nullptr;
    CHECK(cudaMalloc(&flag, sizeof(int)));
    empty_kernel<<<1, 32>>>(flag);
    CHECK(cudaGetLastError());
    CHECK(cudaDeviceSynchronize());
    CHECK(cudaFree(flag));
    std::printf("selftest: a trivial kernel ran\n");
    std::fflush(stdout);
  }
  try {
    g_shared_limit = raise_shared_limit();  // as the op does when onnxruntime creates it
  } catch (const std::exception& e) {
    std::printf("selftest: %s\n", e.what());
    return 1;
  }
  const char* why = "";
  g_cluster_limit = enable_cluster(&why);
  std::printf("selftest: cluster kernel %s (%d blocks of %d threads a row, up to %lld bytes of shared memory a "
              "block); single-block kernel up to %lld bytes\n",
              why, kCluster, kClusterThreads, static_cast<long long>(g_cluster_limit),
              static_cast<long long>(g_shared_limit));
  if (g_cluster_limit > 0) {  // how many rows' clusters the GPU holds at once (vocabulary 49,152)
    int sms = 0, device = 0, clusters = 0;
    cudaLaunchAttribute attribute;
    const cudaLaunchConfig_t config =
        cluster_config(16, static_cast<size_t>(cluster_bytes(49152)), nullptr, &attribute);
    if (cudaGetDevice(&device) == cudaSuccess &&
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) == cudaSuccess &&
        cudaOccupancyMaxActiveClusters(&clusters, fused_sample_cluster<float>, &config) == cudaSuccess)
      std::printf("selftest: %d SMs; at vocabulary 49,152 the GPU holds %d clusters (rows) at once\n", sms, clusters);
    else
      std::printf("selftest: the GPU's cluster occupancy could not be read (%s)\n",
                  cudaGetErrorString(cudaGetLastError()));
  }
  std::fflush(stdout);

  std::mt19937 rng(0);
  const std::vector<int> vocabs = quick ? std::vector<int>{3, 64, 4099} :
                                          std::vector<int>{1, 3, 7, 64, 1000, 4099, 49152, 50257, 128256};
  for (int vocab : vocabs) {
    for (int half = 0; half < 2; ++half) {
      const Rows h = make_rows(quick ? 16 : 64, vocab, half != 0, rng);
      if (half) {
        Device<__half> d(h);
        for (const Case& c : kCases) check(h, d, c);
      } else {
        Device<float> d(h);
        for (const Case& c : kCases) check(h, d, c);
      }
    }
  }
  {  // flat rows: fp32 logits of spread 0.5, as a random-weight model gives (many values near the cut)
    const Rows h = make_rows(quick ? 16 : 64, 49152, false, rng, 0.5f);
    Device<float> d(h);
    for (const Case& c : kCases) check(h, d, c);
  }

  if (quick) {
    std::printf(g_failures ? "SELFTEST FAILED (%d)\n" : "SELFTEST PASSED (quick)\n", g_failures);
    return g_failures ? 1 : 0;
  }
  Timing timing[2][2][kCaseCount][2];  // [vocab][dtype][case][rows 1, 16]
  const int timed[2] = {49152, 128256};
  for (int vi = 0; vi < 2; ++vi) {
    for (int half = 0; half < 2; ++half) {
      const Rows h = make_rows(16, timed[vi], half != 0, rng);
      half ? time_cases<__half>(h, timing[vi][half]) : time_cases<float>(h, timing[vi][half]);
    }
  }
  Timing flat[kCaseCount][2];  // [case][rows 1, 16]: vocab 49,152, fp32 logits of spread 0.5
  time_cases<float>(make_rows(16, 49152, false, rng, 0.5f), flat);
  std::printf("SUMMARY us a launch, fp16 logits, single-block / cluster (1 row | 16 rows):\n");
  for (int vi = 0; vi < 2; ++vi) {
    for (int ci = 0; ci < kCaseCount; ++ci) {
      const Timing* t = timing[vi][1][ci];
      std::printf("  vocab %6d %-27s %6.1f / %5.1f | %6.1f / %5.1f\n", timed[vi], kCases[ci].name, t[0].single,
                  t[0].cluster, t[1].single, t[1].cluster);
    }
  }
  std::printf("SUMMARY us a launch, flat fp32 logits (spread 0.5), single-block / cluster (1 row | 16 rows):\n");
  for (int ci = 0; ci < kCaseCount; ++ci) {
    const Timing* t = flat[ci];
    std::printf("  vocab  49152 %-27s %6.1f / %5.1f | %6.1f / %5.1f\n", kCases[ci].name, t[0].single, t[0].cluster,
                t[1].single, t[1].cluster);
  }
  std::printf(g_failures ? "SELFTEST FAILED (%d)\n" : "SELFTEST PASSED\n", g_failures);
  return g_failures ? 1 : 0;
}
