// CUDA handlers of the expert-parallel dispatch/combine FFI targets (contract: INTERFACE.md).
//
//   DispatchLayoutCuda  topk_idx -> per-rank / per-expert token counts, is_token_in_rank
//   DispatchPackCuda    x, topk_idx -> per-rank send buffer [R, C, H] in source-token order
//   CombineUnpackCuda   rows, src_idx, weights -> out[t] = sum_r weights * rows (f32, increasing r)
//
// Everything runs on the stream XLA hands us, with no device sync. Values cannot be checked on
// the host without a sync, so out-of-range values are tolerated rather than reported: topk ids
// outside [-1, E) count as -1, src_idx entries outside [-1, T) are skipped.

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>

#include <cub/block/block_scan.cuh>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 16;  // kernels are grid-stride beyond this
constexpr int64_t kInt32Max = 2147483647;

int64_t NumBlocks(int64_t work, int64_t per_block) {
  int64_t n = (work + per_block - 1) / per_block;
  return n < 1 ? 1 : (n > kMaxBlocks ? kMaxBlocks : n);
}

// Threads for a block that walks `n` contiguous items: a multiple of a warp, at most kThreads.
int RowThreads(int64_t n) {
  int64_t t = (n + 31) / 32 * 32;
  return static_cast<int>(t < 32 ? 32 : (t > kThreads ? kThreads : t));
}

template <typename Dims>
std::string DimsStr(const Dims& dims) {
  std::string s;
  for (int64_t d : dims) s += (s.empty() ? "" : ", ") + std::to_string(d);
  return "[" + s + "]";
}

// Empty when `got` equals `want`, else "<name>: expected shape [...], got [...]".
std::string CheckShape(const char* name, ffi::Span<const int64_t> got,
                       std::initializer_list<int64_t> want) {
  if (std::equal(got.begin(), got.end(), want.begin(), want.end())) return "";
  return std::string(name) + ": expected shape " + DimsStr(want) + ", got " + DimsStr(got);
}

ffi::Error CudaCheck(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return ffi::Error::Success();
  return ffi::Error::Internal(std::string(what) + ": " + cudaGetErrorString(err));
}

ffi::Error LaunchCheck(const char* kernel) { return CudaCheck(cudaGetLastError(), kernel); }

ffi::Error Invalid(const std::string& msg) { return ffi::Error::InvalidArgument(msg); }

#define RETURN_IF_ERROR(expr)       \
  do {                              \
    ffi::Error err_ = (expr);       \
    if (err_.failure()) return err_; \
  } while (0)

using S32Buffer = ffi::Buffer<ffi::S32>;
using S32Result = ffi::Result<ffi::Buffer<ffi::S32>>;

// Common attribute checks; empty string when valid.
std::string CheckExperts(int64_t E, int64_t R) {
  if (R <= 0) return "num_ranks: must be positive, got " + std::to_string(R);
  if (E <= 0 || E % R != 0 || E > kInt32Max)
    return "num_experts: must be a positive multiple of num_ranks (" + std::to_string(R) +
           "), got " + std::to_string(E);
  return "";
}

// Expert id -> rank, or -1 for "no expert" (and, silently, for out-of-range ids).
__device__ __forceinline__ int RankOf(int32_t e, int E, int experts_per_rank) {
  return (e >= 0 && e < E) ? e / experts_per_rank : -1;
}

// ---------------------------------------------------------------- dispatch_layout

