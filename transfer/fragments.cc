#include "transfer/fragments.h"

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/types/span.h"
#include "transfer/internal/slot_map.h"
#include "transfer/page_table.h"
#include "transfer/slice.h"
#include "transfer/topology.h"

namespace kvx::transfer {
namespace {

using transfer_internal::SlotMap;
using transfer_internal::SlotPiece;

void AppendPiece(const SlotPiece& piece, std::vector<SlotPiece>* pieces) {
  if (!pieces->empty()) {
    SlotPiece& last = pieces->back();
    if (last.src_offset + last.bytes == piece.src_offset &&
        last.dst_offset + last.bytes == piece.dst_offset) {
      last.bytes += piece.bytes;
      return;
    }
  }
  pieces->push_back(piece);
}

// Calls visit(src_index, dst_index) for each global layer id both lists hold;
// both lists are strictly increasing (ValidatePageTable).
template <typename Visit>
void ForCommonLayers(const std::vector<int64_t>& src, const std::vector<int64_t>& dst,
                     Visit visit) {
  size_t i = 0;
  size_t j = 0;
  while (i < src.size() && j < dst.size()) {
    if (src[i] < dst[j]) {
      ++i;
    } else if (dst[j] < src[i]) {
      ++j;
    } else {
      visit(i++, j++);
    }
  }
}

SlotMap EmptyMap(const RankPageTable& src, int64_t src_pool, const RankPageTable& dst,
                 int64_t dst_pool) {
  SlotMap map;
  map.src_pool = src_pool;
  map.dst_pool = dst_pool;
  map.src_slot_bytes = src.pools[src_pool].slot_bytes;
  map.dst_slot_bytes = dst.pools[dst_pool].slot_bytes;
  map.src_num_slots = src.pools[src_pool].num_slots;
  map.dst_num_slots = dst.pools[dst_pool].num_slots;
  return map;
}

// SEMANTICS.md section 6 for one attention group. The heads both sides hold are
// one run in each K/V buffer, at each side's own head offset; so is a whole
// buffer, and a run of layers whose buffers are adjacent on both sides merges.
SlotMap BuildGroupMap(const RankPageTable& src, const RankPageTable& dst, size_t g,
                      const RankLink& link, const HeadShard& src_shard,
                      const HeadShard& dst_shard) {
  const AttentionGroup& sg = src.attention_groups[g];
  const AttentionGroup& dg = dst.attention_groups[g];
  SlotMap map = EmptyMap(src, sg.view.pool_index, dst, dg.view.pool_index);
  if (!link.writes) return map;
  const uint64_t head_bytes = HeadBlockBytes(src);
  const uint64_t src_run =
      static_cast<uint64_t>(link.heads.first - src_shard.heads.first) * head_bytes;
  const uint64_t dst_run =
      static_cast<uint64_t>(link.heads.first - dst_shard.heads.first) * head_bytes;
  const uint64_t run_bytes = static_cast<uint64_t>(link.heads.size()) * head_bytes;
  int64_t raw_pieces = 0;
  ForCommonLayers(sg.global_layer_ids, dg.global_layer_ids, [&](size_t i, size_t j) {
    const LayerBuffers& s = sg.view.layers[i];
    const LayerBuffers& d = dg.view.layers[j];
    AppendPiece(SlotPiece{s.k_offset + src_run, d.k_offset + dst_run, run_bytes},
                &map.pieces);
    ++raw_pieces;
    if (src.is_mla) return;  // the latent is the only buffer
    AppendPiece(SlotPiece{s.v_offset + src_run, d.v_offset + dst_run, run_bytes},
                &map.pieces);
    ++raw_pieces;
  });
  if (map.pieces.empty()) return map;
  const SlotPiece& first = map.pieces.front();
  if (map.pieces.size() == 1 && first.src_offset == 0 && first.dst_offset == 0 &&
      first.bytes == map.src_slot_bytes && first.bytes == map.dst_slot_bytes) {
    map.kind = MapperKind::kWholeSlot;
    map.pieces_before_coalescing = 1;
  } else if (link.heads.size() == src_shard.heads.size() &&
             link.heads.size() == dst_shard.heads.size()) {
    map.kind = MapperKind::kLayerRun;
    map.pieces_before_coalescing = static_cast<int64_t>(map.pieces.size());
  } else {
    map.kind = MapperKind::kHeadRun;
    map.pieces_before_coalescing = raw_pieces;
  }
  return map;
}

// Mamba state: per common layer, the whole state buffer. A state split across TP
// ranks would need head-level mapping we do not know the layout of, so the two
// sides must shard it alike: equal TP sizes, or attention DP on both (whole state
// on the request's DP rank).
absl::Status BuildStateMaps(const RankPageTable& src, const RankPageTable& dst,
                            bool writes, std::vector<SlotMap>* maps) {
  const Topology& s = src.topology;
  const Topology& d = dst.topology;
  const bool same_sharding =
      s.attention_dp == d.attention_dp && (s.attention_dp || s.tp_size == d.tp_size);
  for (size_t a = 0; a < src.state_groups.size(); ++a) {
    for (size_t b = 0; b < dst.state_groups.size(); ++b) {
      const StateGroup& sg = src.state_groups[a];
      const StateGroup& dg = dst.state_groups[b];
      SlotMap map = EmptyMap(src, sg.pool_index, dst, dg.pool_index);
      absl::Status status;
      ForCommonLayers(sg.global_layer_ids, dg.global_layer_ids, [&](size_t i, size_t j) {
        if (!same_sharding && status.ok()) {
          status = absl::UnimplementedError(absl::StrCat(
              "mamba state across different tp sharding: layer=", sg.global_layer_ids[i],
              " src_tp_size=", s.tp_size, " dst_tp_size=", d.tp_size,
              " src_attention_dp=", s.attention_dp,
              " dst_attention_dp=", d.attention_dp));
        }
        if (sg.layers[i].bytes != dg.layers[j].bytes && status.ok()) {
          status = absl::UnimplementedError(absl::StrCat(
              "state sizes differ between ranks: src_group=", a, " dst_group=", b,
              " layer=", sg.global_layer_ids[i], " src_bytes=", sg.layers[i].bytes,
              " dst_bytes=", dg.layers[j].bytes));
        }
        if (!writes) return;
        AppendPiece(
            SlotPiece{sg.layers[i].offset, dg.layers[j].offset, sg.layers[i].bytes},
            &map.pieces);
        ++map.pieces_before_coalescing;
      });
      if (!status.ok()) return status;
      if (!map.pieces.empty()) map.kind = MapperKind::kLayerRun;
      maps->push_back(std::move(map));
    }
  }
  return absl::OkStatus();
}

std::string Where(const PlanContext& context) {
  std::string where;
  if (context.request_id) absl::StrAppend(&where, " request=", *context.request_id);
  if (context.slice_id) absl::StrAppend(&where, " slice=", *context.slice_id);
  return where;
}

absl::Status CheckSlot(const char* side, int64_t block, int64_t num_slots,
                       const PlanContext& context, const char* group_kind, size_t group,
                       size_t index) {
  if (block >= 0 && block < num_slots) return absl::OkStatus();
  return absl::OutOfRangeError(absl::StrCat(
      side, " block id outside its pool:", Where(context), " ", group_kind, "=", group,
      " index=", index, " block=", block, " num_slots=", num_slots));
}

// Fragment i of `map`'s pieces shifted to one block pair.
Fragment Shifted(const SlotMap& map, const SlotPiece& piece, int64_t src_block,
                 int64_t dst_block) {
  return Fragment{map.src_pool,
                  static_cast<uint64_t>(src_block) * map.src_slot_bytes + piece.src_offset,
                  map.dst_pool,
                  static_cast<uint64_t>(dst_block) * map.dst_slot_bytes + piece.dst_offset,
                  piece.bytes};
}

bool Continues(const Fragment& last, const Fragment& next) {
  return last.src_pool == next.src_pool && last.dst_pool == next.dst_pool &&
         last.src_offset + last.bytes == next.src_offset &&
         last.dst_offset + last.bytes == next.dst_offset;
}

// Where PlanInto puts fragments: every one, coalesced into a vector.
class ListSink {
 public:
  explicit ListSink(std::vector<Fragment>* out) : out_(out) {}
  void Add(const Fragment& fragment) { AppendCoalesced(fragment, out_); }
  void AddBlock(const SlotMap& map, int64_t src_block, int64_t dst_block) {
    for (const SlotPiece& piece : map.pieces) Add(Shifted(map, piece, src_block, dst_block));
  }
  int64_t fragments() const { return static_cast<int64_t>(out_->size()); }

