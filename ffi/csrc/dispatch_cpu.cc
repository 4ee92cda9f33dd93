// CPU handlers of the expert-parallel dispatch ops (contract: INTERFACE.md in this folder).
//
// Work is split over std::threads where it pays (the row copies of pack and the sums of
// combine); each thread owns disjoint outputs, so results do not depend on the thread count.
// Bad values (expert ids outside [-1, E), source indices outside [-1, T)) are errors here,
// not silently skipped.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Runs body(begin, end) over [0, n) in up to hardware_concurrency contiguous chunks.
template <typename Body>
void ParallelFor(int64_t n, int64_t min_chunk, Body body) {
  int64_t threads = std::max<int64_t>(1, std::thread::hardware_concurrency());
  threads = std::min(threads, std::max<int64_t>(1, n / std::max<int64_t>(min_chunk, 1)));
  if (threads <= 1) {
    body(0, n);
    return;
  }
  std::vector<std::thread> pool;
  int64_t chunk = (n + threads - 1) / threads;
  for (int64_t begin = 0; begin < n; begin += chunk) {
    pool.emplace_back(body, begin, std::min(n, begin + chunk));
  }
  for (auto& t : pool) t.join();
}

ffi::Error CheckExperts(int64_t num_experts, int64_t num_ranks) {
  if (num_ranks < 1 || num_experts < 1 || num_experts % num_ranks != 0) {
    return ffi::Error::InvalidArgument("num_experts must be a positive multiple of num_ranks, got " +
                                       std::to_string(num_experts) + " and " + std::to_string(num_ranks));
  }
  return ffi::Error::Success();
}

// The rank of each (token, k) entry, or -1; an error names the first id outside [-1, E).
ffi::Error RanksOf(const ffi::Buffer<ffi::S32>& topk_idx, int64_t num_experts, int64_t num_ranks,
                   std::vector<int32_t>* ranks) {
  const int64_t n = topk_idx.element_count();
  const int32_t* ids = topk_idx.typed_data();
  const int64_t per_rank = num_experts / num_ranks;
  ranks->resize(n);
  for (int64_t i = 0; i < n; ++i) {
    if (ids[i] < -1 || ids[i] >= num_experts) {
      return ffi::Error::InvalidArgument("topk_idx: entry " + std::to_string(i) + " is " + std::to_string(ids[i]) +
                                         ", outside [-1, " + std::to_string(num_experts) + ")");
    }
    (*ranks)[i] = ids[i] < 0 ? -1 : ids[i] / per_rank;
  }
  return ffi::Error::Success();
}

ffi::Error DispatchLayoutImpl(ffi::Buffer<ffi::S32> topk_idx, int64_t num_experts, int64_t num_ranks,
                              ffi::ResultBuffer<ffi::S32> tokens_per_rank, ffi::ResultBuffer<ffi::S32> tokens_per_expert,
                              ffi::ResultBuffer<ffi::PRED> token_in_rank) {
  if (auto err = CheckExperts(num_experts, num_ranks); err.failure()) return err;
  if (topk_idx.dimensions().size() != 2) return ffi::Error::InvalidArgument("topk_idx must be 2-D [T, K]");
  const int64_t tokens = topk_idx.dimensions()[0], topk = topk_idx.dimensions()[1];
  if (tokens_per_rank->element_count() != num_ranks || tokens_per_expert->element_count() != num_experts ||
      token_in_rank->element_count() != tokens * num_ranks) {
    return ffi::Error::InvalidArgument("result shapes do not match num_ranks, num_experts and topk_idx");
  }
  std::vector<int32_t> ranks;
  if (auto err = RanksOf(topk_idx, num_experts, num_ranks, &ranks); err.failure()) return err;
  int32_t* per_rank = tokens_per_rank->typed_data();
  int32_t* per_expert = tokens_per_expert->typed_data();
  bool* in_rank = token_in_rank->typed_data();
  std::fill(per_rank, per_rank + num_ranks, 0);
  std::fill(per_expert, per_expert + num_experts, 0);
  std::fill(in_rank, in_rank + tokens * num_ranks, false);
  const int32_t* ids = topk_idx.typed_data();
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t k = 0; k < topk; ++k) {
      const int32_t r = ranks[t * topk + k];
      if (r < 0) continue;
      ++per_expert[ids[t * topk + k]];
      bool& seen = in_rank[t * num_ranks + r];
      if (!seen) ++per_rank[r];
      seen = true;
    }
  }
  return ffi::Error::Success();
}

