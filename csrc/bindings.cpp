// The Python binding: raw addresses, sizes, strides and dtype codes in,
// status codes out. Validation, allocation and error messages live in Python
// (pgest/_native.py); nothing here knows about torch.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <initializer_list>
#include <string>

#include <pgest/chunk_pass.h>
#include <pgest/philox.h>
#include <pgest/log_prob.h>
#include <pgest/reinforce_grad.h>
#include <pgest/returns.h>
#include <pgest/sample.h>
#include <pgest/truncation.h>

#include "cpu/dispatch.h"
#ifdef PGEST_WITH_CUDA
#include "cuda/kernels.h"
#endif

namespace py = pybind11;
using namespace pgest;

namespace {

template <class P>
P* as_ptr(uintptr_t address) { return reinterpret_cast<P*>(address); }

py::tuple error_tuple(Status st, const ErrorInfo& e) {
  return py::make_tuple(int(st), e.row, e.col, e.index, e.value);
}

// Every kernel call: release the GIL, run, return (status, row, col, index, value).
template <class Args>
py::tuple run_kernel(Status (*kernel)(const Args&, ErrorInfo*), const Args& args) {
  ErrorInfo err;
  Status st;
  {
    py::gil_scoped_release release;
    st = kernel(args, &err);
  }
  return error_tuple(st, err);
}

void philox_uniform_fill(uint64_t seed, uint64_t offset, int64_t rows, int64_t samples, uintptr_t out) {
  double* o = as_ptr<double>(out);
  py::gil_scoped_release release;
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t s = 0; s < samples; ++s) o[i * samples + s] = philox_uniform(seed, offset, i, s);
}

py::tuple philox_block(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  const Philox4 r = philox4x32_10(Philox4{{c0, c1, c2, c3}}, k0, k1);
  return py::make_tuple(r.x[0], r.x[1], r.x[2], r.x[3]);
}

py::dict build_info() {
  py::dict d;
#ifdef _OPENMP
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
  d["compiler"] = PGEST_CXX_COMPILER;
  py::list compiled;
  for (auto isa : {cpu::Isa::kGeneric, cpu::Isa::kAvx2, cpu::Isa::kAvx512})
    if (cpu::isa_compiled(isa)) compiled.append(cpu::isa_name(isa));
  d["cpu_isas_compiled"] = compiled;
  d["cpu_isa"] = cpu::isa_name(cpu::get_isa());
#ifdef PGEST_WITH_CUDA
  d["cuda_compiled"] = true;
  d["cuda_archs"] = PGEST_CUDA_ARCHS_STR;
  d["cuda_version"] = PGEST_CUDA_VERSION;
#else
  d["cuda_compiled"] = false;
  d["cuda_archs"] = "";
  d["cuda_version"] = "";
#endif
  return d;
}

#ifdef PGEST_WITH_CUDA
// A CUDA launch: device index, stream handle and device buffers as addresses.
template <class Args>
py::tuple run_cuda(Status (*kernel)(const Args&, const cuda::Launch&, ErrorInfo*), const Args& args, int device,
                   uintptr_t stream, uintptr_t err_buf, uintptr_t seed, uintptr_t scratch) {
  cuda::Launch l;
  l.device = device;
  l.stream = reinterpret_cast<void*>(stream);
  l.err_buf = reinterpret_cast<int64_t*>(err_buf);
  l.seed = reinterpret_cast<const int64_t*>(seed);
  l.scratch = reinterpret_cast<double*>(scratch);
  ErrorInfo err;
  Status st;
  {
    py::gil_scoped_release release;
    st = kernel(args, l, &err);
  }
  return error_tuple(st, err);
}

template <class Args>
void def_cuda(py::module_& m, const char* name, Status (*kernel)(const Args&, const cuda::Launch&, ErrorInfo*)) {
  m.def(name, [kernel](const Args& args, int device, uintptr_t stream, uintptr_t err_buf, uintptr_t seed,
                       uintptr_t scratch) { return run_cuda(kernel, args, device, stream, err_buf, seed, scratch); },
        py::arg("args"), py::arg("device"), py::arg("stream"), py::arg("err_buf"), py::arg("seed") = 0,
        py::arg("scratch") = 0);
}
#endif

}  // namespace

#define PTR_PROPERTY(cls, field, type)                                                   \
  def_property(                                                                          \
      #field, [](const cls& a) { return reinterpret_cast<uintptr_t>(a.field); },         \
      [](cls& a, uintptr_t v) { a.field = reinterpret_cast<type>(v); })

