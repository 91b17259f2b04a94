// libFuzzer target for the handshake: the input is the bytes of one message as a
// peer rank would send them; a RankInfoRequest or RankInfoReply that decodes goes
// through every check the transceiver runs on a peer's rank info
// (transfer/transceiver/transceiver.cc, HandleRankInfo, HandleRequestData and the
// generation side's request start), against each of a few fixed local tables
// (transfer/internal/fuzz_models.h):
//
//   1. The decoder's promise: the table passes ValidatePageTable, the instance has
//      at most max_ranks ranks, and `rank` is the topology's own.
//   2. CheckCompatible both ways agrees (the transceiver checks one way and says
//      the check is symmetric); a refusal is FailedPrecondition.
//   3. If compatible: FragmentPlanner::Create with this rank as context and as
//      generation, and ComputePeerOverlap both directions, fail only with a
//      one-line error that is not a caught bug (kInternal); and the transceiver's
//      walk over every rank of the peer's instance with LinkRanks (which receivers
//      a context rank expects; which senders a generation rank waits on) finds
//      exactly the ranks ComputePeerOverlap finds, with the same `writes`.
//
// Most byte mutations of a valid rank info break ValidatePageTable (the head share,
// the PP spans and the buffer offsets depend on each other), so with libFuzzer half
// the mutations are structured instead (LLVMFuzzerCustomMutator): a fresh, valid
// peer rank of one of the models, with one model size changed at times, under a
// random sharding (TP sizes up to the largest instance, mostly small ones; any PP
// split; attention DP or not), at a random rank.
//
// No crash, no sanitizer report, and no input runs long: a peer of the largest
// instance ValidateTopology admits (kMaxInstanceRanks ranks) is in the seeds, and
// libFuzzer's -timeout bounds the rest. A broken property aborts with the reason.
//
//   bazel build --config=fuzz //transfer:rank_info_fuzzer
//   bazel-bin/transfer/rank_info_fuzzer -timeout=10 -rss_limit_mb=1024 -malloc_limit_mb=256
//       -max_total_time=60 /tmp/corpus transfer/rank_info_fuzzer_corpus
//
// Seeds: transfer/rank_info_fuzzer_corpus, written by //transfer:fuzz_seeds.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <random>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "transfer/fragments.h"
#include "transfer/internal/fuzz_models.h"
#include "transfer/page_table.h"
#include "transfer/protocol.h"
#include "transfer/scenario.h"
#include "transfer/topology.h"

