// File: testing/fake_cache_managers.h
//
// In-memory cache managers of both styles, for tests of the reuse adapters and of
// anything built on them. Each holds, per request, exactly what the engine's manager
// would answer, and records commits.
//
//   FakeBlockTableCacheManager v1;
//   v1.AddRequest(17, /*prepopulated_prompt_len=*/100, {{10, 11, 12}, {-1, 21, 22}});
//   V1Adapter adapter(&v1, ReuseOptions{true});
//
// Thread safety: not thread-safe.

#ifndef KVX_TESTING_FAKE_CACHE_MANAGERS_H_
#define KVX_TESTING_FAKE_CACHE_MANAGERS_H_

#include <cstdint>
#include <optional>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "cache_reuse/v1_adapter.h"
#include "cache_reuse/v2_adapter.h"
#include "transfer/slice.h"

namespace kvx::testing {

// A V1-style manager: positional tables as kept, a prepopulated prompt length.
class FakeBlockTableCacheManager final : public cache_reuse::BlockTableCacheManager {
 public:
  // `tables` holds one positional table per layer group.
  void AddRequest(int64_t request_id, int64_t prepopulated_prompt_len,
                  std::vector<transfer::BlockList> tables);

  absl::StatusOr<int64_t> PrepopulatedPromptLen(int64_t request_id) const override;
  absl::StatusOr<transfer::BlockList> BlockTable(int64_t request_id,
                                                 int layer_group) const override;
  absl::Status StoreBlocksForReuse(int64_t request_id) override;

  bool stored_for_reuse(int64_t request_id) const { return stored_.contains(request_id); }

 private:
  struct Request {
    int64_t prepopulated_prompt_len;
    std::vector<transfer::BlockList> tables;
  };
  absl::flat_hash_map<int64_t, Request> requests_;
  absl::flat_hash_set<int64_t> stored_;
};

// A V2-style manager: committed-token counts and only the valid pages.
class FakePagedCacheManager final : public cache_reuse::PagedCacheManager {
 public:
  // `num_committed_tokens` nullopt: the manager does not know the request's
  // count (NumCommittedTokens answers nullopt) but still has its pages.
  void AddRequest(int64_t request_id, std::optional<int64_t> num_committed_tokens,
                  std::vector<cache_reuse::ValidPages> pages, bool has_cache = true);
  // Splits positional tables into (dropped leading kEvictedBlock count, the rest),
  // as a manager that frees the stale head of a window would keep them.
  void AddRequestFromTables(int64_t request_id,
                            std::optional<int64_t> num_committed_tokens,
                            const std::vector<transfer::BlockList>& tables,
                            bool has_cache = true);

  std::optional<int64_t> NumCommittedTokens(int64_t request_id) const override;
  absl::StatusOr<cache_reuse::ValidPages> Pages(int64_t request_id,
                                                int layer_group) const override;
  bool HasCache(int64_t request_id) const override;
  absl::Status Commit(int64_t request_id) override;

  bool committed(int64_t request_id) const { return committed_.contains(request_id); }

 private:
  struct Request {
    std::optional<int64_t> num_committed_tokens;
    std::vector<cache_reuse::ValidPages> pages;
    bool has_cache;
  };
  absl::flat_hash_map<int64_t, Request> requests_;
  absl::flat_hash_set<int64_t> committed_;
};

}  // namespace kvx::testing

#endif  // KVX_TESTING_FAKE_CACHE_MANAGERS_H_