 private:
  std::vector<Fragment>* const out_;
};

// Where Count puts fragments: it counts them as ListSink would hold them and keeps
// only the first `max_listed`. Once no new fragment can be listed, a block costs
// O(1): the pieces of one slot are coalesced already (AppendPiece), so only a
// block's first piece can continue the fragment before it.
class CountSink {
 public:
  CountSink(size_t max_listed, std::vector<Fragment>* listed)
      : max_listed_(max_listed), listed_(listed) {}

  void Add(const Fragment& fragment) {
    if (count_ > 0 && Continues(last_, fragment)) {
      last_.bytes += fragment.bytes;
      if (last_listed_) listed_->back().bytes += fragment.bytes;
      return;
    }
    ++count_;
    last_ = fragment;
    last_listed_ = listed_ != nullptr && listed_->size() < max_listed_;
    if (last_listed_) listed_->push_back(fragment);
  }

  void AddBlock(const SlotMap& map, int64_t src_block, int64_t dst_block) {
    if (map.pieces.empty()) return;
    if (listed_ != nullptr && listed_->size() < max_listed_) {
      for (const SlotPiece& piece : map.pieces) {
        Add(Shifted(map, piece, src_block, dst_block));
      }
      return;
    }
    Add(Shifted(map, map.pieces.front(), src_block, dst_block));
    if (map.pieces.size() == 1) return;
    count_ += static_cast<int64_t>(map.pieces.size()) - 1;
    last_ = Shifted(map, map.pieces.back(), src_block, dst_block);
    last_listed_ = false;
  }