namespace kvx::transfer {
namespace {

[[noreturn]] void Broken(const std::string& what) {
  std::fprintf(stderr, "handshake property broken: %s\n", what.c_str());
  std::abort();
}

// Errors are for an operator to read: one line, never a caught kvx bug.
void CheckError(const absl::Status& status, const std::string& where) {
  if (status.ok()) return;
  if (status.code() == absl::StatusCode::kInternal || status.message().empty() ||
      status.message().find('\n') != absl::string_view::npos) {
    Broken(where + ": " + status.ToString());
  }
}

// The request's DP rank as the transceiver derives it for a rank: its TP rank
// with attention DP, else 0.
int64_t DpRankOf(const Topology& t) { return t.attention_dp ? t.tp_rank : 0; }

// (peer rank, writes) of every peer rank that overlaps, in rank order.
using Linked = std::vector<std::pair<int64_t, bool>>;

// The transceiver's walk: every rank of the peer's instance, LinkRanks each (the
// sender first). nullopt: a LinkRanks failed (the transceiver fails the request).
std::optional<Linked> WalkPeerRanks(const Topology& self, const Topology& peer,
                                    const HeadModel& heads, bool self_sends,
                                    const std::string& where) {
  Linked linked;
  Topology rank = peer;
  const int64_t ranks = peer.tp_size * peer.pp_size;  // decoded: at most max_ranks
  for (int64_t r = 0; r < ranks; ++r) {
    rank.tp_rank = r % peer.tp_size;
    rank.pp_rank = r / peer.tp_size;
    const absl::StatusOr<RankLink> link =
        self_sends ? LinkRanks(self, rank, heads, DpRankOf(self), DpRankOf(peer))
                   : LinkRanks(rank, self, heads, DpRankOf(peer), DpRankOf(self));
    if (!link.ok()) {
      CheckError(link.status(), where + " LinkRanks");
      return std::nullopt;
    }
    if (link->overlaps) linked.emplace_back(r, link->writes);
  }
  return linked;
}

void CheckOverlap(const RankPageTable& self, const RankPageTable& peer, bool self_sends,
                  const std::string& where) {
  const HeadModel heads{self.num_kv_heads, self.is_mla};
  const std::optional<Linked> walked =
      WalkPeerRanks(self.topology, peer.topology, heads, self_sends, where);
  const absl::StatusOr<std::vector<PeerLink>> links = ComputePeerOverlap(
      self.topology, peer.topology, heads, self_sends ? Direction::kSend : Direction::kReceive,
      DpRanks{DpRankOf(self.topology), DpRankOf(peer.topology)});
  CheckError(links.status(), where + " ComputePeerOverlap");
  if (links.ok() != walked.has_value()) {
    Broken(where + ": ComputePeerOverlap and LinkRanks disagree on whether the ranks can "
                   "be paired: " + links.status().ToString());
  }
  if (!links.ok()) return;
  Linked computed;
  for (const PeerLink& link : *links) computed.emplace_back(link.peer_rank, link.writes);
  if (computed != *walked) {
    Broken(absl::StrCat(where, ": ComputePeerOverlap and the walk with LinkRanks find "
                               "other peer ranks: computed=", computed.size(),
                        " walked=", walked->size()));
  }
}

void CheckPlanner(const RankPageTable& src, const RankPageTable& dst,
                  const std::string& where) {
  CheckError(FragmentPlanner::Create(src, dst).status(), where + " FragmentPlanner::Create");
}

void CheckHandshake(const transfer_internal::NamedTable& local, const RankInfo& peer) {
  const std::string where = "local=" + local.name;
  const absl::Status compatible = CheckCompatible(local.table, peer.page_table);
  const absl::Status reverse = CheckCompatible(peer.page_table, local.table);
  if (compatible.ok() != reverse.ok()) {
    Broken(where + ": CheckCompatible is not symmetric: " + compatible.ToString() + " vs " +
           reverse.ToString());
  }
  for (const absl::Status& s : {compatible, reverse}) {
    if (!s.ok() && s.code() != absl::StatusCode::kFailedPrecondition) {
      Broken(where + ": CheckCompatible refuses with another code: " + s.ToString());
    }
    CheckError(s, where + " CheckCompatible");
  }
  if (!compatible.ok()) return;  // the transceiver refuses the peer here
  CheckPlanner(local.table, peer.page_table, where + " as context");
  CheckPlanner(peer.page_table, local.table, where + " as generation");
  CheckOverlap(local.table, peer.page_table, /*self_sends=*/true, where + " as context");
  CheckOverlap(local.table, peer.page_table, /*self_sends=*/false, where + " as generation");
}

// A random sharding of `layers` layers: a TP size up to the largest, PP stages of
// random sizes, sometimes attention DP, at a random rank; at most kMaxInstanceRanks
// ranks.
Topology RandomTopology(std::mt19937_64& rng, int64_t layers) {
  const int64_t stages = 1 + static_cast<int64_t>(rng() % layers);
  std::vector<int64_t> split(stages, 1);
  for (int64_t extra = layers - stages; extra > 0; --extra) ++split[rng() % stages];
  // Mostly small instances: one of the largest walks 65536 ranks per check, which
  // the seeds already do.
  static constexpr int64_t kSizes[] = {1, 2, 3, 4, 6, 8, 16, 64, 4096, kMaxInstanceRanks};
  int64_t tp = rng() % 2 == 0 ? kSizes[rng() % std::size(kSizes)]
                              : 1 + static_cast<int64_t>(rng() % 128);
  tp = std::min(tp, kMaxInstanceRanks / stages);
  Topology t = MakeTopology(tp, std::move(split), static_cast<int64_t>(rng() % tp),
                            static_cast<int64_t>(rng() % stages));
  t.attention_dp = rng() % 4 == 0;
  return t;
}

// A valid rank info of a random peer (see the file comment), or nullopt when the
// random model or sharding has no standard layout (an unsupported head split).
std::optional<Message> RandomPeer(std::mt19937_64& rng) {
  static const std::vector<transfer_internal::FuzzModel>* const models =
      new std::vector<transfer_internal::FuzzModel>(transfer_internal::FuzzModels());
  ModelSpec model = (*models)[rng() % models->size()].spec;
  switch (rng() % 8) {  // One size of the model changed, half the time.
    case 0:
      model.num_kv_heads = int64_t{1} << (rng() % 6);
      break;
    case 1:
      model.tokens_per_block = int64_t{1} << (rng() % 8);
      break;
    case 2:
      model.head_size = 1 + static_cast<int64_t>(rng() % 256);
      break;
    case 3:
      model.is_mla = !model.is_mla;
      break;
    default:
      break;
  }
  const Topology topology = RandomTopology(rng, model.num_layers);
  const absl::StatusOr<RankPageTable> table = BuildStandardPageTable(
      model, topology, 1 + static_cast<int64_t>(rng() % 4096), (rng() % 1024) << 30);
  if (!table.ok()) return std::nullopt;
  RankInfo info;
  info.instance = "peer";
  info.role = rng() % 2 == 0 ? Role::kContext : Role::kGeneration;
  info.rank = topology.pp_rank * topology.tp_size + topology.tp_rank;
  info.control_address = "tcp://127.0.0.1:5555";
  info.transport_address = "peer";
  info.page_table = *table;
  if (rng() % 2 == 0) return RankInfoRequest{std::move(info)};
  RankInfoReply reply;
  reply.sender = std::move(info);
  reply.grant_epoch = rng();
  for (const Pool& pool : reply.sender.page_table.pools) {
    reply.grants.push_back(
        PoolGrant{pool.base_address, pool.slot_bytes * static_cast<uint64_t>(pool.num_slots),
                  rng()});
  }
  if (rng() % 2 == 0) {
    // Slots that may or may not fit their region: the decoder must refuse the latter.
    const uint64_t slot_bytes = 1 + rng() % 4096;
    const uint32_t slots = 1 + static_cast<uint32_t>(rng() % 16);
    reply.staging = StagingGrant{
        PoolGrant{rng(), slot_bytes * slots - (rng() % 2 == 0 ? 0 : 1), rng()}, slot_bytes,
        slots};
  }
  return reply;
}

}  // namespace
}  // namespace kvx::transfer

