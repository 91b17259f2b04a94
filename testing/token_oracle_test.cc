#include "testing/token_oracle.h"

#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvx::testing {
namespace {

using ::testing::ElementsAre;
using ::testing::IsEmpty;
using Pair = std::pair<int64_t, int64_t>;

OracleScenario OneGroup(std::optional<int64_t> window, int64_t cached) {
  OracleScenario s;
  s.tokens_per_block = 8;
  s.prompt_len = 32;
  s.receiver_cached_tokens = cached;
  s.groups.push_back({window, false, {10, 11, 12, 13, 90}, {20, 21, 22, 23}});
  return s;
}

// The oracle is the judge of the property test, so it gets its own checks on the
// worked examples of SEMANTICS.md sections 2-5.
TEST(TokenOracle, FullAttentionMovesWhatTheReceiverLacks) {
  EXPECT_THAT(ExpectedMoves(OneGroup(std::nullopt, 0)).pairs[0],
              ElementsAre(Pair{10, 20}, Pair{11, 21}, Pair{12, 22}, Pair{13, 23}));
  EXPECT_THAT(ExpectedMoves(OneGroup(std::nullopt, 16)).pairs[0],
              ElementsAre(Pair{12, 22}, Pair{13, 23}));
  // A partly cached block moves whole.
  EXPECT_THAT(ExpectedMoves(OneGroup(std::nullopt, 20)).pairs[0],
              ElementsAre(Pair{12, 22}, Pair{13, 23}));
  EXPECT_THAT(ExpectedMoves(OneGroup(std::nullopt, 40)).pairs[0], IsEmpty());
}

TEST(TokenOracle, WindowSkipsStaleBlocks) {
  EXPECT_THAT(ExpectedMoves(OneGroup(16, 0)).pairs[0], ElementsAre(Pair{12, 22}, Pair{13, 23}));
  EXPECT_THAT(ExpectedMoves(OneGroup(24, 0)).pairs[0],
              ElementsAre(Pair{11, 21}, Pair{12, 22}, Pair{13, 23}));
  EXPECT_EQ(ExpectedMoves(OneGroup(32, 0)).pairs[0].size(), 4u);
}

TEST(TokenOracle, ChunkStopsAtItsEnd) {
  OracleScenario s = OneGroup(std::nullopt, 0);
  s.slice_end = 16;
  EXPECT_THAT(ExpectedMoves(s).pairs[0], ElementsAre(Pair{10, 20}, Pair{11, 21}));
  s.groups[0].window = 16;
  EXPECT_THAT(ExpectedMoves(s).pairs[0], IsEmpty());
}

TEST(TokenOracle, MissingNeededBlockIsInfeasible) {
  OracleScenario s = OneGroup(std::nullopt, 0);
  s.groups[0].context_table[1] = -1;
  OracleResult r = ExpectedMoves(s);
  EXPECT_FALSE(r.feasible);
  EXPECT_THAT(r.why_infeasible, ::testing::HasSubstr("block=1"));
  // ...but a missing stale block is fine.
  s.groups[0].window = 16;
  EXPECT_TRUE(ExpectedMoves(s).feasible);
}

}  // namespace
}  // namespace kvx::testing