// One thread per token. Counts go to a block-local shared histogram when it fits (far fewer
// global atomics), else straight to global memory.
__global__ void LayoutKernel(const int32_t* __restrict__ topk, int64_t T, int K, int E, int R,
                             bool use_smem, int32_t* per_rank, int32_t* per_expert,
                             bool* in_rank) {
  extern __shared__ int32_t hist[];  // [R] ranks then [E] experts
  int32_t* rank_cnt = use_smem ? hist : per_rank;
  int32_t* expert_cnt = use_smem ? hist + R : per_expert;
  if (use_smem) {
    for (int i = threadIdx.x; i < R + E; i += blockDim.x) hist[i] = 0;
    __syncthreads();
  }
  const int epr = E / R;
  int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t < T) {
    const int32_t* ids = topk + t * K;
    for (int k = 0; k < K; ++k) {
      int r = RankOf(ids[k], E, epr);
      if (r < 0) continue;
      atomicAdd(&expert_cnt[ids[k]], 1);
      // A rank counts once per token: skip it if an earlier k already hit it (K is small).
      bool seen = false;
      for (int j = 0; j < k && !seen; ++j) seen = RankOf(ids[j], E, epr) == r;
      if (!seen) {
        atomicAdd(&rank_cnt[r], 1);
        in_rank[t * R + r] = true;
      }
    }
  }
  if (use_smem) {
    __syncthreads();
    for (int i = threadIdx.x; i < R + E; i += blockDim.x) {
      if (hist[i] == 0) continue;
      atomicAdd(i < R ? &per_rank[i] : &per_expert[i - R], hist[i]);
    }
  }
}

ffi::Error DispatchLayoutImpl(cudaStream_t stream, S32Buffer topk_idx, int64_t num_experts,
                              int64_t num_ranks, S32Result num_tokens_per_rank,
                              S32Result num_tokens_per_expert,
                              ffi::Result<ffi::Buffer<ffi::PRED>> is_token_in_rank) {
  const int64_t E = num_experts, R = num_ranks;
  if (std::string m = CheckExperts(E, R); !m.empty()) return Invalid(m);
  auto td = topk_idx.dimensions();
  if (td.size() != 2) return Invalid("topk_idx: expected rank 2, got " + DimsStr(td));
  const int64_t T = td[0], K = td[1];
  for (const std::string& m :
       {CheckShape("num_tokens_per_rank", num_tokens_per_rank->dimensions(), {R}),
        CheckShape("num_tokens_per_expert", num_tokens_per_expert->dimensions(), {E}),
        CheckShape("is_token_in_rank", is_token_in_rank->dimensions(), {T, R})})
    if (!m.empty()) return Invalid(m);

  int32_t* per_rank = num_tokens_per_rank->typed_data();
  int32_t* per_expert = num_tokens_per_expert->typed_data();
  bool* in_rank = is_token_in_rank->typed_data();
  // The kernel only ever sets flags and adds, so everything starts at zero.
  RETURN_IF_ERROR(CudaCheck(cudaMemsetAsync(per_rank, 0, R * sizeof(int32_t), stream), "memset"));
  RETURN_IF_ERROR(CudaCheck(cudaMemsetAsync(per_expert, 0, E * sizeof(int32_t), stream), "memset"));
  if (T * R > 0) RETURN_IF_ERROR(CudaCheck(cudaMemsetAsync(in_rank, 0, T * R, stream), "memset"));
  if (T == 0 || K == 0) return ffi::Error::Success();

  const size_t smem = (R + E) * sizeof(int32_t);
  const bool use_smem = smem <= 32 * 1024;
  const int64_t blocks = (T + kThreads - 1) / kThreads;  // one thread per token
  LayoutKernel<<<blocks, kThreads, use_smem ? smem : 0, stream>>>(
      topk_idx.typed_data(), T, static_cast<int>(K), static_cast<int>(E), static_cast<int>(R),
      use_smem, per_rank, per_expert, in_rank);
  return LaunchCheck("LayoutKernel");
}

// ---------------------------------------------------------------- dispatch_pack