// libFuzzer's own byte mutations; absent without libFuzzer, where nothing mutates.
extern "C" size_t LLVMFuzzerMutate(uint8_t* data, size_t size, size_t max_size)
    __attribute__((weak));

extern "C" size_t LLVMFuzzerCustomMutator(uint8_t* data, size_t size, size_t max_size,
                                          unsigned int seed) {
  std::mt19937_64 rng(seed);
  if (rng() % 2 == 0) return LLVMFuzzerMutate(data, size, max_size);
  const std::optional<kvx::transfer::Message> peer = kvx::transfer::RandomPeer(rng);
  if (!peer.has_value()) return LLVMFuzzerMutate(data, size, max_size);
  const std::string bytes = kvx::transfer::EncodeMessage(*peer);
  if (bytes.size() > max_size) return LLVMFuzzerMutate(data, size, max_size);
  std::memcpy(data, bytes.data(), bytes.size());
  return bytes.size();
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace kvx::transfer;  // NOLINT: one function
  const absl::StatusOr<Message> decoded =
      DecodeMessage(absl::string_view(reinterpret_cast<const char*>(data), size));
  if (!decoded.ok()) return 0;  // protocol_fuzzer checks the errors
  const RankInfo* info = nullptr;
  if (const auto* request = std::get_if<RankInfoRequest>(&*decoded)) info = &request->sender;
  if (const auto* reply = std::get_if<RankInfoReply>(&*decoded)) info = &reply->sender;
  if (info == nullptr) return 0;

  // Property 1: what the decoder promises of a rank info.
  const Topology& t = info->page_table.topology;
  if (absl::Status valid = ValidatePageTable(info->page_table); !valid.ok()) {
    Broken("decoded a page table that fails validation: " + valid.ToString());
  }
  if (static_cast<uint64_t>(t.tp_size) * static_cast<uint64_t>(t.pp_size) >
      DecodeLimits().max_ranks) {
    Broken("decoded an instance over max_ranks");
  }
  if (t.pp_rank * t.tp_size + t.tp_rank != info->rank) Broken("rank is not its topology's");
  if (const auto* reply = std::get_if<RankInfoReply>(&*decoded);
      reply != nullptr && reply->staging.has_value()) {
    const StagingGrant& staging = *reply->staging;
    if (staging.slot_bytes == 0 || staging.slots == 0 ||
        staging.slot_bytes > staging.region.length / staging.slots) {
      Broken("decoded a staging grant whose slots do not fit its region");
    }
  }

  for (const kvx::transfer_internal::NamedTable& local : kvx::transfer_internal::LocalTables()) {
    CheckHandshake(local, *info);
  }
  return 0;
}
