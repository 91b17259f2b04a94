#include "transfer/topology.h"

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

namespace kvx::transfer {
namespace {

Span Intersect(const Span& a, const Span& b) {
  Span s{std::max(a.first, b.first), std::min(a.end, b.end)};
  if (s.end < s.first) s.end = s.first;
  return s;
}

// The heads of TP rank `tp_rank` of a valid topology; O(1).
absl::StatusOr<HeadShard> ShardOf(const Topology& t, int64_t tp_rank, const HeadModel& heads) {
  if (heads.num_kv_heads < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_kv_heads must be positive: num_kv_heads=", heads.num_kv_heads));
  }
  const int64_t num_heads = heads.is_mla ? 1 : heads.num_kv_heads;
  if (t.attention_dp) return HeadShard{Span{0, num_heads}, 1};
  if (heads.is_mla) return HeadShard{Span{0, 1}, t.tp_size};
  if (t.tp_size <= num_heads) {
    if (num_heads % t.tp_size != 0) {
      return absl::UnimplementedError(
          absl::StrCat("kv heads not divisible by tp size: num_kv_heads=", num_heads,
                       " tp_size=", t.tp_size));
    }
    const int64_t per_rank = num_heads / t.tp_size;
    return HeadShard{Span{tp_rank * per_rank, (tp_rank + 1) * per_rank}, 1};
  }
  if (t.tp_size % num_heads != 0) {
    return absl::UnimplementedError(
        absl::StrCat("tp size not divisible by kv heads: num_kv_heads=", num_heads,
                     " tp_size=", t.tp_size));
  }
  const int64_t duplicates = t.tp_size / num_heads;
  const int64_t head = tp_rank / duplicates;
  return HeadShard{Span{head, head + 1}, duplicates};
}

// One side of a link: its topology (tp_rank set), heads and PP layer span.
struct RankView {
  const Topology* topology;
  HeadShard shard;
  Span layers;
  int64_t dp_rank;
};

// LinkRanks on validated, precomputed views: O(1).
RankLink Link(const RankView& sender, const RankView& receiver) {
  RankLink link;
  link.sender_duplicates = sender.shard.duplicates;
  link.receiver_duplicates = receiver.shard.duplicates;
  const Topology& s = *sender.topology;
  const Topology& r = *receiver.topology;
  if ((s.attention_dp && s.tp_rank != sender.dp_rank) ||
      (r.attention_dp && r.tp_rank != receiver.dp_rank)) {
    return link;
  }
  link.layers = Intersect(sender.layers, receiver.layers);
  link.heads = Intersect(sender.shard.heads, receiver.shard.heads);
  link.overlaps = link.layers.size() > 0 && link.heads.size() > 0;
  // Replicas of the sender hold the same heads: the one whose index among them
  // matches the receiver's TP rank writes, which spreads receivers over replicas.
  const int64_t d = sender.shard.duplicates;
  link.writes = link.overlaps && (d == 1 || s.tp_rank % d == r.tp_rank % d);
  return link;
}

absl::Status CheckDpRank(const Topology& topology, int64_t dp_rank, const char* side) {
  if (topology.attention_dp && (dp_rank < 0 || dp_rank >= topology.tp_size)) {
    return absl::InvalidArgumentError(absl::StrCat("dp rank out of range: side=", side,
                                                   " dp_rank=", dp_rank,
                                                   " tp_size=", topology.tp_size));
  }
  return absl::OkStatus();
}

}  // namespace

Topology MakeTopology(int64_t tp_size, std::vector<int64_t> layers_per_pp_rank,
                      int64_t tp_rank, int64_t pp_rank) {
  Topology t;
  t.tp_size = tp_size;
  t.tp_rank = tp_rank;
  t.pp_size = static_cast<int64_t>(layers_per_pp_rank.size());
  t.pp_rank = pp_rank;
  t.layers_per_pp_rank = std::move(layers_per_pp_rank);
  return t;
}

absl::Status ValidateTopology(const Topology& t) {
  if (t.tp_size < 1 || t.pp_size < 1 || t.tp_rank < 0 || t.tp_rank >= t.tp_size ||
      t.pp_rank < 0 || t.pp_rank >= t.pp_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("invalid topology: tp_size=", t.tp_size, " tp_rank=", t.tp_rank,
                     " pp_size=", t.pp_size, " pp_rank=", t.pp_rank));
  }
  if (t.tp_size > kMaxInstanceRanks / t.pp_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("instance has too many ranks: tp_size=", t.tp_size,
                     " pp_size=", t.pp_size, " max_ranks=", kMaxInstanceRanks));
  }
  if (static_cast<int64_t>(t.layers_per_pp_rank.size()) != t.pp_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("layers_per_pp_rank must have pp_size entries: pp_size=", t.pp_size,
                     " entries=", t.layers_per_pp_rank.size()));
  }
  for (size_t i = 0; i < t.layers_per_pp_rank.size(); ++i) {
    const int64_t n = t.layers_per_pp_rank[i];
    // A bound far above any model keeps the sum from overflowing.
    if (n < 1 || n > (int64_t{1} << 32)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "layers per pp rank must be in [1, 2^32]: pp_rank=", i, " layers=", n));
    }
  }
  return absl::OkStatus();
}

