// Compiled host path of the torch binding's eager call (asa_export/runtime/torch_native.py builds
// it against the running torch with torch.utils.cpp_extension). It does what
// torch_op._forward does for a call without optional inputs — allocate the output, the three
// telemetry tensors and the workspace, fill AsaParams, call the core — in C++, where the
// Python + ctypes path spends more host time (on an H100 host 53.7 against 90.9 us per call at
// S 256; BENCHMARKS.md "Session 17, later").
//
// The core's entry points arrive as addresses (taken from the ctypes handle of libasa_cuda.so),
// so this file links against no CUDA library and compiles with a CPU-only torch; tests pass
// recording callbacks instead of the core and compare the params with torch_op.make_params.
#include <torch/extension.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "asa/asa_core.h"

namespace {

using WorkspaceSizeFn = size_t (*)(const AsaParams*);
using EntryFn = int (*)(const AsaParams*, void*, size_t, void*);
using LastErrorFn = const char* (*)();

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename Ptr>
void point(const at::Tensor& t, Ptr* ptr, int64_t* sb, int64_t* sh, int64_t* ss) {
  *ptr = static_cast<Ptr>(t.data_ptr());
  *sb = t.stride(0);
  *sh = t.stride(1);
  *ss = t.stride(2);
}

std::string last_error(int64_t fn) {
  const char* msg = fn ? reinterpret_cast<LastErrorFn>(fn)() : nullptr;
  return msg ? msg : "";
}

}  // namespace

// q [B, Hq, Sq, D], k [B, Hkv, Skv, D], v [B, Hkv, Skv, Dv] with head-dim stride 1 (the caller
// makes them so); dtype is AsaDType's value; scale is already resolved (> 0). Returns
// (out, block_indices, block_counts, visible_counts) as in SPEC.md "Outputs". The core's errors
// raise std::invalid_argument (ValueError in Python) with its message; allocation failures keep
// torch's own exception.
std::vector<at::Tensor> plain_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      int64_t dtype, double scale, bool causal, int64_t block_size,
                                      double threshold, int64_t sink_blocks, int64_t local_blocks,
                                      int64_t window, double softcap, int64_t select_per,
                                      int64_t workspace_size_fn, int64_t entry_fn,
                                      int64_t last_error_fn, int64_t stream) {
  const int64_t batch = q.size(0), heads_q = q.size(1), seq_q = q.size(2);
  const int64_t heads_kv = k.size(1), seq_kv = k.size(2);
  const int64_t hsel = select_per ? heads_kv : heads_q;
  const int64_t nq = cdiv(seq_q, block_size), nk = cdiv(seq_kv, block_size);
  at::Tensor out = at::empty({batch, heads_q, seq_q, v.size(3)}, q.options());
  const auto i32 = q.options().dtype(at::kInt);
  at::Tensor indices = at::empty({batch, hsel, nq, nk}, i32);
  at::Tensor counts = at::empty({batch, hsel, nq}, i32);
  at::Tensor visible = at::empty({batch, nq}, i32);

  AsaParams p{};
  p.batch = static_cast<int32_t>(batch);
  p.heads_q = static_cast<int32_t>(heads_q);
  p.heads_kv = static_cast<int32_t>(heads_kv);
  p.seq_q = static_cast<int32_t>(seq_q);
  p.seq_kv = static_cast<int32_t>(seq_kv);
  p.head_dim = static_cast<int32_t>(q.size(3));
  p.head_dim_v = static_cast<int32_t>(v.size(3));
  p.dtype = static_cast<AsaDType>(dtype);
  point(q, &p.q, &p.q_stride_b, &p.q_stride_h, &p.q_stride_s);
  point(k, &p.k, &p.k_stride_b, &p.k_stride_h, &p.k_stride_s);
  point(v, &p.v, &p.v_stride_b, &p.v_stride_h, &p.v_stride_s);
  point(out, &p.out, &p.o_stride_b, &p.o_stride_h, &p.o_stride_s);
  p.scale = static_cast<float>(scale);
  p.causal = causal ? 1 : 0;
  p.block_size = static_cast<int32_t>(block_size);
  p.threshold = static_cast<float>(threshold);
  p.sink_blocks = static_cast<int32_t>(sink_blocks);
  p.local_blocks = static_cast<int32_t>(local_blocks);
  p.window = static_cast<int32_t>(window);
  p.softcap = static_cast<float>(softcap);
  p.select_per = static_cast<int32_t>(select_per);
  p.block_indices = indices.data_ptr<int32_t>();
  p.block_counts = counts.data_ptr<int32_t>();
  p.visible_counts = visible.data_ptr<int32_t>();

  const size_t size = reinterpret_cast<WorkspaceSizeFn>(workspace_size_fn)(&p);
  if (size == 0) {
    const std::string msg = last_error(last_error_fn);
    if (!msg.empty()) throw std::invalid_argument(msg);
  }
  at::Tensor workspace =
      at::empty({static_cast<int64_t>(size > 0 ? size : 1)}, q.options().dtype(at::kByte));
  const int err = reinterpret_cast<EntryFn>(entry_fn)(&p, workspace.data_ptr(), size,
                                                      reinterpret_cast<void*>(stream));
  if (err != 0) {
    throw std::invalid_argument("asa_cuda_forward returned CUDA error " + std::to_string(err) +
                                ": " + last_error(last_error_fn));
  }
  return {out, indices, counts, visible};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("plain_forward", &plain_forward,
        "ASA forward without optional inputs: (out, block_indices, block_counts, "
        "visible_counts)");
}
