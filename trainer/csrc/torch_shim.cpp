// What tch 0.24 does not expose, as a small C ABI over libtorch:
// bf16 autocast (tch's autocast is fp16 only), TF32 switches, cuDNN deterministic/benchmark flags,
// version queries, the CUDA caching allocator's memory statistics, setting a parameter's .grad
// and the fused AdamW kernel. Tensors arrive as tch's handles, which are at::Tensor pointers. Built by trainer/build.rs against the wheel's headers, C++17, CXX11 ABI.
#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_fused_adamw.h>
#include <ATen/autocast_mode.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/core/CachingDeviceAllocator.h>
#include <torch/csrc/autograd/profiler_kineto.h>
#include <torch/headeronly/version.h>

#include <cstring>
#include <fstream>

extern "C" {

const char* segtrain_torch_version() { return TORCH_VERSION; }

// cuDNN version libtorch was built with and is running (e.g. 91900), or -1 without CUDA.
long segtrain_cudnn_version() {
  try {
    if (!at::detail::getCUDAHooks().hasCuDNN()) return -1;
    return at::detail::getCUDAHooks().versionRuntimeCuDNN();
  } catch (...) {
    return -1;
  }
}

// TF32 in cuBLAS matmuls and cuDNN convolutions (fp32 precision mode only).
void segtrain_set_tf32(bool on) {
  at::globalContext().setAllowTF32CuBLAS(on);
  at::globalContext().setAllowTF32CuDNN(on);
}

void segtrain_set_cudnn_flags(bool deterministic, bool benchmark) {
  at::globalContext().setDeterministicCuDNN(deterministic);
  at::globalContext().setBenchmarkCuDNN(benchmark);
}

// Autocast state is thread-local. Enter returns the previous enabled flag for exit to restore.
bool segtrain_autocast_bf16_enter() {
  bool prev = at::autocast::is_autocast_enabled(at::kCUDA);
  at::autocast::set_autocast_dtype(at::kCUDA, at::kBFloat16);
  at::autocast::set_autocast_enabled(at::kCUDA, true);
  at::autocast::increment_nesting();
  return prev;
}

void segtrain_autocast_exit(bool prev) {
  // Cached casts of weights are only valid inside one autocast region.
  if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
  at::autocast::set_autocast_enabled(at::kCUDA, prev);
}

bool segtrain_autocast_enabled() { return at::autocast::is_autocast_enabled(at::kCUDA); }

bool segtrain_autocast_is_bf16() {
  return at::autocast::get_autocast_dtype(at::kCUDA) == at::kBFloat16;
}

// The CUDA caching allocator's statistics for one device, in bytes: allocated now, peak allocated,
// reserved now (what the process holds from the driver, cached blocks included), peak reserved.
// Returns false (and writes nothing) when there is no CUDA allocator or it is not initialised.
bool segtrain_cuda_memory(int device, int64_t* allocated, int64_t* peak_allocated,
                          int64_t* reserved, int64_t* peak_reserved) {
  try {
    c10::DeviceAllocator* a = c10::getDeviceAllocator(c10::DeviceType::CUDA);
    if (a == nullptr || !a->initialized()) return false;
    auto stats = a->getDeviceStats(static_cast<c10::DeviceIndex>(device));
    const auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    *allocated = stats.allocated_bytes[all].current;
    *peak_allocated = stats.allocated_bytes[all].peak;
    *reserved = stats.reserved_bytes[all].current;
    *peak_reserved = stats.reserved_bytes[all].peak;
    return true;
  } catch (...) {
    return false;
  }
}

// Current values of the switches above, so callers and tests can see what is in force.
bool segtrain_tf32_cublas() { return at::globalContext().allowTF32CuBLAS(); }
bool segtrain_tf32_cudnn() { return at::globalContext().allowTF32CuDNN(); }
bool segtrain_cudnn_deterministic() { return at::globalContext().deterministicCuDNN(); }
bool segtrain_cudnn_benchmark() { return at::globalContext().benchmarkCuDNN(); }

// Makes `grad` the .grad of `var` (same shape, dtype and device: the caller checks). Autograd then
// accumulates into it in place, so a view of a flat buffer stays one.
void segtrain_set_grad(at::Tensor* var, const at::Tensor* grad) { var->mutable_grad() = *grad; }

static void copy_error(const std::exception& e, char* err, size_t len) {
  if (len == 0) return;
  std::strncpy(err, e.what(), len - 1);
  err[len - 1] = '\0';
}

// One AdamW update of one tensor with torch.optim.AdamW(fused=True)'s kernel: decoupled weight
// decay, bias-corrected moments, `step` a float tensor on the same device holding the update's
// number (read by the kernel, not incremented). Returns false and the message on error.
bool segtrain_fused_adamw(at::Tensor* param, const at::Tensor* grad, at::Tensor* exp_avg,
                          at::Tensor* exp_avg_sq, const at::Tensor* step, double lr, double beta1,
                          double beta2, double weight_decay, double eps, char* err, size_t len) {
  try {
    at::_fused_adamw_({*param}, {*grad}, {*exp_avg}, {*exp_avg_sq}, {}, {*step}, lr, beta1, beta2,
                      weight_decay, eps, /*amsgrad=*/false, /*maximize=*/false);
    return true;
  } catch (const std::exception& e) {
    copy_error(e, err, len);
    return false;
  }
}

// The Kineto profiler (what torch.profiler runs): CPU operators of the calling thread and, with
// `cuda`, every CUDA kernel and copy (through CUPTI). Returns false and the message on error.
bool segtrain_profile_start(bool cuda, char* err, size_t len) {
  try {
    using torch::profiler::impl::ActivityType;
    torch::profiler::impl::ProfilerConfig config(torch::profiler::impl::ProfilerState::KINETO);
    std::set<ActivityType> activities{ActivityType::CPU};
    if (cuda) activities.insert(ActivityType::CUDA);
    torch::autograd::profiler::prepareProfiler(config, activities);
    torch::autograd::profiler::enableProfiler(config, activities);
    return true;
  } catch (const std::exception& e) {
    copy_error(e, err, len);
    return false;
  }
}

// Stops the profiler; writes the Chrome trace to `trace` (when not empty) and one line per event
// to `events`: device ("cpu"/"cuda"), duration in ns, name, tab-separated.
bool segtrain_profile_stop(const char* trace, const char* events, char* err, size_t len) {
  try {
    auto result = torch::autograd::profiler::disableProfiler();
    if (!result) throw std::runtime_error("the profiler was not running");
    std::ofstream out(events);
    if (!out) throw std::runtime_error(std::string("cannot write ") + events);
    for (const auto& e : result->events()) {
      const char* device = e.deviceType() == c10::DeviceType::CUDA ? "cuda" : "cpu";
      std::string name = e.name();
      for (auto& c : name)
        if (c == '\t' || c == '\n') c = ' ';
      out << device << '\t' << e.durationNs() << '\t' << name << '\n';
    }
    if (!out) throw std::runtime_error(std::string("cannot write ") + events);
    if (trace != nullptr && trace[0] != '\0') result->save(trace);
    return true;
  } catch (const std::exception& e) {
    copy_error(e, err, len);
    return false;
  }
}
}