int64_t TotalLayers(const Topology& t) {
  int64_t total = 0;
  for (int64_t n : t.layers_per_pp_rank) total += n;
  return total;
}

Span PpLayerSpan(const Topology& t) {
  int64_t first = 0;
  for (int64_t p = 0; p < t.pp_rank; ++p) first += t.layers_per_pp_rank[p];
  return Span{first, first + t.layers_per_pp_rank[t.pp_rank]};
}

absl::StatusOr<HeadShard> TpHeadShard(const Topology& t, const HeadModel& heads) {
  if (absl::Status s = ValidateTopology(t); !s.ok()) return s;
  return ShardOf(t, t.tp_rank, heads);
}

absl::StatusOr<RankLink> LinkRanks(const Topology& sender, const Topology& receiver,
                                   const HeadModel& heads, int64_t sender_dp_rank,
                                   int64_t receiver_dp_rank) {
  absl::StatusOr<HeadShard> sender_shard = TpHeadShard(sender, heads);
  if (!sender_shard.ok()) return sender_shard.status();
  absl::StatusOr<HeadShard> receiver_shard = TpHeadShard(receiver, heads);
  if (!receiver_shard.ok()) return receiver_shard.status();
  if (TotalLayers(sender) != TotalLayers(receiver)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "instances disagree on the layer count: sender_layers=", TotalLayers(sender),
        " receiver_layers=", TotalLayers(receiver)));
  }
  if (absl::Status s = CheckDpRank(sender, sender_dp_rank, "sender"); !s.ok()) return s;
  if (absl::Status s = CheckDpRank(receiver, receiver_dp_rank, "receiver"); !s.ok()) {
    return s;
  }
  return Link(RankView{&sender, *sender_shard, PpLayerSpan(sender), sender_dp_rank},
              RankView{&receiver, *receiver_shard, PpLayerSpan(receiver), receiver_dp_rank});
}

absl::StatusOr<std::vector<PeerLink>> ComputePeerOverlap(const Topology& self,
                                                         const Topology& peer,
                                                         const HeadModel& heads,
                                                         Direction direction,
                                                         const DpRanks& dp_ranks) {
  if (absl::Status s = ValidateTopology(self); !s.ok()) return s;
  Topology peer_rank = peer;
  peer_rank.tp_rank = 0;
  peer_rank.pp_rank = 0;
  // The peer's topology may come off the wire: validate it once and walk its ranks
  // in O(ranks + stages), not O(ranks x stages).
  absl::StatusOr<HeadShard> self_shard = TpHeadShard(self, heads);
  if (!self_shard.ok()) return self_shard.status();
  absl::StatusOr<HeadShard> peer_shard = TpHeadShard(peer_rank, heads);
  if (!peer_shard.ok()) return peer_shard.status();
  const bool send = direction == Direction::kSend;
  if (TotalLayers(self) != TotalLayers(peer_rank)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "instances disagree on the layer count: sender_layers=",
        TotalLayers(send ? self : peer_rank),
        " receiver_layers=", TotalLayers(send ? peer_rank : self)));
  }
  const char* self_side = send ? "sender" : "receiver";
  const char* peer_side = send ? "receiver" : "sender";
  if (absl::Status s = CheckDpRank(self, dp_ranks.self, self_side); !s.ok()) return s;
  if (absl::Status s = CheckDpRank(peer_rank, dp_ranks.peer, peer_side); !s.ok()) return s;
  const RankView self_view{&self, *self_shard, PpLayerSpan(self), dp_ranks.self};
  std::vector<PeerLink> links;
  int64_t first_layer = 0;
  for (int64_t pp = 0; pp < peer.pp_size; ++pp) {
    const Span peer_layers{first_layer, first_layer + peer.layers_per_pp_rank[pp]};
    first_layer = peer_layers.end;
    for (int64_t tp = 0; tp < peer.tp_size; ++tp) {
      peer_rank.pp_rank = pp;
      peer_rank.tp_rank = tp;
      // Cannot fail: tp rank 0's shard was computed above with the same sizes.
      const RankView peer_view{&peer_rank, *ShardOf(peer_rank, tp, heads), peer_layers,
                               dp_ranks.peer};
      const RankLink link = send ? Link(self_view, peer_view) : Link(peer_view, self_view);
      if (!link.overlaps) continue;
      links.push_back(PeerLink{
          pp * peer.tp_size + tp, tp, pp, link.layers, link.heads, link.writes,
          send ? link.sender_duplicates : link.receiver_duplicates,
          send ? link.receiver_duplicates : link.sender_duplicates});
    }
  }
  return links;
}

}  // namespace kvx::transfer
