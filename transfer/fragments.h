// File: transfer/fragments.h
//
// From block pairs to the exact byte ranges to write (SEMANTICS.md section 6), for
// one sender rank (context, "src") and one receiver rank (generation, "dst") that
// may be sharded differently. FragmentPlanner::Create checks both page tables once
// per rank pair, matches their layer groups by global layer id, and builds for each
// group the pieces of one source slot that land in one destination slot:
//
//   kWholeSlot  identical layout: the whole slot, one piece;
//   kLayerRun   PP sizes differ: the common run of layers at each side's offset
//               (one piece per contiguous run);
//   kHeadRun    TP sizes differ or heads are replicated: per common layer and K/V,
//               the run of common heads at each side's head offset (MLA: the
//               latent of each common layer).
//
// Plan then shifts the pieces by each block pair's slot offsets and coalesces on
// the fly: a fragment whose source and destination both continue the previous one
// extends it, so consecutive block ids with whole-slot copies become one write.
// Offsets are relative to each side's pool (index into RankPageTable::pools), so a
// plan does not depend on virtual addresses. Every block id is checked against its
// pool's slot count before anything is emitted. Mamba state, when both state
// slots are given, moves per common layer (one piece per contiguous run).
//
// Example (sender side, one request):
//
//   absl::StatusOr<FragmentPlanner> planner = FragmentPlanner::Create(mine, peers);
//   absl::StatusOr<std::vector<GroupPairing>> pairs = PairSliceBlocks(src, dst, opt);
//   FragmentPlan plan;  // reuse across requests to avoid allocation
//   absl::Status s = planner->PlanInto(*pairs, PlanContext{}, &plan);
//   // plan.fragments: the coalesced writes; plan.fragments_before_coalescing.
//
// Thread safety: a FragmentPlanner is immutable after Create; Plan and PlanInto
// may run concurrently on distinct output plans.

#ifndef KVX_TRANSFER_FRAGMENTS_H_
#define KVX_TRANSFER_FRAGMENTS_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "absl/base/attributes.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "transfer/page_table.h"
#include "transfer/slice.h"
#include "transfer/topology.h"

namespace kvx::transfer {

// One write: `bytes` bytes from src pool `src_pool` at `src_offset` to dst pool
// `dst_pool` at `dst_offset`.
struct Fragment {
  int64_t src_pool = 0;
  uint64_t src_offset = 0;
  int64_t dst_pool = 0;
  uint64_t dst_offset = 0;
  uint64_t bytes = 0;

  friend bool operator==(const Fragment& a, const Fragment& b) {
    return a.src_pool == b.src_pool && a.src_offset == b.src_offset &&
           a.dst_pool == b.dst_pool && a.dst_offset == b.dst_offset && a.bytes == b.bytes;
  }
};

// Appends `fragment` to `out`, merging it into the last fragment when both its
// source and destination continue that one (same pools, offsets adjacent).
void AppendCoalesced(const Fragment& fragment, std::vector<Fragment>* out);

// How a layer group of a rank pair is mapped (see the file comment); kNone: no
// common layers, or this sender does not write.
enum class MapperKind { kNone, kWholeSlot, kLayerRun, kHeadRun };

// The writes of one request (or slice) from one sender rank to one receiver rank.
struct FragmentPlan {
  std::vector<Fragment> fragments;          // coalesced
  int64_t fragments_before_coalescing = 0;  // what the mappers emit per block
  uint64_t total_bytes = 0;
};

// The size of a plan without the plan: what PlanInto's FragmentPlan would hold.
struct PlanCounts {
  int64_t fragments_before_coalescing = 0;
  int64_t fragments_after_coalescing = 0;  // PlanInto's fragments.size()
  uint64_t total_bytes = 0;
};

// Per-request facts besides the block pairs.
struct PlanContext {
  std::optional<int64_t> request_id;  // named in errors
  std::optional<int64_t> slice_id;    // named in errors
  // The request's Mamba state slot on each side; state moves only when both are set.
  std::optional<int64_t> src_state_slot;
  std::optional<int64_t> dst_state_slot;
};

// Plans writes from one sender rank to one receiver rank. Copyable value.
class FragmentPlanner {
 public:
  // Validates both tables (ValidatePageTable), checks them compatible
  // (CheckCompatible: FailedPrecondition), links the ranks (LinkRanks, with each
  // side's own TP rank as the request's DP rank) and builds each group's mapping.
  // Errors: those, and Unimplemented for Mamba state layers both hold when the
  // sides shard state differently (TP sizes differ, attention DP on one side
  // only) or a layer's state size differs.
  ABSL_MUST_USE_RESULT static absl::StatusOr<FragmentPlanner> Create(
      const RankPageTable& src, const RankPageTable& dst);

  // True when this sender writes bytes to this receiver; false when the ranks do
  // not overlap or this sender is a replica that only reports (empty write).
  bool writes() const { return writes_; }
  bool overlaps() const { return overlaps_; }

  // How group `group` is mapped (kNone: no common layers or no write).
  // REQUIRES: group < number of attention groups.
  MapperKind group_kind(size_t group) const;

  // Replaces `plan` with the writes for `pairings` (one entry per slice group, as
  // PairSliceBlocks returns; see RankPageTable::slice_groups), keeping its vector's
  // capacity. Block ids are checked even when this sender does not write. Errors:
  // InvalidArgument for the wrong number of groups, unequal src/dst lengths or pairs for
  // a Mamba slice group; OutOfRange for a block id < 0 or >= its pool's slot count, or a
  // state slot likewise, naming request, slice, group, index and block, and for a
  // plan whose fragment count or total bytes would pass 64 bits (possible only when
  // pairs repeat a slot, which PairSliceBlocks rejects).
  ABSL_MUST_USE_RESULT absl::Status PlanInto(absl::Span<const GroupPairing> pairings,
                                             const PlanContext& context,
                                             FragmentPlan* plan) const;
  ABSL_MUST_USE_RESULT absl::StatusOr<FragmentPlan> Plan(
      absl::Span<const GroupPairing> pairings, const PlanContext& context) const;

  // The counts of the plan PlanInto would build, without building it, and its first
  // `max_listed` fragments (exactly as PlanInto lists them) in `*first`, which is
  // cleared first and may be null when nothing is to be listed. O(block pairs) time
  // once the list is full and O(max_listed) memory, however many fragments the plan
  // has: for sizing a plan before paying for it, or showing a prefix of one too large
  // to hold. Same checks and errors as PlanInto.
  ABSL_MUST_USE_RESULT absl::StatusOr<PlanCounts> Count(
      absl::Span<const GroupPairing> pairings, const PlanContext& context,
      size_t max_listed, std::vector<Fragment>* first) const;

 private:
  FragmentPlanner() = default;

  // The per-group and per-state slot maps (fragments.cc): immutable after Create,
  // shared by copies.
  struct Maps;

  bool overlaps_ = false;
  bool writes_ = false;
  std::shared_ptr<const Maps> maps_;
};

// Defense in depth for a plan from elsewhere: every fragment is nonempty and lies
// inside a registered pool on both sides. Returns OutOfRange naming the fragment
// index, pool and numbers.
ABSL_MUST_USE_RESULT absl::Status ValidateFragments(absl::Span<const Fragment> fragments,
                                                    const RankPageTable& src,
                                                    const RankPageTable& dst);

}  // namespace kvx::transfer

#endif  // KVX_TRANSFER_FRAGMENTS_H_