  int64_t fragments() const { return count_; }

 private:
  const size_t max_listed_;
  std::vector<Fragment>* const listed_;
  int64_t count_ = 0;
  Fragment last_;
  bool last_listed_ = false;
};

// Whole-slot copies: a run of pairs whose ids both go up by one is one write, found
// without touching the output per block.
template <typename Sink>
void EmitWholeSlotRuns(const SlotMap& map, const GroupPairing& pairing, Sink& sink) {
  const int64_t* src = pairing.src.data();
  const int64_t* dst = pairing.dst.data();
  const size_t n = pairing.src.size();
  size_t i = 0;
  while (i < n) {
    size_t j = i + 1;
    while (j < n && src[j] == src[j - 1] + 1 && dst[j] == dst[j - 1] + 1) ++j;
    sink.Add(Fragment{map.src_pool, static_cast<uint64_t>(src[i]) * map.src_slot_bytes,
                      map.dst_pool, static_cast<uint64_t>(dst[i]) * map.dst_slot_bytes,
                      static_cast<uint64_t>(j - i) * map.src_slot_bytes});
    i = j;
  }
}

// Bytes one block pair moves through `map`.
uint64_t BlockBytes(const SlotMap& map) {
  uint64_t bytes = 0;
  for (const SlotPiece& piece : map.pieces) bytes += piece.bytes;  // inside one slot
  return bytes;
}

// Adds `blocks` block pairs of `map` to the counts; false when a count overflows.
bool CountBlocks(const SlotMap& map, uint64_t blocks, PlanCounts* counts) {
  int64_t before = 0;
  uint64_t bytes = 0;
  return !__builtin_mul_overflow(static_cast<int64_t>(blocks), map.pieces_before_coalescing,
                                 &before) &&
         !__builtin_add_overflow(counts->fragments_before_coalescing, before,
                                 &counts->fragments_before_coalescing) &&
         !__builtin_mul_overflow(blocks, BlockBytes(map), &bytes) &&
         !__builtin_add_overflow(counts->total_bytes, bytes, &counts->total_bytes);
}

absl::Status CountOverflow(const PlanContext& context, const char* group_kind,
                           size_t group) {
  return absl::OutOfRangeError(absl::StrCat("plan size overflows 64 bits:", Where(context),
                                            " ", group_kind, "=", group));
}

// Every block id of a group's pairs lies in its pool. The hot loop only reads;
// the message is built on the cold path.
absl::Status CheckBlocks(const SlotMap& map, const GroupPairing& pairing,
                         const PlanContext& context, size_t group) {
  const uint64_t src_slots = static_cast<uint64_t>(map.src_num_slots);
  const uint64_t dst_slots = static_cast<uint64_t>(map.dst_num_slots);
  bool bad = false;
  for (size_t i = 0; i < pairing.src.size(); ++i) {
    // A negative id wraps to a huge unsigned one.
    bad |= static_cast<uint64_t>(pairing.src[i]) >= src_slots;
    bad |= static_cast<uint64_t>(pairing.dst[i]) >= dst_slots;
  }
  if (!bad) return absl::OkStatus();
  for (size_t i = 0; i < pairing.src.size(); ++i) {
    if (absl::Status s = CheckSlot("src", pairing.src[i], map.src_num_slots, context,
                                   "group", group, i);
        !s.ok()) {
      return s;
    }
    if (absl::Status s = CheckSlot("dst", pairing.dst[i], map.dst_num_slots, context,
                                   "group", group, i);
        !s.ok()) {
      return s;
    }
  }
  return absl::InternalError("block check disagrees with itself");
}

absl::Status CheckFragmentSide(const char* side, size_t index, int64_t pool_index,
                               uint64_t offset, uint64_t bytes,
                               const RankPageTable& table) {
  if (pool_index >= 0 && pool_index < static_cast<int64_t>(table.pools.size())) {
    const Pool& pool = table.pools[pool_index];
    const uint64_t pool_bytes = pool.slot_bytes * static_cast<uint64_t>(pool.num_slots);
    if (bytes > 0 && bytes <= pool_bytes && offset <= pool_bytes - bytes) {
      return absl::OkStatus();
    }
  }
  return absl::OutOfRangeError(absl::StrCat(
      side, " fragment outside a registered pool: fragment=", index, " pool=", pool_index,
      " offset=", offset, " bytes=", bytes, " pools=", table.pools.size()));
}

// PlanInto and Count: checks every pair, sends the fragments to `sink` and counts
// them. Pairs of a group emit in order, groups in slice order, state last.
template <typename Sink>
absl::StatusOr<PlanCounts> EmitPlan(const std::vector<SlotMap>& groups,
                                    const std::vector<int64_t>& slice_groups,
                                    const std::vector<SlotMap>& states,
                                    absl::Span<const GroupPairing> pairings,
                                    const PlanContext& context, Sink& sink) {
  if (pairings.size() != slice_groups.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("pairings need one entry per layer group:", Where(context),
                     " pairings=", pairings.size(), " groups=", slice_groups.size()));
  }
  PlanCounts counts;
  for (size_t g = 0; g < slice_groups.size(); ++g) {
    const GroupPairing& pairing = pairings[g];
    if (slice_groups[g] == kStateSliceGroup) {
      if (!pairing.src.empty() || !pairing.dst.empty()) {
        return absl::InvalidArgumentError(
            absl::StrCat("block pairs for a mamba group:", Where(context), " group=", g,
                         " src=", pairing.src.size(), " dst=", pairing.dst.size()));
      }
      continue;
    }
    const SlotMap& map = groups[slice_groups[g]];
    if (pairing.src.size() != pairing.dst.size()) {
      return absl::InvalidArgumentError(
          absl::StrCat("block pairs of unequal length:", Where(context), " group=", g,
                       " src=", pairing.src.size(), " dst=", pairing.dst.size()));
    }
    if (absl::Status s = CheckBlocks(map, pairing, context, g); !s.ok()) return s;
    if (!CountBlocks(map, pairing.src.size(), &counts)) return CountOverflow(context, "group", g);
    if (map.kind == MapperKind::kWholeSlot) {
      EmitWholeSlotRuns(map, pairing, sink);
    } else if (map.kind != MapperKind::kNone) {
      for (size_t i = 0; i < pairing.src.size(); ++i) {
        sink.AddBlock(map, pairing.src[i], pairing.dst[i]);
      }
    }
  }
  if (context.src_state_slot && context.dst_state_slot) {
    for (size_t k = 0; k < states.size(); ++k) {
      const SlotMap& map = states[k];
      absl::Status status = CheckSlot("src", *context.src_state_slot, map.src_num_slots,
                                      context, "state_group", k, 0);
      status.Update(CheckSlot("dst", *context.dst_state_slot, map.dst_num_slots, context,
                              "state_group", k, 0));
      if (!status.ok()) return status;
      if (!CountBlocks(map, 1, &counts)) return CountOverflow(context, "state_group", k);
      sink.AddBlock(map, *context.src_state_slot, *context.dst_state_slot);
    }
  }
  counts.fragments_after_coalescing = sink.fragments();
  return counts;
}

}  // namespace

