#include "testing/fake_cache_managers.h"

#include <cstddef>
#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "cache_reuse/adapter.h"

namespace kvx::testing {
namespace {

absl::Status UnknownRequest(int64_t request_id) {
  return absl::NotFoundError(absl::StrCat("unknown request: request=", request_id));
}

template <typename T>
absl::StatusOr<T> GroupEntry(const std::vector<T>& per_group, int64_t request_id,
                             int layer_group) {
  if (layer_group < 0 || static_cast<size_t>(layer_group) >= per_group.size()) {
    return absl::OutOfRangeError(absl::StrCat("no such layer group: request=", request_id,
                                              " group=", layer_group,
                                              " num_groups=", per_group.size()));
  }
  return per_group[layer_group];
}

}  // namespace

void FakeBlockTableCacheManager::AddRequest(int64_t request_id,
                                            int64_t prepopulated_prompt_len,
                                            std::vector<transfer::BlockList> tables) {
  requests_[request_id] = Request{prepopulated_prompt_len, std::move(tables)};
}

absl::StatusOr<int64_t> FakeBlockTableCacheManager::PrepopulatedPromptLen(
    int64_t request_id) const {
  auto it = requests_.find(request_id);
  if (it == requests_.end()) return UnknownRequest(request_id);
  return it->second.prepopulated_prompt_len;
}

absl::StatusOr<transfer::BlockList> FakeBlockTableCacheManager::BlockTable(
    int64_t request_id, int layer_group) const {
  auto it = requests_.find(request_id);
  if (it == requests_.end()) return UnknownRequest(request_id);
  return GroupEntry(it->second.tables, request_id, layer_group);
}

absl::Status FakeBlockTableCacheManager::StoreBlocksForReuse(int64_t request_id) {
  if (!requests_.contains(request_id)) return UnknownRequest(request_id);
  stored_.insert(request_id);
  return absl::OkStatus();
}

void FakePagedCacheManager::AddRequest(int64_t request_id,
                                       std::optional<int64_t> num_committed_tokens,
                                       std::vector<cache_reuse::ValidPages> pages,
                                       bool has_cache) {
  requests_[request_id] = Request{num_committed_tokens, std::move(pages), has_cache};
}

void FakePagedCacheManager::AddRequestFromTables(
    int64_t request_id, std::optional<int64_t> num_committed_tokens,
    const std::vector<transfer::BlockList>& tables, bool has_cache) {
  std::vector<cache_reuse::ValidPages> pages;
  for (const transfer::BlockList& table : tables) {
    pages.push_back(cache_reuse::SplitPositionalTable(table));
  }
  AddRequest(request_id, num_committed_tokens, std::move(pages), has_cache);
}

std::optional<int64_t> FakePagedCacheManager::NumCommittedTokens(int64_t request_id) const {
  auto it = requests_.find(request_id);
  if (it == requests_.end()) return std::nullopt;
  return it->second.num_committed_tokens;
}

absl::StatusOr<cache_reuse::ValidPages> FakePagedCacheManager::Pages(int64_t request_id,
                                                                     int layer_group) const {
  auto it = requests_.find(request_id);
  if (it == requests_.end()) return UnknownRequest(request_id);
  return GroupEntry(it->second.pages, request_id, layer_group);
}

bool FakePagedCacheManager::HasCache(int64_t request_id) const {
  auto it = requests_.find(request_id);
  return it != requests_.end() && it->second.has_cache;
}

absl::Status FakePagedCacheManager::Commit(int64_t request_id) {
  if (!requests_.contains(request_id)) return UnknownRequest(request_id);
  committed_.insert(request_id);
  return absl::OkStatus();
}

}  // namespace kvx::testing
