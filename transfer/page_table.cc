#include "transfer/page_table.h"

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/types/span.h"
#include "transfer/internal/layer_coverage.h"
#include "transfer/topology.h"

namespace kvx::transfer {
namespace {

// [offset, offset + bytes) lies inside [0, limit), without overflow.
bool Inside(uint64_t offset, uint64_t bytes, uint64_t limit) {
  return bytes <= limit && offset <= limit - bytes;
}

absl::Status CheckLayerIds(const std::vector<int64_t>& ids, const Span& span,
                           const char* kind, size_t group) {
  for (size_t i = 0; i < ids.size(); ++i) {
    const bool increasing = i == 0 || ids[i] > ids[i - 1];
    if (!increasing || ids[i] < span.first || ids[i] >= span.end) {
      return absl::InvalidArgumentError(absl::StrCat(
          kind, " layer ids must increase inside the pp layer span: group=", group,
          " index=", i, " layer=", ids[i], " span_first=", span.first,
          " span_end=", span.end));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckPoolIndex(const RankPageTable& table, int64_t pool_index, PoolRole role,
                            const char* kind, size_t group) {
  if (pool_index < 0 || pool_index >= static_cast<int64_t>(table.pools.size()) ||
      table.pools[pool_index].role != role) {
    return absl::InvalidArgumentError(
        absl::StrCat(kind, " group names no pool of its role: group=", group,
                     " pool=", pool_index, " pools=", table.pools.size()));
  }
  return absl::OkStatus();
}

absl::Status CheckPools(const std::vector<Pool>& pools) {
  std::vector<std::pair<uint64_t, uint64_t>> extents;  // [begin, end) per pool
  extents.reserve(pools.size());
  for (size_t i = 0; i < pools.size(); ++i) {
    const Pool& pool = pools[i];
    uint64_t bytes = 0;
    uint64_t end = 0;
    if (pool.slot_bytes == 0 || pool.num_slots <= 0 ||
        __builtin_mul_overflow(pool.slot_bytes, static_cast<uint64_t>(pool.num_slots),
                               &bytes) ||
        __builtin_add_overflow(pool.base_address, bytes, &end)) {
      return absl::InvalidArgumentError(
          absl::StrCat("pool must be nonempty and fit the address space: pool=", i,
                       " base=", pool.base_address, " slot_bytes=", pool.slot_bytes,
                       " num_slots=", pool.num_slots));
    }
    extents.emplace_back(pool.base_address, end);
  }
  std::vector<size_t> order(pools.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(),
            [&](size_t a, size_t b) { return extents[a].first < extents[b].first; });
  for (size_t k = 1; k < order.size(); ++k) {
    if (extents[order[k - 1]].second > extents[order[k]].first) {
      return absl::InvalidArgumentError(absl::StrCat(
          "pools overlap: pool=", order[k - 1], " other=", order[k], " end=",
          extents[order[k - 1]].second, " other_base=", extents[order[k]].first));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckAttentionGroup(const RankPageTable& table, size_t g, const Span& layers,
                                 int64_t heads_per_rank) {
  const AttentionGroup& group = table.attention_groups[g];
  if (group.window && *group.window <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "attention window must be positive: group=", g, " window=", *group.window));
  }
  if (group.kv_heads_per_rank != heads_per_rank) {
    return absl::InvalidArgumentError(absl::StrCat(
        "kv heads per rank differ from the rank's tp share: group=", g,
        " kv_heads_per_rank=", group.kv_heads_per_rank, " expected=", heads_per_rank));
  }
  if (absl::Status s = CheckLayerIds(group.global_layer_ids, layers, "attention", g);
      !s.ok()) {
    return s;
  }
  if (group.view.layers.size() != group.global_layer_ids.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "pool view needs one entry per layer: group=", g, " entries=",
        group.view.layers.size(), " layers=", group.global_layer_ids.size()));
  }
  if (absl::Status s = CheckPoolIndex(table, group.view.pool_index, PoolRole::kKVCache,
                                      "attention", g);
      !s.ok()) {
    return s;
  }
  const uint64_t slot_bytes = table.pools[group.view.pool_index].slot_bytes;
  const uint64_t buffer_bytes = KVBufferBytes(table, group);
  for (size_t i = 0; i < group.view.layers.size(); ++i) {
    const LayerBuffers& entry = group.view.layers[i];
    if (!Inside(entry.k_offset, buffer_bytes, slot_bytes) ||
        (!table.is_mla && !Inside(entry.v_offset, buffer_bytes, slot_bytes))) {
      return absl::InvalidArgumentError(absl::StrCat(
          "kv buffer outside its slot: group=", g, " layer=", group.global_layer_ids[i],
          " k_offset=", entry.k_offset, " v_offset=", entry.v_offset,
          " buffer_bytes=", buffer_bytes, " slot_bytes=", slot_bytes));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckStateGroup(const RankPageTable& table, size_t g, const Span& layers) {
  const StateGroup& group = table.state_groups[g];
  if (absl::Status s = CheckLayerIds(group.global_layer_ids, layers, "state", g);
      !s.ok()) {
    return s;
  }
  if (group.layers.size() != group.global_layer_ids.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "state group needs one buffer per layer: group=", g,
        " entries=", group.layers.size(), " layers=", group.global_layer_ids.size()));
  }
  if (absl::Status s =
          CheckPoolIndex(table, group.pool_index, PoolRole::kMambaState, "state", g);
      !s.ok()) {
    return s;
  }
  const uint64_t slot_bytes = table.pools[group.pool_index].slot_bytes;
  for (size_t i = 0; i < group.layers.size(); ++i) {
    const StateBuffer& buffer = group.layers[i];
    if (buffer.bytes == 0 || !Inside(buffer.offset, buffer.bytes, slot_bytes)) {
      return absl::InvalidArgumentError(
          absl::StrCat("state buffer empty or outside its slot: group=", g,
                       " layer=", group.global_layer_ids[i], " offset=", buffer.offset,
                       " bytes=", buffer.bytes, " slot_bytes=", slot_bytes));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckSliceGroups(const RankPageTable& table) {
  if (table.slice_groups.empty()) return absl::OkStatus();
  const int64_t num_groups = static_cast<int64_t>(table.attention_groups.size());
  std::vector<int> seen(table.attention_groups.size(), 0);
  for (size_t i = 0; i < table.slice_groups.size(); ++i) {
    const int64_t g = table.slice_groups[i];
    if (g == kStateSliceGroup) continue;
    if (g < 0 || g >= num_groups || seen[g]++ > 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "slice group names no attention group or one twice: slice_group=", i,
          " attention_group=", g, " groups=", num_groups));
    }
  }
  for (int64_t g = 0; g < num_groups; ++g) {
    if (seen[g] == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("attention group missing from slice groups: attention_group=", g));
    }
  }
  return absl::OkStatus();
}

// Both tables list each global layer under the same group index (the indices are
// shared by both instances); a layer under different groups means the two sides
// pair block lists of different groups.
absl::Status CheckLayerGroupsAgree(const RankPageTable& self, const RankPageTable& peer) {
  std::vector<std::pair<int64_t, size_t>> layers;  // (global layer, group) of self
  for (size_t g = 0; g < self.attention_groups.size(); ++g) {
    for (int64_t id : self.attention_groups[g].global_layer_ids)
      layers.push_back({id, g});
  }
  std::sort(layers.begin(), layers.end());
  for (size_t g = 0; g < peer.attention_groups.size(); ++g) {
    for (int64_t id : peer.attention_groups[g].global_layer_ids) {
      auto it =
          std::lower_bound(layers.begin(), layers.end(), std::make_pair(id, size_t{0}));
      if (it != layers.end() && it->first == id && it->second != g) {
        return absl::FailedPreconditionError(
            absl::StrCat("incompatible ranks: field=layer_group layer=", id,
                         " self=", it->second, " peer=", g));
      }
    }
  }
  return absl::OkStatus();
}

template <typename T>
absl::Status Differ(const char* field, const T& self, const T& peer) {
  return absl::FailedPreconditionError(
      absl::StrCat("incompatible ranks: field=", field, " self=", self, " peer=", peer));
}

}  // namespace

uint64_t HeadBlockBytes(const RankPageTable& table) {
  return static_cast<uint64_t>(table.tokens_per_block) *
         static_cast<uint64_t>(table.head_size) *
         static_cast<uint64_t>(table.element_bytes);
}

uint64_t KVBufferBytes(const RankPageTable& table, const AttentionGroup& group) {
  return static_cast<uint64_t>(group.kv_heads_per_rank) * HeadBlockBytes(table);
}

absl::Status ValidatePageTable(const RankPageTable& table) {
  // Bounds far above any real model keep every product below 2^64.
  constexpr int64_t kMaxDimension = int64_t{1} << 20;
  const std::pair<const char*, int64_t> dimensions[] = {
      {"tokens_per_block", table.tokens_per_block},
      {"head_size", table.head_size},
      {"element_bytes", table.element_bytes},
      {"num_kv_heads", table.num_kv_heads},
  };
  for (const auto& [name, value] : dimensions) {
    if (value <= 0 || value > kMaxDimension) {
      return absl::InvalidArgumentError(
          absl::StrCat(name, " must be in [1, 2^20]: ", name, "=", value));
    }
  }
  // Each dimension fits 20 bits, but the whole-model buffer size could still pass
  // 2^64; then no buffer offset or size computed from them can be trusted.
  uint64_t all_heads_bytes = 0;
  if (__builtin_mul_overflow(HeadBlockBytes(table),
                             static_cast<uint64_t>(table.num_kv_heads),
                             &all_heads_bytes)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "kv buffer size overflows: tokens_per_block=", table.tokens_per_block,
        " head_size=", table.head_size, " element_bytes=", table.element_bytes,
        " num_kv_heads=", table.num_kv_heads));
  }
  absl::StatusOr<HeadShard> shard =
      TpHeadShard(table.topology, HeadModel{table.num_kv_heads, table.is_mla});
  if (!shard.ok()) return shard.status();
  if (absl::Status s = CheckPools(table.pools); !s.ok()) return s;
  const Span layers = PpLayerSpan(table.topology);
  for (size_t g = 0; g < table.attention_groups.size(); ++g) {
    if (absl::Status s = CheckAttentionGroup(table, g, layers, shard->heads.size());
        !s.ok()) {
      return s;
    }
  }
  for (size_t g = 0; g < table.state_groups.size(); ++g) {
    if (absl::Status s = CheckStateGroup(table, g, layers); !s.ok()) return s;
  }
  std::vector<absl::Span<const int64_t>> groups;
  groups.reserve(table.attention_groups.size());
  for (const AttentionGroup& group : table.attention_groups) {
    groups.push_back(group.global_layer_ids);
  }
  std::vector<int64_t> state_layers;
  for (const StateGroup& group : table.state_groups) {
    state_layers.insert(state_layers.end(), group.global_layer_ids.begin(),
                        group.global_layer_ids.end());
  }
  std::sort(state_layers.begin(), state_layers.end());
  state_layers.erase(std::unique(state_layers.begin(), state_layers.end()),
                     state_layers.end());
  if (absl::Status s = transfer_internal::CheckLayerCoverage(layers.first, layers.end,
                                                             groups, state_layers);
      !s.ok()) {
    return s;
  }
  return CheckSliceGroups(table);
}

absl::Status CheckCompatible(const RankPageTable& self, const RankPageTable& peer) {
  if (self.tokens_per_block != peer.tokens_per_block) {
    return Differ("tokens_per_block", self.tokens_per_block, peer.tokens_per_block);
  }
  if (self.head_size != peer.head_size) {
    return Differ("head_size", self.head_size, peer.head_size);
  }
  if (self.element_bytes != peer.element_bytes) {
    return Differ("element_bytes", self.element_bytes, peer.element_bytes);
  }
  if (TotalLayers(self.topology) != TotalLayers(peer.topology)) {
    return Differ("total_layers", TotalLayers(self.topology), TotalLayers(peer.topology));
  }
  if (self.is_mla != peer.is_mla) {
    return Differ("is_mla", static_cast<int>(self.is_mla), static_cast<int>(peer.is_mla));
  }
  if (!self.is_mla && self.num_kv_heads != peer.num_kv_heads) {
    return Differ("num_kv_heads", self.num_kv_heads, peer.num_kv_heads);
  }
  if (self.attention_groups.size() != peer.attention_groups.size()) {
    return Differ("attention_groups", self.attention_groups.size(),
                  peer.attention_groups.size());
  }
  for (size_t g = 0; g < self.attention_groups.size(); ++g) {
    const std::optional<int64_t>& a = self.attention_groups[g].window;
    const std::optional<int64_t>& b = peer.attention_groups[g].window;
    if (a != b) {
      return absl::FailedPreconditionError(
          absl::StrCat("incompatible ranks: field=window group=", g, " self=", a ? *a : 0,
                       " peer=", b ? *b : 0));
    }
  }
  if (self.slice_groups != peer.slice_groups) {
    return absl::FailedPreconditionError(absl::StrCat(
        "incompatible ranks: field=slice_groups self_size=", self.slice_groups.size(),
        " peer_size=", peer.slice_groups.size()));
  }
  return CheckLayerGroupsAgree(self, peer);
}

}  // namespace kvx::transfer