ffi::Error DispatchPackImpl(ffi::AnyBuffer x, ffi::Buffer<ffi::S32> topk_idx, int64_t num_experts, int64_t num_ranks,
                            int64_t capacity, ffi::Result<ffi::AnyBuffer> buffer, ffi::ResultBuffer<ffi::S32> counts,
                            ffi::ResultBuffer<ffi::S32> offsets, ffi::ResultBuffer<ffi::S32> src_idx,
                            ffi::ResultBuffer<ffi::S32> num_dropped) {
  if (auto err = CheckExperts(num_experts, num_ranks); err.failure()) return err;
  if (x.dimensions().size() != 2 || topk_idx.dimensions().size() != 2 || x.dimensions()[0] != topk_idx.dimensions()[0]) {
    return ffi::Error::InvalidArgument("x must be [T, H] and topk_idx [T, K] with the same T");
  }
  switch (x.element_type()) {  // XLA packs these: a row is not hidden * ByteWidth bytes
    case ffi::DataType::S1: case ffi::DataType::S2: case ffi::DataType::S4: case ffi::DataType::U1:
    case ffi::DataType::U2: case ffi::DataType::U4: case ffi::DataType::F4E2M1FN: case ffi::DataType::TOKEN:
      return ffi::Error::InvalidArgument("x: sub-byte dtypes are not supported");
    default:
      break;
  }
  if (num_ranks * capacity > 2147483647) {
    return ffi::Error::InvalidArgument("capacity: num_ranks * capacity must fit int32 offsets");
  }
  const int64_t tokens = x.dimensions()[0], hidden = x.dimensions()[1], topk = topk_idx.dimensions()[1];
  if (buffer->element_type() != x.element_type() || buffer->element_count() != num_ranks * capacity * hidden ||
      src_idx->element_count() != num_ranks * capacity || counts->element_count() != num_ranks) {
    return ffi::Error::InvalidArgument("buffer must be [num_ranks, capacity, H] in x's dtype, src_idx [num_ranks, capacity]");
  }
  std::vector<int32_t> ranks;
  if (auto err = RanksOf(topk_idx, num_experts, num_ranks, &ranks); err.failure()) return err;
  const size_t row_bytes = x.size_bytes() / std::max<int64_t>(tokens, 1);
  const char* src = static_cast<const char*>(x.untyped_data());
  char* dst = static_cast<char*>(buffer->untyped_data());
  int32_t* rows_of = src_idx->typed_data();
  // Each thread owns whole ranks: it scans the tokens in order and copies its ranks' rows.
  ParallelFor(num_ranks, 1, [&](int64_t r_begin, int64_t r_end) {
    for (int64_t r = r_begin; r < r_end; ++r) {
      int64_t n = 0;
      for (int64_t t = 0; t < tokens; ++t) {
        bool hit = false;
        for (int64_t k = 0; k < topk && !hit; ++k) hit = ranks[t * topk + k] == r;
        if (!hit) continue;
        if (n < capacity) {
          std::memcpy(dst + (r * capacity + n) * row_bytes, src + t * row_bytes, row_bytes);
          rows_of[r * capacity + n] = static_cast<int32_t>(t);
        }
        ++n;
      }
      const int64_t kept = std::min(n, capacity);
      std::memset(dst + (r * capacity + kept) * row_bytes, 0, (capacity - kept) * row_bytes);
      std::fill(rows_of + r * capacity + kept, rows_of + (r + 1) * capacity, -1);
      counts->typed_data()[r] = static_cast<int32_t>(kept);
      num_dropped->typed_data()[r] = static_cast<int32_t>(n - kept);
      offsets->typed_data()[r] = static_cast<int32_t>(r * capacity);
    }
  });
  return ffi::Error::Success();
}

inline float Bf16ToF32(uint16_t bits) {
  uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &wide, sizeof(value));
  return value;
}

