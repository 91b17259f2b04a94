// The reference engine's V2-style cache manager: a free list of slots per group.

#include <cstdint>
#include <optional>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/types/span.h"
#include "cache_reuse/adapter.h"
#include "cache_reuse/v2_adapter.h"
#include "sync/mutex.h"
#include "tools/transceiver_harness.h"
#include "transfer/slice.h"

namespace kvx::harness {

DemoCacheManager::DemoCacheManager(size_t num_groups, int64_t num_slots) {
  sync::MutexLock lock(&mu_);
  free_.resize(num_groups);
  for (std::vector<int64_t>& list : free_) {
    // Popped from the back: slot 0 first, so consecutive requests get runs of
    // consecutive slots, which coalesce into few writes as in a fresh engine.
    for (int64_t slot = num_slots - 1; slot >= 0; --slot) list.push_back(slot);
  }
}

absl::StatusOr<std::vector<transfer::BlockList>> DemoCacheManager::Allocate(
    uint64_t rid, int64_t committed_tokens, absl::Span<const GroupNeed> needs) {
  sync::MutexLock lock(&mu_);
  if (needs.size() != free_.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "one need per group: request=", rid, " needs=", needs.size(), " groups=", free_.size()));
  }
  if (requests_.contains(rid)) {
    return absl::AlreadyExistsError(absl::StrCat("request holds slots already: request=", rid));
  }
  for (size_t g = 0; g < needs.size(); ++g) {
    const int64_t held = needs[g].blocks - needs[g].dropped;
    if (needs[g].dropped < 0 || held < 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "negative need: request=", rid, " group=", g, " blocks=", needs[g].blocks,
          " dropped=", needs[g].dropped));
    }
    if (held > static_cast<int64_t>(free_[g].size())) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "out of slots: request=", rid, " group=", g, " need=", held,
          " free=", free_[g].size()));
    }
  }
  Request request;
  request.committed_tokens = committed_tokens;
  for (size_t g = 0; g < needs.size(); ++g) {
    transfer::BlockList table(static_cast<size_t>(needs[g].blocks), cache_reuse::kEvictedBlock);
    for (int64_t b = needs[g].dropped; b < needs[g].blocks; ++b) {
      table[b] = free_[g].back();
      free_[g].pop_back();
    }
    request.tables.push_back(std::move(table));
  }
  std::vector<transfer::BlockList> tables = request.tables;
  requests_.emplace(rid, std::move(request));
  return tables;
}

absl::Status DemoCacheManager::Release(uint64_t rid) {
  sync::MutexLock lock(&mu_);
  auto it = requests_.find(rid);
  if (it == requests_.end()) {
    return absl::NotFoundError(absl::StrCat("request holds no slots: request=", rid));
  }
  for (size_t g = 0; g < it->second.tables.size(); ++g) {
    const transfer::BlockList& table = it->second.tables[g];
    // Back in reverse, so the next request gets them in the same order.
    for (auto slot = table.rbegin(); slot != table.rend(); ++slot) {
      if (*slot != cache_reuse::kEvictedBlock) free_[g].push_back(*slot);
    }
  }
  requests_.erase(it);
  return absl::OkStatus();
}

std::optional<int64_t> DemoCacheManager::NumCommittedTokens(int64_t request_id) const {
  sync::MutexLock lock(&mu_);
  auto it = requests_.find(static_cast<uint64_t>(request_id));
  if (it == requests_.end()) return std::nullopt;
  return it->second.committed_tokens;
}

absl::StatusOr<cache_reuse::ValidPages> DemoCacheManager::Pages(int64_t request_id,
                                                                int layer_group) const {
  sync::MutexLock lock(&mu_);
  auto it = requests_.find(static_cast<uint64_t>(request_id));
  if (it == requests_.end()) {
    return absl::NotFoundError(absl::StrCat("unknown request: request=", request_id));
  }
  if (layer_group < 0 || layer_group >= static_cast<int>(it->second.tables.size())) {
    return absl::OutOfRangeError(absl::StrCat("no such layer group: request=", request_id,
                                              " group=", layer_group));
  }
  // A V2 manager keeps only the pages it holds and how many it dropped in front.
  return cache_reuse::SplitPositionalTable(it->second.tables[layer_group]);
}

bool DemoCacheManager::HasCache(int64_t request_id) const {
  sync::MutexLock lock(&mu_);
  return requests_.contains(static_cast<uint64_t>(request_id));
}

absl::Status DemoCacheManager::Commit(int64_t request_id) {
  sync::MutexLock lock(&mu_);
  auto it = requests_.find(static_cast<uint64_t>(request_id));
  if (it == requests_.end()) {
    return absl::NotFoundError(absl::StrCat("commit of an unknown request: request=", request_id));
  }
  it->second.committed = true;
  return absl::OkStatus();
}

bool DemoCacheManager::committed(uint64_t rid) const {
  sync::MutexLock lock(&mu_);
  auto it = requests_.find(rid);
  return it != requests_.end() && it->second.committed;
}

int64_t DemoCacheManager::free_slots(size_t group) const {
  sync::MutexLock lock(&mu_);
  return group < free_.size() ? static_cast<int64_t>(free_[group].size()) : 0;
}

}  // namespace kvx::harness
