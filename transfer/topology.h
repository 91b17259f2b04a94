// File: transfer/topology.h
//
// How an instance is sharded (tensor-, pipeline- and attention-data-parallel) and
// which ranks of two differently sharded instances exchange KV cache
// (SEMANTICS.md section 6). A rank holds the KV heads of its TP shard for the
// global layers of its PP stage; a sender rank overlaps a receiver rank when their
// layer spans and head spans intersect (and, with attention DP, when both are the
// request's DP rank). When KV heads are replicated (more TP ranks than KV heads, or
// MLA, whose one latent is held whole by every TP rank) several sender ranks hold
// the same heads: exactly one of them writes to each receiver; the others overlap
// too, send an empty write and still report (section 7).
//
// Example: a TP4 context instance sending to a TP8 generation instance.
//
//   Topology context = MakeTopology(/*tp_size=*/4, /*layers_per_pp_rank=*/{80},
//                                   /*tp_rank=*/1);
//   Topology generation = MakeTopology(8, {80});
//   HeadModel heads;
//   heads.num_kv_heads = 8;
//   absl::StatusOr<std::vector<PeerLink>> links = ComputePeerOverlap(
//       context, generation, heads, Direction::kSend, DpRanks{});
//   // links: generation TP ranks 2 and 3, both written by this rank.
//
// Thread safety: pure functions over plain values.

#ifndef KVX_TRANSFER_TOPOLOGY_H_
#define KVX_TRANSFER_TOPOLOGY_H_

#include <cstdint>
#include <vector>

#include "absl/base/attributes.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace kvx::transfer {

// The sharding of one instance and the position of one rank in it. Ranks are
// numbered pp_rank * tp_size + tp_rank.
struct Topology {
  int64_t tp_size = 1;
  int64_t tp_rank = 0;
  int64_t pp_size = 1;
  int64_t pp_rank = 0;
  // Number of (global, consecutive) layers each PP stage holds; may be uneven.
  // REQUIRES: pp_size entries, each > 0.
  std::vector<int64_t> layers_per_pp_rank;
  // Attention data parallelism: each TP rank serves its own requests with all KV
  // heads; a request lives on one DP rank (= tp_rank).
  bool attention_dp = false;
};

// What the head split needs to know of the model.
struct HeadModel {
  int64_t num_kv_heads = 0;  // total KV heads of the model; REQUIRES > 0
  bool is_mla = false;       // one latent per token, held whole by every TP rank
};

// Half-open span [first, end) of global layers or global KV heads.
struct Span {
  int64_t first = 0;
  int64_t end = 0;
  int64_t size() const { return end - first; }
};

// The most ranks (tp_size x pp_size) one instance may have: far past any deployment,
// and a bound on the work a peer's topology can cause (ComputePeerOverlap walks
// every peer rank).
inline constexpr int64_t kMaxInstanceRanks = 65536;

// The rank (tp_rank, pp_rank) of a tp_size x layers_per_pp_rank.size() instance
// without attention DP. Does not validate.
Topology MakeTopology(int64_t tp_size, std::vector<int64_t> layers_per_pp_rank,
                      int64_t tp_rank = 0, int64_t pp_rank = 0);

// Returns InvalidArgument (naming the field) when sizes are < 1, a rank is out of
// range, tp_size x pp_size exceeds kMaxInstanceRanks, layers_per_pp_rank has the
// wrong length or a non-positive entry, or the total layer count overflows.
ABSL_MUST_USE_RESULT absl::Status ValidateTopology(const Topology& topology);

// Sum of layers_per_pp_rank. REQUIRES: ValidateTopology(topology).ok().
int64_t TotalLayers(const Topology& topology);

// The global layers of the rank's PP stage. REQUIRES: a valid topology.
Span PpLayerSpan(const Topology& topology);

// The heads one rank holds and how many ranks hold the same ones.
struct HeadShard {
  Span heads;              // global KV heads held (MLA: the single latent, [0, 1))
  int64_t duplicates = 1;  // TP ranks of the instance holding exactly these heads
};

// Errors: InvalidArgument for an invalid topology or num_kv_heads < 1;
// Unimplemented when neither tp_size nor num_kv_heads divides the other.
ABSL_MUST_USE_RESULT absl::StatusOr<HeadShard> TpHeadShard(const Topology& topology,
                                                           const HeadModel& heads);

// Which side `self` is.
enum class Direction { kSend, kReceive };

// The request's DP rank on each side; used only by a side with attention_dp.
struct DpRanks {
  int64_t self = 0;
  int64_t peer = 0;
};

// One peer rank `self` exchanges with.
struct PeerLink {
  int64_t peer_rank = 0;  // pp_rank * tp_size + tp_rank in the peer instance
  int64_t peer_tp_rank = 0;
  int64_t peer_pp_rank = 0;
  Span layers;  // global layers both hold
  Span heads;   // global KV heads both hold
  // True when the sender of this pair writes bytes; false for a replica that sends
  // an empty write and only reports.
  bool writes = false;
  // Duplicate-head factors: how many TP ranks of each instance hold the same heads
  // as self (HeadShard::duplicates), resp. as this peer rank.
  int64_t self_duplicates = 1;
  int64_t peer_duplicates = 1;
};

// For rank `self` and the peer instance `peer` (its tp_rank/pp_rank are ignored),
// every peer rank whose layers, heads and DP rank overlap self's, in rank order.
// Each receiver has exactly one writing sender per (layer, head). Empty when self
// holds nothing of the request (attention DP on another DP rank). O(peer ranks +
// PP stages), so a peer's topology costs at most kMaxInstanceRanks steps.
// Errors: those of ValidateTopology and TpHeadShard, and InvalidArgument when the
// two instances disagree on the total layer count or a DP rank is out of range.
ABSL_MUST_USE_RESULT absl::StatusOr<std::vector<PeerLink>> ComputePeerOverlap(
    const Topology& self, const Topology& peer, const HeadModel& heads,
    Direction direction, const DpRanks& dp_ranks);

// The link between one sender rank and one receiver rank; `overlaps` is false when
// they exchange nothing. Both sides compute the same answer.
struct RankLink {
  bool overlaps = false;
  bool writes = false;
  Span layers;
  Span heads;
  int64_t sender_duplicates = 1;
  int64_t receiver_duplicates = 1;
};
ABSL_MUST_USE_RESULT absl::StatusOr<RankLink> LinkRanks(const Topology& sender,
                                                        const Topology& receiver,
                                                        const HeadModel& heads,
                                                        int64_t sender_dp_rank,
                                                        int64_t receiver_dp_rank);

}  // namespace kvx::transfer

#endif  // KVX_TRANSFER_TOPOLOGY_H_
