// File: cache_reuse/v1_adapter.h
//
// The adapter over a V1-style cache manager: one positional block table per request
// and layer group, and a prepopulated prompt length that says how much of the
// prompt a prefix-cache hit already supplied (SEMANTICS.md section 3).
//
//   class MyManager : public kvx::cache_reuse::BlockTableCacheManager { ... };
//   MyManager manager;
//   kvx::cache_reuse::V1Adapter adapter(&manager, ReuseOptions{true});
//
// Thread safety: as thread-safe as the manager; the adapter holds no mutable state.

#ifndef KVX_CACHE_REUSE_V1_ADAPTER_H_
#define KVX_CACHE_REUSE_V1_ADAPTER_H_

#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "cache_reuse/adapter.h"
#include "transfer/slice.h"

namespace kvx::cache_reuse {

// What an engine's V1-style (block-table) cache manager must answer.
class BlockTableCacheManager {
 public:
  virtual ~BlockTableCacheManager() = default;

  // Prompt tokens a prefix-cache hit supplied for the request (not yet floored).
  // NotFound for an unknown request.
  virtual absl::StatusOr<int64_t> PrepopulatedPromptLen(int64_t request_id) const = 0;

  // The request's block table for one layer group, positional as kept: entry b
  // holds block b, kEvictedBlock where evicted, draft-token blocks at the tail.
  virtual absl::StatusOr<transfer::BlockList> BlockTable(int64_t request_id,
                                                         int layer_group) const = 0;

  // Makes the request's blocks available for prefix reuse by later requests.
  virtual absl::Status StoreBlocksForReuse(int64_t request_id) = 0;
};

class V1Adapter final : public CacheReuseAdapter {
 public:
  // `manager` must outlive the adapter.
  V1Adapter(BlockTableCacheManager* manager, ReuseOptions options)
      : manager_(manager), options_(options) {}

  // (prepopulated_prompt_len // tpb) * tpb, or 0 when reuse is disabled.
  absl::StatusOr<int64_t> GlobalCachedTokens(int64_t request_id,
                                             int64_t tokens_per_block) const override;
  // The manager's table as it is.
  absl::StatusOr<transfer::BlockList> PositionalBlockTable(
      int64_t request_id, int layer_group) const override;
  // StoreBlocksForReuse when reuse is enabled.
  absl::StatusOr<int64_t> BlockRangeInto(int64_t request_id, int layer_group, int64_t first,
                                         int64_t end, transfer::BlockList* out) const override;
  absl::Status CommitReceivedBlocks(int64_t request_id) override;

 private:
  BlockTableCacheManager* const manager_;
  const ReuseOptions options_;
};

}  // namespace kvx::cache_reuse

#endif  // KVX_CACHE_REUSE_V1_ADAPTER_H_
