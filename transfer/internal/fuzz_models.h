// Do not include directly: shared by the handshake fuzzer (rank_info_fuzzer.cc) and
// the generator of its seeds (fuzz_seeds_main.cc).
//
// A few models and, for each, rank page tables in the standard layout
// (transfer/scenario.h): the fixed tables a fuzzed peer's rank info is checked
// against ("this rank"), and the peer shapes the seeds describe. The seeds are
// valid rank infos of the same models, so the fuzzer starts from peers that pass
// CheckCompatible and mutates them from there.

#ifndef KVX_TRANSFER_INTERNAL_FUZZ_MODELS_H_
#define KVX_TRANSFER_INTERNAL_FUZZ_MODELS_H_

#include <string>
#include <vector>

#include "transfer/page_table.h"
#include "transfer/scenario.h"
#include "transfer/topology.h"

namespace kvx::transfer_internal {

struct FuzzModel {
  std::string name;
  transfer::ModelSpec spec;
};

// An 8-layer model with interleaved full and windowed layers, an MLA model, and a
// hybrid with Mamba state layers.
std::vector<FuzzModel> FuzzModels();

struct NamedTable {
  std::string name;
  transfer::RankPageTable table;
};

// This rank's tables: each model under a few shardings (TP, uneven PP, attention
// DP), at one rank each. Built once.
const std::vector<NamedTable>& LocalTables();

// Peer ranks of `model` for the seeds: every sharding from TP1 to the largest
// instance ValidateTopology admits (kMaxInstanceRanks ranks, over every PP stage
// the model has), at their last rank.
std::vector<NamedTable> PeerTables(const FuzzModel& model);

}  // namespace kvx::transfer_internal

#endif  // KVX_TRANSFER_INTERNAL_FUZZ_MODELS_H_
