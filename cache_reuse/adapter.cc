#include "cache_reuse/adapter.h"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/types/span.h"
#include "transfer/slice.h"

namespace kvx::cache_reuse {
namespace {

using transfer::BlockList;
using transfer::ComputeWindowBlocks;
using transfer::WindowBlocks;

absl::Status WithContext(const absl::Status& status, int64_t request_id, size_t group) {
  return absl::Status(status.code(), absl::StrCat(status.message(), ": request=",
                                                  request_id, " group=", group));
}

}  // namespace

absl::StatusOr<std::vector<int64_t>> CachedTokensPerGroup(
    int64_t global_cached_tokens, int64_t prompt_len,
    absl::Span<const LayerGroupSpec> groups, int64_t tokens_per_block) {
  if (global_cached_tokens < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "cached token count must not be negative: cached_tokens=", global_cached_tokens));
  }
  std::vector<int64_t> cached(groups.size(), global_cached_tokens);
  for (size_t g = 0; g < groups.size(); ++g) {
    const LayerGroupSpec& group = groups[g];
    const bool windowed = group.kind == LayerGroupSpec::Kind::kAttention && group.window;
    absl::StatusOr<WindowBlocks> blocks = ComputeWindowBlocks(
        prompt_len, windowed ? group.window : std::nullopt, tokens_per_block);
    if (!blocks.ok()) {
      return absl::Status(blocks.status().code(),
                          absl::StrCat(blocks.status().message(), ": group=", g));
    }
    // Stale blocks of a window count as already skipped, even with no cache hit.
    cached[g] = std::max(global_cached_tokens, blocks->stale_end * tokens_per_block);
  }
  return cached;
}

absl::StatusOr<BuiltSlice> BuildSlice(const CacheReuseAdapter& adapter,
                                      const SliceRequest& request,
                                      absl::Span<const LayerGroupSpec> groups) {
  BuiltSlice built;
  if (absl::Status s = BuildSliceInto(adapter, request, groups, &built); !s.ok()) return s;
  return built;
}

absl::StatusOr<int64_t> CacheReuseAdapter::BlockRangeInto(int64_t request_id, int layer_group,
                                                          int64_t first, int64_t end,
                                                          transfer::BlockList* out) const {
  absl::StatusOr<BlockList> table = PositionalBlockTable(request_id, layer_group);
  if (!table.ok()) return table.status();
  const int64_t length = static_cast<int64_t>(table->size());
  out->clear();
  if (first < std::min(end, length)) {
    out->assign(table->begin() + first, table->begin() + std::min(end, length));
  }
  return length;
}

absl::Status BuildSliceInto(const CacheReuseAdapter& adapter, const SliceRequest& request,
                            absl::Span<const LayerGroupSpec> groups, BuiltSlice* out) {
  const int64_t tpb = request.tokens_per_block;
  if (tpb <= 0 || request.prompt_len < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "bad slice request: request=", request.request_id,
        " prompt_len=", request.prompt_len, " tpb=", tpb));
  }
  if (request.token_range && request.token_range->end() > request.prompt_len) {
    return absl::InvalidArgumentError(absl::StrCat(
        "token range ends past the prompt: request=", request.request_id,
        " start=", request.token_range->start(), " end=", request.token_range->end(),
        " prompt_len=", request.prompt_len));
  }

  BuiltSlice& built = *out;
  transfer::KVSlice& slice = built.slice;
  slice.token_range = request.token_range;
  slice.layer_range.reset();
  slice.mamba_state_index.reset();
  if (!slice.token_range && request.prompt_len > 0) {
    slice.token_range = transfer::TokenRange::Create(0, request.prompt_len).value();
  }
  const int64_t end = slice.token_range ? slice.token_range->end() : 0;
  slice.is_last_slice = end == request.prompt_len;

  // Only a generation-only request on the generation side may reuse its cache.
  int64_t global_cached = 0;
  if (request.side == Side::kGeneration && request.generation_only) {
    absl::StatusOr<int64_t> global = adapter.GlobalCachedTokens(request.request_id, tpb);
    if (!global.ok()) {
      return absl::Status(global.status().code(),
                          absl::StrCat(global.status().message(),
                                       ": request=", request.request_id));
    }
    global_cached = *global;
  }
  absl::StatusOr<std::vector<int64_t>> cached =
      CachedTokensPerGroup(global_cached, request.prompt_len, groups, tpb);
  if (!cached.ok()) return cached.status();
  built.cached_tokens = *std::move(cached);

  const int64_t total = transfer::CeilDiv(end, tpb);
  slice.block_ids_per_layer_group.resize(groups.size());
  for (transfer::BlockList& list : slice.block_ids_per_layer_group) list.clear();
  for (size_t g = 0; g < groups.size(); ++g) {
    if (groups[g].kind == LayerGroupSpec::Kind::kMamba) continue;
    // cached_tokens already holds max(global, stale_end * tpb) for a window.
    const int64_t first = built.cached_tokens[g] / tpb;
    if (first >= total) continue;

    BlockList& list = slice.block_ids_per_layer_group[g];
    absl::StatusOr<int64_t> table_len =
        adapter.BlockRangeInto(request.request_id, static_cast<int>(g), first, total, &list);
    if (!table_len.ok()) return WithContext(table_len.status(), request.request_id, g);
    if (*table_len < total) {
      list.clear();
      return absl::FailedPreconditionError(absl::StrCat(
          "block table shorter than the slice needs: request=", request.request_id,
          " group=", g, " table_len=", *table_len, " needed=", total, " tpb=", tpb));
    }
    for (size_t i = 0; i < list.size(); ++i) {
      if (list[i] < 0) {
        return absl::FailedPreconditionError(absl::StrCat(
            "a block the transfer needs is not held: request=", request.request_id,
            " group=", g, " block=", first + static_cast<int64_t>(i), " id=", list[i]));
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace kvx::cache_reuse