// One block per rank: an exclusive scan over tokens (in chunks of kThreads) gives each hitting
// token its position, so rows keep increasing-t order and the result is deterministic.
__global__ void PackScanKernel(const int32_t* __restrict__ topk, int64_t T, int K, int E,
                               int R, int64_t C, int32_t* src_idx, int32_t* counts,
                               int32_t* offsets, int32_t* num_dropped) {
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  const int r = blockIdx.x, epr = E / R;
  int32_t* my_src = src_idx + r * C;
  int64_t n = 0;  // tokens hitting r so far (identical in every thread)
  for (int64_t start = 0; start < T; start += kThreads) {
    const int64_t t = start + threadIdx.x;
    int hit = 0;
    if (t < T)
      for (int k = 0; k < K && !hit; ++k) hit = RankOf(topk[t * K + k], E, epr) == r;
    int pos, total;
    Scan(scan_tmp).ExclusiveSum(hit, pos, total);
    if (hit && n + pos < C) my_src[n + pos] = static_cast<int32_t>(t);
    n += total;
    __syncthreads();  // scan_tmp is reused by the next chunk
  }
  const int64_t count = n < C ? n : C;
  for (int64_t i = count + threadIdx.x; i < C; i += blockDim.x) my_src[i] = -1;
  if (threadIdx.x == 0) {
    counts[r] = static_cast<int32_t>(count);
    num_dropped[r] = static_cast<int32_t>(n - count);
    offsets[r] = static_cast<int32_t>(r * C);
  }
}

// One block per buffer row (r, i): copy x[src_idx[r, i]] as `V` words, or zero the row.
template <typename V>
__global__ void PackCopyKernel(const V* __restrict__ x, const int32_t* __restrict__ src_idx,
                               int64_t rows, int64_t words_per_row, V* __restrict__ buffer) {
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int32_t t = src_idx[row];
    V* dst = buffer + row * words_per_row;
    if (t >= 0) {
      const V* src = x + static_cast<int64_t>(t) * words_per_row;
      for (int64_t j = threadIdx.x; j < words_per_row; j += blockDim.x) dst[j] = src[j];
    } else {
      for (int64_t j = threadIdx.x; j < words_per_row; j += blockDim.x) dst[j] = V{};
    }
  }
}

template <typename V>
ffi::Error LaunchCopy(cudaStream_t stream, const void* x, const int32_t* src_idx, int64_t rows,
                      int64_t row_bytes, void* buffer) {
  const int64_t words = row_bytes / sizeof(V);
  PackCopyKernel<V><<<NumBlocks(rows, 1), RowThreads(words), 0, stream>>>(
      static_cast<const V*>(x), src_idx, rows, words, static_cast<V*>(buffer));
  return LaunchCheck("PackCopyKernel");
}

// Element types whose rows are whole bytes (sub-byte types may be packed by XLA).
bool ByteAddressable(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::INVALID: case ffi::DataType::TOKEN: case ffi::DataType::F4E2M1FN:
    case ffi::DataType::S1: case ffi::DataType::S2: case ffi::DataType::S4:
    case ffi::DataType::U1: case ffi::DataType::U2: case ffi::DataType::U4: return false;
    default: return true;
  }
}

