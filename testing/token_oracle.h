// File: testing/token_oracle.h
//
// A token-level oracle for what a transfer must move: given the *full* positional
// block tables of both sides, the prompt length, the windows and how many prompt
// tokens the receiver already holds, it says which (source id, destination id)
// pairs must move, by walking the token positions of each block. It uses none of
// the pairing formulas of SEMANTICS.md section 5 (no stale_end, no suffix starts,
// no alignment), so a property test can hold the real slice building and pairing
// against it.
//
//   OracleScenario s;
//   s.tokens_per_block = 8;
//   s.prompt_len = 32;
//   s.receiver_cached_tokens = 16;
//   s.groups.push_back({std::nullopt, false, {10, 11, 12, 13}, {20, 21, 22, 23}});
//   OracleResult r = ExpectedMoves(s);  // r.pairs[0] == {{12, 22}, {13, 23}}
//
// Thread safety: pure.

#ifndef KVX_TESTING_TOKEN_ORACLE_H_
#define KVX_TESTING_TOKEN_ORACLE_H_

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "transfer/slice.h"

namespace kvx::testing {

struct OracleGroup {
  std::optional<int64_t> window;  // nullopt: full attention
  bool mamba = false;
  // Positional tables: entry b holds tokens [b * tpb, (b + 1) * tpb); -1 where the
  // side does not hold it; entries past the prompt are draft-token blocks.
  transfer::BlockList context_table;
  transfer::BlockList generation_table;
};

struct OracleScenario {
  int64_t tokens_per_block = 0;
  int64_t prompt_len = 0;
  // The slice's end token (a chunk); the prompt length when absent.
  std::optional<int64_t> slice_end;
  // Prompt tokens the receiver's cache already holds, exactly as its manager
  // reports them (not floored); 0 when reuse does not apply.
  int64_t receiver_cached_tokens = 0;
  std::vector<OracleGroup> groups;
};

struct OracleResult {
  // False when the sender lacks a block of the window below the slice end (it
  // builds its slice without knowing the receiver's cache), or the receiver lacks
  // a destination for a block that must move: the transfer must be refused.
  bool feasible = true;
  std::string why_infeasible;
  // Per group, (source id, destination id) in token order.
  std::vector<std::vector<std::pair<int64_t, int64_t>>> pairs;
};

// A block must move when (1) it lies below the slice's end, (2) some position in
// it is attended to by the next token (position prompt_len sees
// [prompt_len + 1 - W, prompt_len]) for a windowed group, and (3) some position in
// it is not among the receiver's cached tokens (a partly cached block moves).
OracleResult ExpectedMoves(const OracleScenario& scenario);

}  // namespace kvx::testing

#endif  // KVX_TESTING_TOKEN_ORACLE_H_