inline uint16_t F32ToBf16(float value) {  // round to nearest even; NaN stays NaN
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

ffi::Error CombineUnpackImpl(ffi::AnyBuffer rows, ffi::Buffer<ffi::S32> src_idx, ffi::Buffer<ffi::F32> weights,
                             int64_t num_tokens, ffi::Result<ffi::AnyBuffer> out,
                             ffi::ResultBuffer<ffi::S32> inverse_map) {
  const auto type = rows.element_type();
  if (type != ffi::DataType::F32 && type != ffi::DataType::BF16) {
    return ffi::Error::InvalidArgument("rows must be float32 or bfloat16");
  }
  if (rows.dimensions().size() != 3) return ffi::Error::InvalidArgument("rows must be 3-D [R, C, H]");
  const int64_t ranks = rows.dimensions()[0], capacity = rows.dimensions()[1], hidden = rows.dimensions()[2];
  if (src_idx.element_count() != ranks * capacity || weights.element_count() != ranks * capacity ||
      out->element_count() != num_tokens * hidden || out->element_type() != type ||
      inverse_map->element_count() != num_tokens * ranks) {
    return ffi::Error::InvalidArgument("src_idx, weights: must be [R, C]; out: [num_tokens, H] in rows' dtype; "
                                       "inverse_map: [num_tokens, R]");
  }
  // Inverse map (an XLA-owned result, working memory): which row of each rank holds token t,
  // -1 for none, so tokens can be summed independently and in rank order.
  int32_t* row_of = inverse_map->typed_data();
  std::fill(row_of, row_of + num_tokens * ranks, -1);
  const int32_t* sources = src_idx.typed_data();
  for (int64_t r = 0; r < ranks; ++r) {
    for (int64_t i = 0; i < capacity; ++i) {
      const int32_t t = sources[r * capacity + i];
      if (t < -1 || t >= num_tokens) {
        return ffi::Error::InvalidArgument("src_idx: row " + std::to_string(r * capacity + i) + " names token " +
                                           std::to_string(t) + ", outside [-1, " + std::to_string(num_tokens) + ")");
      }
      if (t < 0) continue;
      if (row_of[t * ranks + r] >= 0) {
        return ffi::Error::InvalidArgument("src_idx: token " + std::to_string(t) + " appears twice in rank " +
                                           std::to_string(r));
      }
      row_of[t * ranks + r] = static_cast<int32_t>(i);
    }
  }
  const float* w = weights.typed_data();
  ParallelFor(num_tokens, 16, [&](int64_t t_begin, int64_t t_end) {
    std::vector<float> acc(hidden);
    for (int64_t t = t_begin; t < t_end; ++t) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t r = 0; r < ranks; ++r) {
        const int64_t i = row_of[t * ranks + r];
        if (i < 0) continue;
        const int64_t row = r * capacity + i;
        const float scale = w[row];
        if (type == ffi::DataType::F32) {
          const float* in = static_cast<const float*>(rows.untyped_data()) + row * hidden;
          for (int64_t h = 0; h < hidden; ++h) acc[h] += scale * in[h];
        } else {
          const uint16_t* in = static_cast<const uint16_t*>(rows.untyped_data()) + row * hidden;
          for (int64_t h = 0; h < hidden; ++h) acc[h] += scale * Bf16ToF32(in[h]);
        }
      }
      if (type == ffi::DataType::F32) {
        std::memcpy(static_cast<float*>(out->untyped_data()) + t * hidden, acc.data(), hidden * sizeof(float));
      } else {
        uint16_t* dst = static_cast<uint16_t*>(out->untyped_data()) + t * hidden;
        for (int64_t h = 0; h < hidden; ++h) dst[h] = F32ToBf16(acc[h]);
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DispatchLayoutCpu, DispatchLayoutImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("num_experts")
                                  .Attr<int64_t>("num_ranks")
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::PRED>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DispatchPackCpu, DispatchPackImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("num_experts")
                                  .Attr<int64_t>("num_ranks")
                                  .Attr<int64_t>("capacity")
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(CombineUnpackCpu, CombineUnpackImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("num_tokens")
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::S32>>());
