// Writes the generated seeds of the control-plane fuzzers (FUZZING.md): every file
// named seed_* or hostile_* in transfer/protocol_fuzzer_corpus,
// transfer/rank_info_fuzzer_corpus and transfer/session_fuzzer_corpus. Run it after
// changing the protocol (a new version, a new field) or the session fuzzer's input
// format, and commit the result; //transfer:fuzz_seeds_test fails until then.
// Inputs added by hand (crashes found, named crash_*) are left alone.
//
//   bazel run //transfer:fuzz_seeds -- "$PWD/transfer"
//
// Seeds: valid encodings of every message kind (rank info with page tables in the
// standard layout of a few models and shardings, up to the largest instance a
// peer may describe; request data with many groups; both outcomes of a result;
// aux tokens; cancels), hostile bytes (huge declared lengths, deep nesting, maps,
// extensions, truncation, trailing bytes, an unknown kind or version), and session
// scripts (transfer/internal/session_fuzz_ops.h) for the common paths: success,
// reordering, duplication, cancels, failures, fences, deadlines, corrupted
// packets, forged messages, engines that disagree.

#include <cstdint>
#include <cstdio>
#include <fstream>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "transfer/internal/fuzz_models.h"
#include "transfer/internal/session_fuzz_ops.h"
#include "transfer/page_table.h"
#include "transfer/protocol.h"
#include "transfer/slice.h"

