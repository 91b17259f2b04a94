// File: testing/kv_oracle.h
//
// A byte-level oracle for fragment plans. The model's KV cache is a logical tensor
// [layer][token][kv][head][dim] whose every byte has a deterministic value
// (LogicalByte). CheckScenarioBytes builds both sides' slices with the real
// cache_reuse::BuildSlice over V1-style fake cache managers holding the given
// positional tables (the generation side with its prefix hit), plans them with
// transfer::PlanScenario, shards the logical KV onto the context ranks of the
// Scenario (through each rank's advertised page table and its TP/PP position,
// computed here independently of the planner), fills every generation rank with
// guard bytes, applies every (context rank, generation rank) plan with memcpy, and
// checks that each generation rank holds exactly the logical KV of every token it
// lacked, for the layers and heads it owns, written exactly once, and that every
// other byte (cached and stale blocks, other slots, placeholder pools) is unchanged.
// Mamba state (when the scenario has state layers and both state slots) is a
// logical value per (layer, TP shard, byte) and must arrive likewise.
//
//   transfer::Scenario s = ...;
//   ScenarioCaches caches;
//   caches.generation_cached_tokens = 8;  // a prefix hit of two 4-token blocks
//   EXPECT_OK(kvx::testing::CheckScenarioBytes(s, caches));
//
// Thread safety: pure; allocates the ranks' memory for the duration of the call.

#ifndef KVX_TESTING_KV_ORACLE_H_
#define KVX_TESTING_KV_ORACLE_H_

#include <cstdint>
#include <vector>

#include "absl/base/attributes.h"
#include "absl/status/status.h"
#include "transfer/scenario.h"
#include "transfer/slice.h"

namespace kvx::testing {

// The value of byte `byte` (of the element's dim-major bytes) of the logical KV at
// (layer, token, kv: 0 = K or latent, 1 = V, head).
uint8_t LogicalByte(int64_t layer, int64_t token, int64_t kv, int64_t head, int64_t byte);

// A tiny model for byte-level tests: `layers` full-attention layers in one group,
// tokens per block 4, head size 2, 2-byte elements (one head of one block is 16
// bytes).
transfer::ModelSpec TinyModel(int64_t layers, int64_t heads, bool is_mla = false);

// What the oracle saw.
struct OracleStats {
  int64_t writes = 0;  // fragments applied
  uint64_t bytes_copied = 0;
  uint64_t bytes_checked = 0;
};

// What each side's cache manager holds of the request, the same on every rank of
// an instance.
struct ScenarioCaches {
  // The generation side's prepopulated prompt length (a V1 prefix hit, reuse on;
  // the adapter floors it to a block). The context side holds none.
  int64_t generation_cached_tokens = 0;
  // Positional block tables, one per attention group of the model (entry b holds
  // tokens [b * tpb, (b + 1) * tpb)); an empty vector, or an empty table, means
  // the identity table 0, 1, ..., cdiv(prompt_len, tpb) - 1.
  std::vector<transfer::BlockList> context_tables;
  std::vector<transfer::BlockList> generation_tables;
};

// Builds both slices from `caches`, plans `scenario` with transfer::PlanScenario
// and checks the bytes as described above. An instance whose num_slots is 0 gets
// just enough slots for every id of its tables (so cached and stale blocks are
// checked too). Returns InvalidArgument for tables that are not one per group,
// the slice builder's and planner's errors unchanged, or DataLoss naming the
// generation rank, pool, offset, expected and actual byte and write count of the
// first mismatch. `stats` may be null.
ABSL_MUST_USE_RESULT absl::Status CheckScenarioBytes(const transfer::Scenario& scenario,
                                                     const ScenarioCaches& caches = {},
                                                     OracleStats* stats = nullptr);

}  // namespace kvx::testing

#endif  // KVX_TESTING_KV_ORACLE_H_
