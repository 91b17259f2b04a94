// The KV pattern, markers and free slots: 8 bytes at a time from splitmix64, so that
// a demo on two cores can fill and check gigabytes.

#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "tools/transceiver_harness.h"
#include "transfer/page_table.h"
#include "transfer/scenario.h"

namespace kvx::harness {
namespace {

constexpr uint64_t kGolden = 0x9e3779b97f4a7c15ULL;
// Domains, so that a pattern, a marker and a free slot never share a seed.
constexpr uint64_t kMarkerDomain = 0x6d61726b65720001ULL;
constexpr uint64_t kFreeDomain = 0x667265650000002ULL;

inline uint64_t Mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

uint64_t RowSeed(uint64_t rid, int64_t layer, int64_t kv, int64_t head, int64_t token) {
  uint64_t s = Mix(rid + kGolden);
  s = Mix(s ^ (static_cast<uint64_t>(layer) << 32) ^ (static_cast<uint64_t>(head) << 1) ^
          static_cast<uint64_t>(kv));
  return Mix(s ^ static_cast<uint64_t>(token));
}

uint64_t MarkerSeed(uint64_t rid, size_t group, int64_t block) {
  return Mix(Mix(rid ^ kMarkerDomain) ^ (static_cast<uint64_t>(group) << 48) ^
             static_cast<uint64_t>(block));
}

uint64_t FreeSeed(size_t group, int64_t slot) {
  return Mix(kFreeDomain ^ (static_cast<uint64_t>(group) << 48) ^ static_cast<uint64_t>(slot));
}

// Word j of a run: Mix(seed + j * golden) for the KV pattern (no dependency between
// words, so the compiler may interleave them), or just seed + j * golden for
// markers and free slots, whose only duty is to differ from any pattern a write
// could leave (their seeds are mixed), at the cost of an add.
template <bool kMixed>
inline uint64_t Word(uint64_t seed, uint64_t j) {
  return kMixed ? Mix(seed + j * kGolden) : seed + j * kGolden;
}

template <bool kMixed>
void FillWords(uint8_t* p, uint64_t n, uint64_t seed) {
  const uint64_t words = n / 8;
  for (uint64_t j = 0; j < words; ++j) {
    const uint64_t w = Word<kMixed>(seed, j);
    std::memcpy(p + 8 * j, &w, 8);
  }
  if (n % 8 != 0) {
    const uint64_t w = Word<kMixed>(seed, words);
    std::memcpy(p + 8 * words, &w, n % 8);
  }
}

// The first byte of a run that differs from its words, or nullopt.
template <bool kMixed>
std::optional<RankLayout::Mismatch> CheckWords(const uint8_t* p, uint64_t n, uint64_t seed) {
  const uint64_t words = n / 8;
  uint64_t diff = 0;
  for (uint64_t j = 0; j < words; ++j) {
    uint64_t got = 0;
    std::memcpy(&got, p + 8 * j, 8);
    diff |= got ^ Word<kMixed>(seed, j);
  }
  if (diff == 0 && n % 8 == 0) return std::nullopt;
  // Rare: find the byte.
  for (uint64_t j = 0; j < (n + 7) / 8; ++j) {
    const uint64_t w = Word<kMixed>(seed, j);
    for (uint64_t b = 0; b < 8 && 8 * j + b < n; ++b) {
      const uint8_t expected = static_cast<uint8_t>(w >> (8 * b));
      const uint8_t actual = p[8 * j + b];
      if (expected != actual) return RankLayout::Mismatch{8 * j + b, expected, actual, ""};
    }
  }
  return std::nullopt;
}

}  // namespace

absl::StatusOr<RankLayout> RankLayout::Create(const transfer::ModelSpec& model,
                                              const transfer::RankPageTable& table) {
  RankLayout layout;
  const transfer::Topology& t = table.topology;
  // The heads this rank owns, from the model and its position alone (as the KV
  // oracle in testing/ does), not from the planner's topology code.
  if (model.is_mla) {
    layout.first_head_ = 0;
    layout.heads_ = 1;
  } else if (t.attention_dp) {
    layout.heads_ = model.num_kv_heads;
  } else if (t.tp_size <= model.num_kv_heads) {
    layout.heads_ = model.num_kv_heads / t.tp_size;
    layout.first_head_ = t.tp_rank * layout.heads_;
  } else {
    layout.heads_ = 1;
    layout.first_head_ = t.tp_rank * model.num_kv_heads / t.tp_size;
  }
  layout.kvs_ = model.is_mla ? 1 : 2;
  layout.tokens_per_block_ = model.tokens_per_block;
  layout.token_bytes_ = static_cast<uint64_t>(model.head_size * model.element_bytes);
  if (table.attention_groups.size() != model.groups.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "page table and model disagree on the groups: groups=", table.attention_groups.size(),
        " model_groups=", model.groups.size()));
  }
  const uint64_t buffer = static_cast<uint64_t>(layout.heads_) * layout.tokens_per_block_ *
                          layout.token_bytes_;
  for (size_t g = 0; g < table.attention_groups.size(); ++g) {
    const transfer::AttentionGroup& group = table.attention_groups[g];
    if (group.kv_heads_per_rank != layout.heads_) {
      return absl::InvalidArgumentError(absl::StrCat(
          "page table and model disagree on this rank's heads: group=", g,
          " kv_heads_per_rank=", group.kv_heads_per_rank, " expected=", layout.heads_));
    }
    Group out;
    out.pool = group.view.pool_index;
    out.slot_bytes = table.pools[out.pool].slot_bytes;
    out.layers = group.global_layer_ids;
    out.buffers = group.view.layers;
    // The checks below rely on the rows tiling the slot (the standard layout), so
    // that "every byte of a received block is the pattern" leaves nothing out.
    const uint64_t rows = out.layers.size() * layout.kvs_ * buffer;
    if (!out.layers.empty() && rows != out.slot_bytes) {
      return absl::InvalidArgumentError(absl::StrCat(
          "slot is not tiled by its layers' buffers (not the standard layout): group=", g,
          " slot_bytes=", out.slot_bytes, " buffers_bytes=", rows));
    }
    layout.groups_.push_back(std::move(out));
  }
  return layout;
}