namespace kvx::transfer {
namespace {

using transfer_internal::NamedTable;
namespace ops = transfer_internal::session_fuzz;

struct Seed {
  std::string name;
  std::string bytes;
};

RankInfo InfoOf(const NamedTable& table, Role role) {
  RankInfo info;
  info.instance = role == Role::kContext ? "prefill-0" : "decode-0";
  info.role = role;
  const Topology& t = table.table.topology;
  info.rank = t.pp_rank * t.tp_size + t.tp_rank;
  info.control_address = absl::StrCat("tcp://127.0.0.1:", 5000 + info.rank % 1000);
  info.transport_address = std::string("\x02\x00kvx-loopback", 15);
  info.page_table = table.table;
  return info;
}

RankInfoReply ReplyOf(const NamedTable& table) {
  RankInfoReply reply{InfoOf(table, Role::kGeneration), 3, {}};
  uint64_t key = 0x5eed;
  for (const Pool& pool : table.table.pools) {
    reply.grants.push_back(PoolGrant{pool.base_address,
                                     pool.slot_bytes * static_cast<uint64_t>(pool.num_slots),
                                     key++});
  }
  return reply;
}

RequestData Data(size_t groups, size_t ids_per_group) {
  RequestData data;
  data.unique_rid = 0x1234567890;
  data.slice_id = 1;
  data.receiver_rank = 3;
  data.prompt_len = 4096;
  data.token_start = 2048;
  data.token_end = 4096;
  data.is_last_slice = true;
  for (size_t g = 0; g < groups; ++g) {
    BlockList ids;
    for (size_t i = 0; i < ids_per_group; ++i) ids.push_back(static_cast<int64_t>(g * 1000 + i));
    data.block_ids_per_group.push_back(std::move(ids));
  }
  data.dst_start_token = 2048;
  data.aux_slot = 5;
  data.state_slot = 2;
  data.dp_rank = 1;
  data.grant_epoch = 3;
  return data;
}

std::vector<Seed> ProtocolSeeds() {
  std::vector<Seed> seeds;
  for (const NamedTable& table : transfer_internal::LocalTables()) {
    seeds.push_back({"seed_rank_info_request_" + table.name,
                     EncodeMessage(RankInfoRequest{InfoOf(table, Role::kContext)})});
    seeds.push_back({"seed_rank_info_reply_" + table.name, EncodeMessage(ReplyOf(table))});
  }
  const NamedTable& first = transfer_internal::LocalTables().front();
  seeds.push_back({"seed_rank_info_reply_no_grants",
                   EncodeMessage(RankInfoReply{InfoOf(first, Role::kGeneration), 0, {}})});
  const std::string request_data = EncodeMessage(Data(2, 8));
  seeds.push_back({"seed_request_data", request_data});
  seeds.push_back({"seed_request_data_64_groups", EncodeMessage(Data(64, 16))});
  RequestData bare = Data(1, 0);
  bare.dst_start_token.reset();
  bare.aux_slot.reset();
  bare.state_slot.reset();
  seeds.push_back({"seed_request_data_no_options", EncodeMessage(bare)});
  SliceResult success{0x1234567890, 1, 2, SliceOutcome::kSuccess, true, 0, "", true, 1 << 20, 96};
  seeds.push_back({"seed_slice_result_success", EncodeMessage(success)});
  success.staged_chunks = 12;
  seeds.push_back({"seed_slice_result_staged", EncodeMessage(success)});
  SliceResult failed{7,     0, 1, SliceOutcome::kFailed, false,
                     14,    "write failed: request=7 slice=0 receiver=1",
                     false, 0, 0};
  seeds.push_back({"seed_slice_result_failed", EncodeMessage(failed)});
  seeds.push_back({"seed_aux_tokens", EncodeMessage(AuxTokens{7, 1, 3, {151643, 9, 27}})});
  seeds.push_back({"seed_aux_tokens_empty", EncodeMessage(AuxTokens{7, 0, std::nullopt, {}})});
  seeds.push_back({"seed_cancel_from_generation",
                   EncodeMessage(Cancel{7, 2, Role::kGeneration, "cancelled by the engine"})});
  seeds.push_back({"seed_cancel_from_context", EncodeMessage(Cancel{7, 0, Role::kContext, ""})});
  RankInfoReply staging = ReplyOf(first);
  staging.staging = StagingGrant{PoolGrant{0x7f0000000000, 4 << 20, 99}, 1 << 20, 4};
  seeds.push_back({"seed_rank_info_reply_staging", EncodeMessage(staging)});
  staging.grants.clear();
  seeds.push_back({"seed_rank_info_reply_staging_only", EncodeMessage(staging)});
  seeds.push_back({"seed_staged_chunk",
                   EncodeMessage(StagedChunk{7, 1, 0, 2, 41, {{0, 0, 4096}, {1, 1 << 20, 512}}})});
  seeds.push_back({"seed_staging_credit", EncodeMessage(StagingCredit{1, 3, 41})});

  // Hostile bytes, each refused before it allocates by its declared sizes.
  const std::string kRequestDataHead = request_data.substr(0, 3);  // fixarray, kind, version
  seeds.push_back({"hostile_empty", ""});
  // An array32 declaring 2^32 - 1 elements, with none present.
  seeds.push_back({"hostile_huge_array", std::string("\xdd\xff\xff\xff\xff", 5)});
  // RequestData whose group list declares 2^31 lists.
  seeds.push_back({"hostile_huge_group_list",
                   kRequestDataHead + std::string("\x01\x01\x01\x00\x00\x10\xc3"
                                                  "\xdd\x80\x00\x00\x00\x90", 13)});
  // A Cancel's reason (str32) and a rank info (bin32) declaring 4 GiB.
  seeds.push_back({"hostile_huge_str", std::string("\x96\x06\x01\x07\x00\x02\xdb\xff\xff\xff\xff", 11)});
  seeds.push_back({"hostile_huge_bin", std::string("\x93\x01\x01\xc6\xff\xff\xff\xff", 8)});
  seeds.push_back({"hostile_deep_nesting", std::string(64, '\x91') + std::string(1, '\x00')});
  // A Cancel whose role is a map, and one whose role is an extension.
  seeds.push_back({"hostile_map", std::string("\x96\x06\x01\x07\x00\x81\x01\x02\xa0", 9)});
  seeds.push_back({"hostile_ext", std::string("\x96\x06\x01\x07\x00\xd4\x01\x02\xa0", 9)});
  seeds.push_back({"hostile_truncated", request_data.substr(0, request_data.size() - 3)});
  seeds.push_back({"hostile_trailing", request_data + std::string(1, '\xc0')});
  std::string version = request_data;
  version[2] = static_cast<char>(kProtocolVersion + 1);
  seeds.push_back({"hostile_unknown_version", version});
  std::string kind = request_data;
  kind[1] = 9;
  seeds.push_back({"hostile_unknown_kind", kind});
  return seeds;
}

std::vector<Seed> RankInfoSeeds() {
  std::vector<Seed> seeds;
  for (const transfer_internal::FuzzModel& model : transfer_internal::FuzzModels()) {
    for (const NamedTable& peer : transfer_internal::PeerTables(model)) {
      seeds.push_back({"seed_request_" + peer.name,
                       EncodeMessage(RankInfoRequest{InfoOf(peer, Role::kContext)})});
    }
  }
  for (const NamedTable& local : transfer_internal::LocalTables()) {
    seeds.push_back({"seed_reply_" + local.name, EncodeMessage(ReplyOf(local))});
  }
  return seeds;
}

// A session fuzzer input (transfer/internal/session_fuzz_ops.h).
class Script {
 public:
  struct World {
    int senders = 1;
    int receivers = 1;
    int slices = 1;
    std::vector<int> masks;  // per sender; empty: every sender overlaps every receiver
    int sender_deadline_s = 60;
    int receiver_deadline_s = 90;
    std::vector<int> aux = {42};
    int aux_slot = 0;  // 4: none
  };