ffi::Error DispatchPackImpl(cudaStream_t stream, ffi::AnyBuffer x, S32Buffer topk_idx,
                            int64_t num_experts, int64_t num_ranks, int64_t capacity,
                            ffi::Result<ffi::AnyBuffer> buffer, S32Result counts,
                            S32Result offsets, S32Result src_idx, S32Result num_dropped) {
  const int64_t E = num_experts, R = num_ranks, C = capacity;
  if (std::string m = CheckExperts(E, R); !m.empty()) return Invalid(m);
  // offsets[r] = r * C is S32, so the flattened row count must fit.
  if (C < 0 || R * C > kInt32Max)
    return Invalid("capacity: need 0 <= num_ranks * capacity < 2^31, got " + std::to_string(C));
  auto xd = x.dimensions(), td = topk_idx.dimensions();
  if (xd.size() != 2) return Invalid("x: expected rank 2, got " + DimsStr(xd));
  if (!ByteAddressable(x.element_type())) return Invalid("x: unsupported sub-byte/token dtype");
  const int64_t T = xd[0], H = xd[1];
  if (T > kInt32Max) return Invalid("x: more than 2^31 - 1 tokens");  // src_idx is S32
  if (td.size() != 2 || td[0] != T)
    return Invalid("topk_idx: expected shape [" + std::to_string(T) + ", K], got " + DimsStr(td));
  const int64_t K = td[1];
  if (buffer->element_type() != x.element_type()) return Invalid("buffer: dtype must match x");
  for (const std::string& m : {CheckShape("buffer", buffer->dimensions(), {R, C, H}),
                               CheckShape("counts", counts->dimensions(), {R}),
                               CheckShape("offsets", offsets->dimensions(), {R}),
                               CheckShape("src_idx", src_idx->dimensions(), {R, C}),
                               CheckShape("num_dropped", num_dropped->dimensions(), {R})})
    if (!m.empty()) return Invalid(m);

  PackScanKernel<<<R, kThreads, 0, stream>>>(
      topk_idx.typed_data(), T, static_cast<int>(K), static_cast<int>(E), static_cast<int>(R), C,
      src_idx->typed_data(), counts->typed_data(), offsets->typed_data(),
      num_dropped->typed_data());
  RETURN_IF_ERROR(LaunchCheck("PackScanKernel"));

  const int64_t rows = R * C;
  const int64_t row_bytes = H * static_cast<int64_t>(ffi::ByteWidth(x.element_type()));
  if (rows == 0 || row_bytes == 0) return ffi::Error::Success();
  const void* xp = x.untyped_data();
  void* bp = buffer->untyped_data();
  // Widest word that divides the row and both base addresses (T == 0 may give a null x).
  auto aligned = [&](int64_t w) {
    return row_bytes % w == 0 && reinterpret_cast<uintptr_t>(xp) % w == 0 &&
           reinterpret_cast<uintptr_t>(bp) % w == 0;
  };
  const int32_t* si = src_idx->typed_data();
  if (aligned(16)) return LaunchCopy<uint4>(stream, xp, si, rows, row_bytes, bp);
  if (aligned(4)) return LaunchCopy<uint32_t>(stream, xp, si, rows, row_bytes, bp);
  return LaunchCopy<uint8_t>(stream, xp, si, rows, row_bytes, bp);
}

// ---------------------------------------------------------------- combine_unpack

constexpr uint32_t kNoRow = 0xffffffffu;

// inverse[t * R + r] = the row i of rank r holding token t. A token appears at most once per
// rank (pack guarantees it); if a caller breaks that, atomicMin keeps the lowest such row so the
// result stays deterministic, and the other duplicates are ignored.
__global__ void InverseKernel(const int32_t* __restrict__ src_idx, int64_t R, int64_t C,
                              int64_t T, uint32_t* inverse) {
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < R * C;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int32_t t = src_idx[j];
    if (t >= 0 && t < T) atomicMin(&inverse[t * R + j / C], static_cast<uint32_t>(j % C));
  }
}

__device__ __forceinline__ float ToF32(float v) { return v; }
__device__ __forceinline__ float ToF32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ void FromF32(float v, float* o) { *o = v; }
__device__ __forceinline__ void FromF32(float v, __nv_bfloat16* o) { *o = __float2bfloat16(v); }

// One block per token, threads over h. __fmul_rn/__fadd_rn stop FMA contraction so the sum is
// rounded exactly like the reference's multiply-then-add in increasing r.
template <typename Elem>
__global__ void CombineKernel(const Elem* __restrict__ rows, const float* __restrict__ weights,
                              const uint32_t* __restrict__ inverse, int64_t T, int64_t R,
                              int64_t C, int64_t H, Elem* __restrict__ out) {
  for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
    const uint32_t* inv = inverse + t * R;
    for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
      float acc = 0.0f;
      for (int64_t r = 0; r < R; ++r) {
        const uint32_t i = inv[r];
        if (i == kNoRow) continue;
        const int64_t row = r * C + i;
        acc = __fadd_rn(acc, __fmul_rn(weights[row], ToF32(rows[row * H + h])));
      }
      FromF32(acc, &out[t * H + h]);
    }
  }
}

template <typename Elem>
ffi::Error LaunchCombine(cudaStream_t stream, const ffi::AnyBuffer& rows, const float* weights,
                         const uint32_t* inverse, int64_t T, int64_t H, void* out) {
  auto d = rows.dimensions();
  CombineKernel<Elem><<<NumBlocks(T, 1), RowThreads(H), 0, stream>>>(
      static_cast<const Elem*>(rows.untyped_data()), weights, inverse, T, d[0], d[1], H,
      static_cast<Elem*>(out));
  return LaunchCheck("CombineKernel");
}