void AppendCoalesced(const Fragment& fragment, std::vector<Fragment>* out) {
  if (!out->empty()) {
    Fragment& last = out->back();
    if (last.src_pool == fragment.src_pool && last.dst_pool == fragment.dst_pool &&
        last.src_offset + last.bytes == fragment.src_offset &&
        last.dst_offset + last.bytes == fragment.dst_offset) {
      last.bytes += fragment.bytes;
      return;
    }
  }
  out->push_back(fragment);
}

struct FragmentPlanner::Maps {
  std::vector<SlotMap> groups;        // per attention group
  std::vector<int64_t> slice_groups;  // RankPageTable::slice_groups, identity if empty
  std::vector<SlotMap> states;
};

absl::StatusOr<FragmentPlanner> FragmentPlanner::Create(const RankPageTable& src,
                                                        const RankPageTable& dst) {
  if (absl::Status s = ValidatePageTable(src); !s.ok()) {
    return absl::Status(s.code(), absl::StrCat("src page table: ", s.message()));
  }
  if (absl::Status s = ValidatePageTable(dst); !s.ok()) {
    return absl::Status(s.code(), absl::StrCat("dst page table: ", s.message()));
  }
  if (absl::Status s = CheckCompatible(src, dst); !s.ok()) return s;
  const HeadModel heads{src.num_kv_heads, src.is_mla};
  absl::StatusOr<RankLink> link = LinkRanks(src.topology, dst.topology, heads,
                                            src.topology.tp_rank, dst.topology.tp_rank);
  if (!link.ok()) return link.status();
  // Both shards are valid: ValidatePageTable computed them.
  const HeadShard src_shard = *TpHeadShard(src.topology, heads);
  const HeadShard dst_shard = *TpHeadShard(dst.topology, heads);
  auto maps = std::make_shared<Maps>();
  maps->groups.reserve(src.attention_groups.size());
  for (size_t g = 0; g < src.attention_groups.size(); ++g) {
    maps->groups.push_back(BuildGroupMap(src, dst, g, *link, src_shard, dst_shard));
  }
  maps->slice_groups = src.slice_groups;
  if (maps->slice_groups.empty()) {
    for (size_t g = 0; g < src.attention_groups.size(); ++g) {
      maps->slice_groups.push_back(static_cast<int64_t>(g));
    }
  }
  if (absl::Status s = BuildStateMaps(src, dst, link->writes, &maps->states); !s.ok()) {
    return s;
  }
  FragmentPlanner planner;
  planner.overlaps_ = link->overlaps;
  planner.writes_ = link->writes;
  planner.maps_ = std::move(maps);
  return planner;
}