PYBIND11_MODULE(_C, m) {
  m.doc() = "pgest native kernels (torch-free; called through pgest's Python API)";

  py::class_<ReinforceGradArgs>(m, "ReinforceGradArgs")
      .def(py::init<>())
      .PTR_PROPERTY(ReinforceGradArgs, log_probs, const void*)
      .def_readwrite("dtype", &ReinforceGradArgs::dtype)
      .def_readwrite("rows", &ReinforceGradArgs::rows)
      .def_readwrite("cols", &ReinforceGradArgs::cols)
      .def_readwrite("row_stride", &ReinforceGradArgs::row_stride)
      .def_readwrite("col_stride", &ReinforceGradArgs::col_stride)
      .PTR_PROPERTY(ReinforceGradArgs, labels, const int64_t*)
      .def_readwrite("label_stride", &ReinforceGradArgs::label_stride)
      .PTR_PROPERTY(ReinforceGradArgs, reward_table, const void*)
      .def_readwrite("reward_dtype", &ReinforceGradArgs::reward_dtype)
      .def_readwrite("reward_row_stride", &ReinforceGradArgs::reward_row_stride)
      .def_readwrite("reward_col_stride", &ReinforceGradArgs::reward_col_stride)
      .def_readwrite("baseline_kind", &ReinforceGradArgs::baseline_kind)
      .def_readwrite("baseline_value", &ReinforceGradArgs::baseline_value)
      .PTR_PROPERTY(ReinforceGradArgs, baseline, const void*)
      .def_readwrite("baseline_dtype", &ReinforceGradArgs::baseline_dtype)
      .def_readwrite("baseline_stride", &ReinforceGradArgs::baseline_stride)
      .def_readwrite("num_samples", &ReinforceGradArgs::num_samples)
      .def_readwrite("seed", &ReinforceGradArgs::seed)
      .def_readwrite("offset", &ReinforceGradArgs::offset)
      .PTR_PROPERTY(ReinforceGradArgs, actions, int64_t*)
      .PTR_PROPERTY(ReinforceGradArgs, rewards, float*)
      .PTR_PROPERTY(ReinforceGradArgs, grad, void*)
      .PTR_PROPERTY(ReinforceGradArgs, order, int64_t*)
      .PTR_PROPERTY(ReinforceGradArgs, unnormalised, int32_t*)
      .def_readwrite("normalised_tol", &ReinforceGradArgs::normalised_tol)
      .def_readwrite("num_threads", &ReinforceGradArgs::num_threads);

  py::class_<SampleArgs>(m, "SampleArgs")
      .def(py::init<>())
      .PTR_PROPERTY(SampleArgs, logits, const void*)
      .def_readwrite("dtype", &SampleArgs::dtype)
      .def_readwrite("rows", &SampleArgs::rows)
      .def_readwrite("cols", &SampleArgs::cols)
      .def_readwrite("row_stride", &SampleArgs::row_stride)
      .def_readwrite("col_stride", &SampleArgs::col_stride)
      .def_readwrite("num_samples", &SampleArgs::num_samples)
      .def_readwrite("seed", &SampleArgs::seed)
      .PTR_PROPERTY(SampleArgs, uniforms, const double*)
      .def_readwrite("offset", &SampleArgs::offset)
      .PTR_PROPERTY(SampleArgs, actions, int64_t*)
      .PTR_PROPERTY(SampleArgs, log_prob, void*)
      .PTR_PROPERTY(SampleArgs, entropy, void*)
      .PTR_PROPERTY(SampleArgs, row_max, void*)
      .PTR_PROPERTY(SampleArgs, log_z, void*)
      .def_readwrite("truncation", &SampleArgs::truncation)
      .def_readwrite("num_threads", &SampleArgs::num_threads);

  py::class_<ChunkPassArgs>(m, "ChunkPassArgs")
      .def(py::init<>())
      .def_readwrite("mode", &ChunkPassArgs::mode)
      .PTR_PROPERTY(ChunkPassArgs, logits, const void*)
      .def_readwrite("dtype", &ChunkPassArgs::dtype)
      .def_readwrite("rows", &ChunkPassArgs::rows)
      .def_readwrite("cols", &ChunkPassArgs::cols)
      .def_readwrite("row_stride", &ChunkPassArgs::row_stride)
      .PTR_PROPERTY(ChunkPassArgs, entering, const void*)
      .PTR_PROPERTY(ChunkPassArgs, table, void*)
      .def_readwrite("chunks", &ChunkPassArgs::chunks)
      .PTR_PROPERTY(ChunkPassArgs, row_max, void*)
      .PTR_PROPERTY(ChunkPassArgs, log_z, void*)
      .PTR_PROPERTY(ChunkPassArgs, entropy, void*)
      .PTR_PROPERTY(ChunkPassArgs, weights, void*)
      .PTR_PROPERTY(ChunkPassArgs, cum, double*)
      .PTR_PROPERTY(ChunkPassArgs, thresholds, const double*)
      .def_readwrite("num_samples", &ChunkPassArgs::num_samples)
      .PTR_PROPERTY(ChunkPassArgs, actions, int64_t*)
      .def_readwrite("num_threads", &ChunkPassArgs::num_threads);

  py::class_<LogProbArgs>(m, "LogProbArgs")
      .def(py::init<>())
      .PTR_PROPERTY(LogProbArgs, logits, const void*)
      .def_readwrite("dtype", &LogProbArgs::dtype)
      .def_readwrite("rows", &LogProbArgs::rows)
      .def_readwrite("cols", &LogProbArgs::cols)
      .def_readwrite("row_stride", &LogProbArgs::row_stride)
      .def_readwrite("col_stride", &LogProbArgs::col_stride)
      .PTR_PROPERTY(LogProbArgs, actions, const int64_t*)
      .def_readwrite("num_samples", &LogProbArgs::num_samples)
      .def_readwrite("ignore_index", &LogProbArgs::ignore_index)
      .def_readwrite("has_ignore_index", &LogProbArgs::has_ignore_index)
      .PTR_PROPERTY(LogProbArgs, log_prob, void*)
      .PTR_PROPERTY(LogProbArgs, entropy, void*)
      .PTR_PROPERTY(LogProbArgs, row_max, void*)
      .PTR_PROPERTY(LogProbArgs, log_z, void*)
      .def_readwrite("want_entropy", &LogProbArgs::want_entropy)
      .def_readwrite("stats_given", &LogProbArgs::stats_given)
      .PTR_PROPERTY(LogProbArgs, weights, const void*)
      .def_readwrite("entropy_weight", &LogProbArgs::entropy_weight)
      .PTR_PROPERTY(LogProbArgs, loss, void*)
      .PTR_PROPERTY(LogProbArgs, grad_log_prob, const void*)
      .PTR_PROPERTY(LogProbArgs, grad_entropy, const void*)
      .PTR_PROPERTY(LogProbArgs, row_scale, const void*)
      .def_readwrite("grad_log_prob_row_stride", &LogProbArgs::grad_log_prob_row_stride)
      .def_readwrite("grad_log_prob_sample_stride", &LogProbArgs::grad_log_prob_sample_stride)
      .def_readwrite("grad_entropy_stride", &LogProbArgs::grad_entropy_stride)
      .def_readwrite("row_scale_stride", &LogProbArgs::row_scale_stride)
      .def_readwrite("log_prob_scale", &LogProbArgs::log_prob_scale)
      .def_readwrite("entropy_scale", &LogProbArgs::entropy_scale)
      .PTR_PROPERTY(LogProbArgs, grad, void*)
      .PTR_PROPERTY(LogProbArgs, order, int64_t*)
      .def_readwrite("col_offset", &LogProbArgs::col_offset)
      .def_readwrite("total_cols", &LogProbArgs::total_cols)
      .def_readwrite("truncation", &LogProbArgs::truncation)
      .def_readwrite("num_threads", &LogProbArgs::num_threads);

  py::class_<ReturnsArgs>(m, "ReturnsArgs")
      .def(py::init<>())
      .def_readwrite("dtype", &ReturnsArgs::dtype)
      .def_readwrite("steps", &ReturnsArgs::steps)
      .def_readwrite("envs", &ReturnsArgs::envs)
      .PTR_PROPERTY(ReturnsArgs, rewards, const void*)
      .PTR_PROPERTY(ReturnsArgs, values, const void*)
      .PTR_PROPERTY(ReturnsArgs, dones, const void*)
      .def_readwrite("dones_type", &ReturnsArgs::dones_type)
      .PTR_PROPERTY(ReturnsArgs, last_value, const void*)
      .def_readwrite("gamma", &ReturnsArgs::gamma)
      .def_readwrite("lam", &ReturnsArgs::lam)
      .PTR_PROPERTY(ReturnsArgs, out, void*)
      .PTR_PROPERTY(ReturnsArgs, out_ret, void*)
      .def_readwrite("num_threads", &ReturnsArgs::num_threads);
  m.def("discounted_returns_cpu", [](const ReturnsArgs& args) { return run_kernel(cpu::discounted_returns, args); });
  m.def("gae_cpu", [](const ReturnsArgs& args) { return run_kernel(cpu::gae, args); });

  py::class_<TruncationParams>(m, "TruncationParams")
      .def(py::init<>())
      .PTR_PROPERTY(TruncationParams, temperature, const double*)
      .def_readwrite("temperature_stride", &TruncationParams::temperature_stride)
      .PTR_PROPERTY(TruncationParams, top_k, const int64_t*)
      .def_readwrite("top_k_stride", &TruncationParams::top_k_stride)
      .PTR_PROPERTY(TruncationParams, top_p, const double*)
      .def_readwrite("top_p_stride", &TruncationParams::top_p_stride)
      .PTR_PROPERTY(TruncationParams, min_p, const double*)
      .def_readwrite("min_p_stride", &TruncationParams::min_p_stride)
      .PTR_PROPERTY(TruncationParams, given_threshold, const void*)
      .PTR_PROPERTY(TruncationParams, kept_ids, const int64_t*)
      .PTR_PROPERTY(TruncationParams, kept_offsets, const int64_t*)
      .PTR_PROPERTY(TruncationParams, threshold, void*)
      .PTR_PROPERTY(TruncationParams, kept, int64_t*)
      .PTR_PROPERTY(TruncationParams, kept_mass, double*)
      .PTR_PROPERTY(TruncationParams, cut, void*)
      .PTR_PROPERTY(TruncationParams, kept_logits, void*);
  py::class_<TruncationArgs>(m, "TruncationArgs")
      .def(py::init<>())
      .PTR_PROPERTY(TruncationArgs, logits, const void*)
      .def_readwrite("dtype", &TruncationArgs::dtype)
      .def_readwrite("rows", &TruncationArgs::rows)
      .def_readwrite("cols", &TruncationArgs::cols)
      .def_readwrite("row_stride", &TruncationArgs::row_stride)
      .def_readwrite("col_stride", &TruncationArgs::col_stride)
      .def_readwrite("params", &TruncationArgs::params)
      .def_readwrite("num_threads", &TruncationArgs::num_threads);
  m.def("truncation_cpu", [](const TruncationArgs& args) { return run_kernel(cpu::truncation, args); });
  m.def("truncation_radix_cpu", [](const TruncationArgs& args) { return run_kernel(cpu::truncation_radix, args); });

  m.def("sample_cpu", [](const SampleArgs& args) { return run_kernel(cpu::sample, args); });
  m.def("chunk_pass_cpu", [](const ChunkPassArgs& args) { return run_kernel(cpu::chunk_pass, args); });
  m.def("log_prob_forward_cpu", [](const LogProbArgs& args) { return run_kernel(cpu::log_prob_forward, args); });
  m.def("log_prob_backward_cpu", [](const LogProbArgs& args) { return run_kernel(cpu::log_prob_backward, args); });

  m.def("reinforce_grad_cpu", [](const ReinforceGradArgs& args) { return run_kernel(cpu::reinforce_grad, args); },
        "Runs the CPU kernel; returns (status, row, col, index, value).");

#ifdef PGEST_WITH_CUDA
  def_cuda(m, "reinforce_grad_cuda", cuda::reinforce_grad);
  def_cuda(m, "sample_cuda", cuda::sample);
  def_cuda(m, "log_prob_forward_cuda", cuda::log_prob_forward);
  def_cuda(m, "log_prob_backward_cuda", cuda::log_prob_backward);
  def_cuda(m, "discounted_returns_cuda", cuda::discounted_returns);
  def_cuda(m, "gae_cuda", cuda::gae);
  def_cuda(m, "truncation_cuda", cuda::truncation);
  m.def("cuda_device_count", &cuda::device_count);
  m.def("cuda_error_string", [](int code) { return std::string(cuda::error_string(code)); });
#endif

  m.def("philox_uniform", &philox_uniform_fill,
        "Fills a contiguous (rows, samples) float64 buffer with the uniforms the kernels draw.");
  m.def("philox4x32_10", &philox_block, "One Philox4x32-10 block: counter c0..c3, key k0, k1.");
  m.def("philox_offsets_per_call", [](int64_t s) { return philox_offsets_per_call(s); });
  m.def("build_info", &build_info);
  m.def("cpu_isa", [] { return std::string(cpu::isa_name(cpu::get_isa())); });
  m.def("set_cpu_isa", [](const std::string& name) {
    cpu::Isa isa;
    if (!cpu::parse_isa(name.c_str(), &isa) || !cpu::set_isa(isa)) return false;
    return true;
  });
  m.def("cpu_isa_usable", [](const std::string& name) {
    cpu::Isa isa;
    return cpu::parse_isa(name.c_str(), &isa) && cpu::isa_usable(isa);
  });
}
