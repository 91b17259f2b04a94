// File: cache_reuse/adapter.h
//
// What each side already holds of a request, and the slice it sends or asks for
// (SEMANTICS.md sections 3 and 4). An inference engine implements a small cache-
// manager interface (v1_adapter.h or v2_adapter.h); the adapter turns it into
// per-group cached-token counts and positional block tables; BuildSlice turns those
// into the suffix lists that travel.
//
// Example (generation side, a V1-style manager with prefix reuse on):
//
//   V1Adapter adapter(&my_block_table_manager, ReuseOptions{true});
//   SliceRequest request;
//   request.request_id = 17;
//   request.prompt_len = 256;
//   request.tokens_per_block = 8;
//   request.side = Side::kGeneration;
//   std::vector<LayerGroupSpec> groups = {LayerGroupSpec::Full(),
//                                         LayerGroupSpec::Windowed(64)};
//   absl::StatusOr<BuiltSlice> built = BuildSlice(adapter, request, groups);
//   // built->slice.block_ids_per_layer_group[1] covers blocks [24, 32) only.
//
// Thread safety: BuildSlice and CachedTokensPerGroup are pure. An adapter is as
// thread-safe as the cache manager it wraps; the adapters add no state.

#ifndef KVX_CACHE_REUSE_ADAPTER_H_
#define KVX_CACHE_REUSE_ADAPTER_H_

#include <cstdint>
#include <optional>
#include <vector>

#include "absl/base/attributes.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "transfer/slice.h"

namespace kvx::cache_reuse {

// A positional table entry for a block the manager no longer holds.
inline constexpr int64_t kEvictedBlock = -1;

// One layer group as the slice builder sees it.
struct LayerGroupSpec {
  enum class Kind { kAttention, kMamba };
  Kind kind = Kind::kAttention;
  // Attention window in tokens; nullopt for full attention. Ignored for Mamba.
  std::optional<int64_t> window;

  static LayerGroupSpec Full() { return {Kind::kAttention, std::nullopt}; }
  static LayerGroupSpec Windowed(int64_t window) { return {Kind::kAttention, window}; }
  static LayerGroupSpec Mamba() { return {Kind::kMamba, std::nullopt}; }
};

// Which instance builds the slice.
enum class Side { kContext, kGeneration };

// Whether the local prefix cache may be used.
struct ReuseOptions {
  bool enabled = false;
};

// The interface over an engine's cache manager. Implementations: V1Adapter,
// V2Adapter.
class CacheReuseAdapter {
 public:
  virtual ~CacheReuseAdapter() = default;

  // Prompt tokens of `request_id` that the local cache holds, floored to a block
  // boundary (section 3, "global"); 0 when reuse is disabled or the manager does
  // not know the request. REQUIRES: tokens_per_block > 0.
  virtual absl::StatusOr<int64_t> GlobalCachedTokens(int64_t request_id,
                                                     int64_t tokens_per_block) const = 0;

  // The positional block table of `layer_group`: entry b holds tokens
  // [b * tpb, (b + 1) * tpb), kEvictedBlock where the manager no longer holds it;
  // entries past the prompt's last block are draft-token blocks. Errors come from
  // the manager (an unknown request is NotFound).
  virtual absl::StatusOr<transfer::BlockList> PositionalBlockTable(
      int64_t request_id, int layer_group) const = 0;

  // Positions [first, end) of PositionalBlockTable(request_id, layer_group) into
  // `*out` (replaced, its capacity kept), and the table's whole length: all that
  // BuildSlice needs of a group. A table shorter than `end` gives what it has.
  // The default calls PositionalBlockTable; V1Adapter and V2Adapter copy only the
  // range (planning a long prompt is dominated by copies, not by the math).
  // REQUIRES: 0 <= first <= end.
  virtual absl::StatusOr<int64_t> BlockRangeInto(int64_t request_id, int layer_group,
                                                 int64_t first, int64_t end,
                                                 transfer::BlockList* out) const;

  // Called on the generation side once the whole prompt has arrived: hands the
  // received blocks to the cache for reuse (V1: store for reuse; V2: commit if the
  // request has a cache). A no-op when reuse is disabled.
  virtual absl::Status CommitReceivedBlocks(int64_t request_id) = 0;
};

// Section 3, per group: full attention and Mamba -> global; window W ->
// max(global, stale_end * tpb). Returns InvalidArgument for a negative prompt
// length or global count, tokens_per_block <= 0 or a window <= 0.
ABSL_MUST_USE_RESULT absl::StatusOr<std::vector<int64_t>> CachedTokensPerGroup(
    int64_t global_cached_tokens, int64_t prompt_len,
    absl::Span<const LayerGroupSpec> groups, int64_t tokens_per_block);

// One request's slice to build.
struct SliceRequest {
  int64_t request_id = 0;
  // REQUIRES: >= 0.
  int64_t prompt_len = 0;
  // REQUIRES: > 0.
  int64_t tokens_per_block = 0;
  Side side = Side::kContext;
  // Only generation-only requests on the generation side consult the cache.
  bool generation_only = true;
  // Default: [0, prompt_len) when prompt_len > 0, none otherwise.
  std::optional<transfer::TokenRange> token_range;
};

// A built slice with the counts that explain it.
struct BuiltSlice {
  transfer::KVSlice slice;
  std::vector<int64_t> cached_tokens;  // per group, as used (0 on the context side)
};

// Section 4. Per attention group with end = token_range.end (the prompt length by
// default) and total = cdiv(end, tpb): first = cached / tpb for full attention,
// max(stale_end, cached / tpb) for a window (stale_end from the prompt length);
// the list is table[first : total], empty when first >= total. Mamba groups get an
// empty list. is_last_slice is true when the slice reaches the prompt's end.
//
// Errors: InvalidArgument for a bad request (negative prompt length, tpb <= 0, a
// range past the prompt); FailedPrecondition, naming request, group and block,
// when the table is shorter than total or holds kEvictedBlock inside
// [first, total) (a block the transfer needs is gone); the adapter's errors with
// the group added.
ABSL_MUST_USE_RESULT absl::StatusOr<BuiltSlice> BuildSlice(
    const CacheReuseAdapter& adapter, const SliceRequest& request,
    absl::Span<const LayerGroupSpec> groups);

// BuildSlice into `*out`, keeping the capacity of its lists, so that a caller that
// builds slice after slice with recycled BuiltSlices allocates nothing for them once
// warm. On error `*out` holds partial results.
ABSL_MUST_USE_RESULT absl::Status BuildSliceInto(const CacheReuseAdapter& adapter,
                                                 const SliceRequest& request,
                                                 absl::Span<const LayerGroupSpec> groups,
                                                 BuiltSlice* out);

}  // namespace kvx::cache_reuse

#endif  // KVX_CACHE_REUSE_ADAPTER_H_