  explicit Script(const World& w) {
    Put({w.senders - 1, w.receivers - 1, w.slices - 1});
    for (int s = 0; s < w.senders; ++s) Put({w.masks.empty() ? 0 : w.masks[s]});
    Put({w.sender_deadline_s - 1, w.receiver_deadline_s - 1, static_cast<int>(w.aux.size())});
    for (int token : w.aux) Put({token});
    Put({w.aux_slot});
  }

  Script& Do(ops::Op op, std::initializer_list<int> operands) {
    Put({op});
    Put(operands);
    return *this;
  }
  std::string bytes() const { return bytes_; }

 private:
  void Put(std::initializer_list<int> values) {
    for (int v : values) bytes_.push_back(static_cast<char>(v));
  }
  std::string bytes_;
};

std::vector<Seed> SessionSeeds() {
  std::vector<Seed> seeds;
  auto world = [](int senders, int receivers, int slices, std::vector<int> masks = {}) {
    Script::World w;
    w.senders = senders;
    w.receivers = receivers;
    w.slices = slices;
    w.masks = std::move(masks);
    return w;
  };
  Script::World short_sender_deadline = world(1, 1, 1);
  short_sender_deadline.sender_deadline_s = 10;
  Script::World short_receiver_deadline = world(1, 1, 1);
  short_receiver_deadline.receiver_deadline_s = 20;
  auto add = [&](const std::string& name, const Script& script) {
    seeds.push_back({"seed_" + name, script.bytes()});
  };
  // The whole request by hand: data, task, write, result, aux tokens.
  add("one_to_one", Script(world(1, 1, 1))
                        .Do(ops::kStartReceiver, {0})
                        .Do(ops::kDeliver, {0})
                        .Do(ops::kAddSlice, {0, 0, 0})
                        .Do(ops::kEndTransfer, {0, 0, 0})
                        .Do(ops::kDeliver, {0})
                        .Do(ops::kDeliver, {0}));
  // Only the world: the end of the input runs it to completion.
  add("two_by_two_three_slices", Script(world(2, 2, 3)));
  add("partial_overlap", Script(world(3, 2, 2, {1, 2, 3})));
  // The task before the data, packets out of order and twice.
  add("reordered_and_duplicated", Script(world(2, 2, 2))
                                      .Do(ops::kAddSlice, {1, 1, 0})
                                      .Do(ops::kStartReceiver, {1})
                                      .Do(ops::kDuplicate, {2})
                                      .Do(ops::kDeliver, {3})
                                      .Do(ops::kStartReceiver, {0})
                                      .Do(ops::kDeliver, {4})
                                      .Do(ops::kDeliver, {1})
                                      .Do(ops::kAddSlice, {0, 0, 0})
                                      .Do(ops::kAddSlice, {0, 1, 0})
                                      .Do(ops::kEndTransfer, {0, 1, 0})
                                      .Do(ops::kDuplicate, {0}));
  add("receiver_cancels_mid_write", Script(world(1, 1, 2))
                                        .Do(ops::kStartReceiver, {0})
                                        .Do(ops::kDeliver, {0})
                                        .Do(ops::kAddSlice, {0, 0, 0})
                                        .Do(ops::kCancelReceiver, {0})
                                        .Do(ops::kDeliver, {1})
                                        .Do(ops::kEndTransfer, {0, 0, 1})
                                        .Do(ops::kDeliver, {0}));
  add("sender_cancels", Script(world(2, 1, 1))
                            .Do(ops::kStartReceiver, {0})
                            .Do(ops::kCancelSender, {1})
                            .Do(ops::kDeliver, {1}));
  add("unsettled_failure_fences", Script(world(1, 1, 1))
                                      .Do(ops::kStartReceiver, {0})
                                      .Do(ops::kDeliver, {0})
                                      .Do(ops::kAddSlice, {0, 0, 0})
                                      .Do(ops::kEndTransfer, {0, 0, 2})
                                      .Do(ops::kDeliver, {0}));
  add("sender_deadline", Script(short_sender_deadline)
                             .Do(ops::kAddSlice, {0, 0, 0})
                             .Do(ops::kAdvanceTime, {30})
                             .Do(ops::kDeadline, {0}));
  add("receiver_deadline_and_grace", Script(short_receiver_deadline)
                                         .Do(ops::kStartReceiver, {0})
                                         .Do(ops::kDeliver, {0})
                                         .Do(ops::kAddSlice, {0, 0, 0})
                                         .Do(ops::kAdvanceTime, {30})
                                         .Do(ops::kDeadline, {1})
                                         .Do(ops::kAdvanceTime, {3})
                                         .Do(ops::kDeadline, {1}));
  add("truncated_request_data", Script(world(1, 1, 1))
                                    .Do(ops::kStartReceiver, {0})
                                    .Do(ops::kTruncate, {0, 9})
                                    .Do(ops::kDeliver, {0}));
  // Cut to nothing, then cut and flipped again (the fuzzer once divided by zero).
  add("truncated_to_nothing", Script(world(1, 1, 1))
                                  .Do(ops::kStartReceiver, {0})
                                  .Do(ops::kTruncate, {0, 0})
                                  .Do(ops::kTruncate, {0, 5})
                                  .Do(ops::kFlipByte, {0, 0, 1})
                                  .Do(ops::kDeliver, {0}));
  add("unknown_version", Script(world(1, 1, 1))
                             .Do(ops::kStartReceiver, {0})
                             .Do(ops::kBadVersion, {0})
                             .Do(ops::kDeliver, {0}));
  add("flipped_byte", Script(world(1, 1, 1))
                          .Do(ops::kStartReceiver, {0})
                          .Do(ops::kFlipByte, {0, 4, 1})
                          .Do(ops::kDeliver, {0}));
  add("dropped_result", Script(world(1, 1, 1))
                            .Do(ops::kStartReceiver, {0})
                            .Do(ops::kDeliver, {0})
                            .Do(ops::kAddSlice, {0, 0, 0})
                            .Do(ops::kEndTransfer, {0, 0, 0})
                            .Do(ops::kDrop, {0}));
  // A stranger's request data (answered FAILED) and result (ignored); a forged
  // result of a real sender.
  add("forged_messages", Script(world(1, 1, 1))
                             .Do(ops::kStartReceiver, {0})
                             .Do(ops::kForge, {0, 1, 0, 0, 0, 1})
                             .Do(ops::kForge, {1, 1, 0, 0, 0, 1})
                             .Do(ops::kForge, {1, 0, 0, 0, 0, 3})
                             .Do(ops::kDeliver, {1})
                             .Do(ops::kDeliver, {1}));
  // The context engine has one slice fewer than the generation side asks for.
  add("engines_disagree_on_the_last_slice", Script(world(1, 1, 2))
                                                .Do(ops::kStartReceiver, {0})
                                                .Do(ops::kDeliver, {0})
                                                .Do(ops::kDeliver, {0})
                                                .Do(ops::kAddSlice, {0, 0, 3}));
  add("spurious_transfer_end", Script(world(1, 1, 2))
                                   .Do(ops::kSpuriousEnd, {0, 1, 0, 0})
                                   .Do(ops::kSpuriousEnd, {0, 0, 0, 2}));
  add("receiver_fails_before_start", Script(world(1, 1, 1)).Do(ops::kFailReceiver, {0}));
  return seeds;
}

bool Write(const std::string& dir, const std::vector<Seed>& seeds) {
  for (const Seed& seed : seeds) {
    const std::string path = dir + "/" + seed.name;
    std::ofstream file(path, std::ios::binary | std::ios::trunc);
    file.write(seed.bytes.data(), static_cast<std::streamsize>(seed.bytes.size()));
    if (!file) {
      std::fprintf(stderr, "fuzz_seeds: cannot write %s\n", path.c_str());
      return false;
    }
  }
  std::printf("%zu seeds in %s\n", seeds.size(), dir.c_str());
  return true;
}

}  // namespace
}  // namespace kvx::transfer

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: fuzz_seeds DIR (the transfer package: DIR/*_fuzzer_corpus)\n");
    return 1;
  }
  using namespace kvx::transfer;  // NOLINT: one function
  const std::string root = argv[1];
  const bool ok = Write(root + "/protocol_fuzzer_corpus", ProtocolSeeds()) &&
                  Write(root + "/rank_info_fuzzer_corpus", RankInfoSeeds()) &&
                  Write(root + "/session_fuzzer_corpus", SessionSeeds());
  return ok ? 0 : 1;
}