MapperKind FragmentPlanner::group_kind(size_t group) const { return maps_->groups[group].kind; }

absl::Status FragmentPlanner::PlanInto(absl::Span<const GroupPairing> pairings,
                                       const PlanContext& context,
                                       FragmentPlan* plan) const {
  plan->fragments.clear();
  plan->fragments_before_coalescing = 0;
  plan->total_bytes = 0;
  ListSink sink(&plan->fragments);
  absl::StatusOr<PlanCounts> counts =
      EmitPlan(maps_->groups, maps_->slice_groups, maps_->states, pairings, context, sink);
  if (!counts.ok()) {
    plan->fragments.clear();
    return counts.status();
  }
  plan->fragments_before_coalescing = counts->fragments_before_coalescing;
  plan->total_bytes = counts->total_bytes;
  return absl::OkStatus();
}

absl::StatusOr<PlanCounts> FragmentPlanner::Count(absl::Span<const GroupPairing> pairings,
                                                  const PlanContext& context,
                                                  size_t max_listed,
                                                  std::vector<Fragment>* first) const {
  if (first != nullptr) first->clear();
  CountSink sink(max_listed, first);
  absl::StatusOr<PlanCounts> counts =
      EmitPlan(maps_->groups, maps_->slice_groups, maps_->states, pairings, context, sink);
  if (!counts.ok() && first != nullptr) first->clear();
  return counts;
}

absl::StatusOr<FragmentPlan> FragmentPlanner::Plan(
    absl::Span<const GroupPairing> pairings, const PlanContext& context) const {
  FragmentPlan plan;
  if (absl::Status s = PlanInto(pairings, context, &plan); !s.ok()) return s;
  return plan;
}

absl::Status ValidateFragments(absl::Span<const Fragment> fragments,
                               const RankPageTable& src, const RankPageTable& dst) {
  for (size_t i = 0; i < fragments.size(); ++i) {
    const Fragment& f = fragments[i];
    if (absl::Status s =
            CheckFragmentSide("src", i, f.src_pool, f.src_offset, f.bytes, src);
        !s.ok()) {
      return s;
    }
    if (absl::Status s =
            CheckFragmentSide("dst", i, f.dst_pool, f.dst_offset, f.bytes, dst);
        !s.ok()) {
      return s;
    }
  }
  return absl::OkStatus();
}

}  // namespace kvx::transfer