ffi::Error CombineUnpackImpl(cudaStream_t stream, ffi::AnyBuffer rows, S32Buffer src_idx,
                             ffi::Buffer<ffi::F32> weights, int64_t num_tokens,
                             ffi::Result<ffi::AnyBuffer> out, S32Result inverse_map) {
  const ffi::DataType dt = rows.element_type();
  if (dt != ffi::DataType::F32 && dt != ffi::DataType::BF16)
    return Invalid("rows: dtype must be F32 or BF16");
  auto rd = rows.dimensions();
  if (rd.size() != 3) return Invalid("rows: expected rank 3, got " + DimsStr(rd));
  const int64_t R = rd[0], C = rd[1], H = rd[2], T = num_tokens;
  if (T < 0) return Invalid("num_tokens: must be >= 0, got " + std::to_string(T));
  if (out->element_type() != dt) return Invalid("out: dtype must match rows");
  for (const std::string& m : {CheckShape("src_idx", src_idx.dimensions(), {R, C}),
                               CheckShape("weights", weights.dimensions(), {R, C}),
                               CheckShape("out", out->dimensions(), {T, H}),
                               CheckShape("inverse_map", inverse_map->dimensions(), {T, R})})
    if (!m.empty()) return Invalid(m);
  void* o = out->untyped_data();
  if (T * H == 0) return ffi::Error::Success();
  if (R * C == 0)  // no rows at all: zero bits are 0.0 in both dtypes
    return CudaCheck(cudaMemsetAsync(o, 0, out->size_bytes(), stream), "memset");

  // The inverse map is an XLA-owned result buffer (discarded by the caller), not handler
  // scratch: scratch is freed when the handler returns, possibly before these kernels finish.
  const size_t inv_bytes = T * R * sizeof(uint32_t);
  uint32_t* inverse = reinterpret_cast<uint32_t*>(inverse_map->typed_data());
  RETURN_IF_ERROR(CudaCheck(cudaMemsetAsync(inverse, 0xff, inv_bytes, stream), "memset"));
  InverseKernel<<<NumBlocks(R * C, kThreads), kThreads, 0, stream>>>(src_idx.typed_data(), R, C,
                                                                     T, inverse);
  RETURN_IF_ERROR(LaunchCheck("InverseKernel"));
  const float* w = weights.typed_data();
  if (dt == ffi::DataType::F32) return LaunchCombine<float>(stream, rows, w, inverse, T, H, o);
  return LaunchCombine<__nv_bfloat16>(stream, rows, w, inverse, T, H, o);
}

}  // namespace

// Bindings mirror INTERFACE.md; the CPU handlers are the same minus the stream.
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    DispatchLayoutCuda, DispatchLayoutImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()
        .Arg<S32Buffer>()  // topk_idx
        .Attr<int64_t>("num_experts").Attr<int64_t>("num_ranks")
        .Ret<S32Buffer>().Ret<S32Buffer>()  // num_tokens_per_rank, num_tokens_per_expert
        .Ret<ffi::Buffer<ffi::PRED>>());    // is_token_in_rank

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    DispatchPackCuda, DispatchPackImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()
        .Arg<ffi::AnyBuffer>().Arg<S32Buffer>()  // x, topk_idx
        .Attr<int64_t>("num_experts").Attr<int64_t>("num_ranks").Attr<int64_t>("capacity")
        .Ret<ffi::AnyBuffer>()                // buffer
        .Ret<S32Buffer>().Ret<S32Buffer>()    // counts, offsets
        .Ret<S32Buffer>().Ret<S32Buffer>());  // src_idx, num_dropped

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    CombineUnpackCuda, CombineUnpackImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()
        .Arg<ffi::AnyBuffer>()  // rows
        .Arg<S32Buffer>()       // src_idx
        .Arg<ffi::Buffer<ffi::F32>>()  // weights
        .Attr<int64_t>("num_tokens")
        .Ret<ffi::AnyBuffer>()   // out
        .Ret<S32Buffer>());      // inverse_map, working memory