template <typename Row>
void RankLayout::ForRows(uint64_t rid, size_t group, int64_t block, Row row) const {
  const Group& g = groups_[group];
  const uint64_t head_bytes = tokens_per_block_ * token_bytes_;
  for (size_t i = 0; i < g.layers.size(); ++i) {
    for (int64_t kv = 0; kv < kvs_; ++kv) {
      const uint64_t base = kv == 0 ? g.buffers[i].k_offset : g.buffers[i].v_offset;
      for (int64_t h = 0; h < heads_; ++h) {
        for (int64_t t = 0; t < tokens_per_block_; ++t) {
          const int64_t token = block * tokens_per_block_ + t;
          if (!row(base + h * head_bytes + t * token_bytes_,
                   RowSeed(rid, g.layers[i], kv, first_head_ + h, token), g.layers[i], kv,
                   first_head_ + h, token)) {
            return;
          }
        }
      }
    }
  }
}

void RankLayout::FillBlock(uint64_t rid, size_t group, int64_t block, uint8_t* slot) const {
  ForRows(rid, group, block, [&](uint64_t offset, uint64_t seed, int64_t, int64_t, int64_t, int64_t) {
    FillWords<true>(slot + offset, token_bytes_, seed);
    return true;
  });
}

std::optional<RankLayout::Mismatch> RankLayout::CheckBlock(uint64_t rid, size_t group,
                                                           int64_t block,
                                                           const uint8_t* slot) const {
  std::optional<Mismatch> found;
  ForRows(rid, group, block,
          [&](uint64_t offset, uint64_t seed, int64_t layer, int64_t kv, int64_t head,
              int64_t token) {
            found = CheckWords<true>(slot + offset, token_bytes_, seed);
            if (!found.has_value()) return true;
            found->where = absl::StrCat("layer=", layer, " kv=", kv == 0 ? "k" : "v",
                                        " head=", head, " token=", token,
                                        " byte=", found->offset);
            found->offset += offset;
            return false;
          });
  return found;
}

void RankLayout::FillMarker(uint64_t rid, size_t group, int64_t block, uint8_t* slot) const {
  FillWords<false>(slot, groups_[group].slot_bytes, MarkerSeed(rid, group, block));
}

std::optional<RankLayout::Mismatch> RankLayout::CheckMarker(uint64_t rid, size_t group,
                                                            int64_t block,
                                                            const uint8_t* slot) const {
  std::optional<Mismatch> found =
      CheckWords<false>(slot, groups_[group].slot_bytes, MarkerSeed(rid, group, block));
  if (found.has_value()) found->where = "marker";
  return found;
}

void RankLayout::FillFree(size_t group, int64_t slot_id, uint8_t* slot) const {
  FillWords<false>(slot, groups_[group].slot_bytes, FreeSeed(group, slot_id));
}

std::optional<RankLayout::Mismatch> RankLayout::CheckFree(size_t group, int64_t slot_id,
                                                          const uint8_t* slot) const {
  std::optional<Mismatch> found =
      CheckWords<false>(slot, groups_[group].slot_bytes, FreeSeed(group, slot_id));
  if (found.has_value()) found->where = "free slot";
  return found;
}

}  // namespace kvx::harness
