// File: cache_reuse/v2_adapter.h
//
// The adapter over a V2-style paged cache manager: it counts committed tokens per
// request and keeps only the pages still valid, having dropped the stale head of a
// sliding window. The adapter puts the pages back at their positions, so a dropped
// head can never shift the pairing (SEMANTICS.md section 3).
//
//   class MyPagedManager : public kvx::cache_reuse::PagedCacheManager { ... };
//   MyPagedManager manager;
//   kvx::cache_reuse::V2Adapter adapter(&manager, ReuseOptions{true});
//
// Thread safety: as thread-safe as the manager; the adapter holds no mutable state.

#ifndef KVX_CACHE_REUSE_V2_ADAPTER_H_
#define KVX_CACHE_REUSE_V2_ADAPTER_H_

#include <cstdint>
#include <optional>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "cache_reuse/adapter.h"
#include "transfer/slice.h"

namespace kvx::cache_reuse {

// The pages a V2-style manager still holds for one request and layer group.
struct ValidPages {
  // Leading blocks the manager dropped (the stale head of a window): pages[0] is
  // block num_dropped_leading. REQUIRES: >= 0.
  int64_t num_dropped_leading = 0;
  // Consecutive blocks from there on, draft-token blocks at the tail.
  transfer::BlockList pages;
};

// The inverse of V2Adapter::PositionalBlockTable: the leading kEvictedBlock entries
// of a positional table become num_dropped_leading, the rest the pages (for managers
// and tools that hold plain positional tables).
ValidPages SplitPositionalTable(const transfer::BlockList& table);

// What an engine's V2-style (paged) cache manager must answer.
class PagedCacheManager {
 public:
  virtual ~PagedCacheManager() = default;

  // Tokens of the request committed to the cache; nullopt when the manager does
  // not know the request.
  virtual std::optional<int64_t> NumCommittedTokens(int64_t request_id) const = 0;

  // The valid pages of one layer group. NotFound for an unknown request.
  virtual absl::StatusOr<ValidPages> Pages(int64_t request_id, int layer_group) const = 0;

  // Whether the request has a cache its received blocks can be committed to.
  virtual bool HasCache(int64_t request_id) const = 0;

  // Commits the request's blocks for reuse.
  virtual absl::Status Commit(int64_t request_id) = 0;
};

class V2Adapter final : public CacheReuseAdapter {
 public:
  // `manager` must outlive the adapter.
  V2Adapter(PagedCacheManager* manager, ReuseOptions options)
      : manager_(manager), options_(options) {}

  // (num_committed_tokens // tpb) * tpb; 0 for an unknown request or when reuse is
  // disabled.
  absl::StatusOr<int64_t> GlobalCachedTokens(int64_t request_id,
                                             int64_t tokens_per_block) const override;
  // kEvictedBlock for each dropped block, then the pages. InvalidArgument for a
  // negative drop count.
  absl::StatusOr<transfer::BlockList> PositionalBlockTable(
      int64_t request_id, int layer_group) const override;
  // Commit when reuse is enabled and the request has a cache.
  absl::StatusOr<int64_t> BlockRangeInto(int64_t request_id, int layer_group, int64_t first,
                                         int64_t end, transfer::BlockList* out) const override;
  absl::Status CommitReceivedBlocks(int64_t request_id) override;

 private:
  PagedCacheManager* const manager_;
  const ReuseOptions options_;
};

}  // namespace kvx::cache_reuse

#endif  // KVX_CACHE_REUSE_V2_ADAPTER_H_
