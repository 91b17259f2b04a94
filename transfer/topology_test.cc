#include "transfer/topology.h"

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "testing/status_matchers.h"

namespace kvx::transfer {
namespace {

using ::kvx::testing::IsOk;
using ::kvx::testing::StatusIs;
using ::testing::HasSubstr;

Topology Make(int64_t tp, int64_t tp_rank, std::vector<int64_t> layers,
              int64_t pp_rank = 0, bool dp = false) {
  Topology t = MakeTopology(tp, std::move(layers), tp_rank, pp_rank);
  t.attention_dp = dp;
  return t;
}

TEST(TpHeadShard, SplitsReplicatesAndKeepsLatent) {
  struct Case {
    std::string name;
    Topology topology;
    HeadModel heads;
    int64_t first, end, duplicates;
  };
  const Case cases[] = {
      {"tp1", Make(1, 0, {4}), {8, false}, 0, 8, 1},
      {"tp4 rank 3", Make(4, 3, {4}), {8, false}, 6, 8, 1},
      {"tp8 equal", Make(8, 5, {4}), {8, false}, 5, 6, 1},
      {"tp8 over 2 heads rank 5", Make(8, 5, {4}), {2, false}, 1, 2, 4},
      {"mla", Make(4, 2, {4}), {8, true}, 0, 1, 4},
      {"attention dp", Make(4, 2, {4}, 0, true), {8, false}, 0, 8, 1},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    ASSERT_OK_AND_ASSIGN(HeadShard shard, TpHeadShard(c.topology, c.heads));
    EXPECT_EQ(shard.heads.first, c.first);
    EXPECT_EQ(shard.heads.end, c.end);
    EXPECT_EQ(shard.duplicates, c.duplicates);
  }
}

TEST(TpHeadShard, RejectsBadInput) {
  EXPECT_THAT(TpHeadShard(Make(3, 0, {4}), {8, false}),
              StatusIs(absl::StatusCode::kUnimplemented, HasSubstr("tp_size=3")));
  EXPECT_THAT(TpHeadShard(Make(4, 4, {4}), {8, false}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("tp_rank=4")));
  EXPECT_THAT(TpHeadShard(Make(2, 0, {4, 0}), {8, false}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("layers=0")));
  EXPECT_THAT(TpHeadShard(Make(2, 0, {4}), {0, false}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("num_kv_heads=0")));
}

struct Expected {
  int64_t peer_rank;
  bool writes;
};

void ExpectLinks(const std::vector<PeerLink>& links, const std::vector<Expected>& want) {
  ASSERT_EQ(links.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    SCOPED_TRACE(i);
    EXPECT_EQ(links[i].peer_rank, want[i].peer_rank);
    EXPECT_EQ(links[i].writes, want[i].writes);
  }
}

TEST(ComputePeerOverlap, FollowsLayersHeadsAndReplicas) {
  struct Case {
    std::string name;
    Topology self;
    Topology peer;
    HeadModel heads;
    Direction direction;
    DpRanks dp;
    std::vector<Expected> want;
  };
  const Case cases[] = {
      {"tp4 to tp8",
       Make(4, 1, {80}),
       Make(8, 0, {80}),
       {8, false},
       Direction::kSend,
       {},
       {{2, true}, {3, true}}},
      {"tp8 to tp4",
       Make(8, 5, {80}),
       Make(4, 0, {80}),
       {8, false},
       Direction::kSend,
       {},
       {{2, true}}},
      {"pp2 stage 1 to pp1",
       Make(1, 0, {40, 40}, 1),
       Make(1, 0, {80}),
       {8, false},
       Direction::kSend,
       {},
       {{0, true}}},
      {"pp1 to uneven pp3",
       Make(1, 0, {7}),
       Make(1, 0, {1, 4, 2}),
       {8, false},
       Direction::kSend,
       {},
       {{0, true}, {1, true}, {2, true}}},
      {"replica sender",
       Make(8, 1, {4}),
       Make(2, 0, {4}),
       {2, false},
       Direction::kSend,
       {},
       {{0, false}}},
      {"receiver sees every replica",
       Make(2, 0, {4}),
       Make(8, 0, {4}),
       {2, false},
       Direction::kReceive,
       {},
       {{0, true}, {1, false}, {2, false}, {3, false}}},
      {"mla receiver",
       Make(2, 1, {4}),
       Make(4, 0, {4}),
       {8, true},
       Direction::kReceive,
       {},
       {{0, false}, {1, true}, {2, false}, {3, false}}},
      {"attention dp",
       Make(2, 1, {4}, 0, true),
       Make(4, 0, {4}, 0, true),
       {8, false},
       Direction::kSend,
       {1, 3},
       {{3, true}}},
      {"attention dp other rank",
       Make(2, 0, {4}, 0, true),
       Make(4, 0, {4}, 0, true),
       {8, false},
       Direction::kSend,
       {1, 3},
       {}},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    ASSERT_OK_AND_ASSIGN(std::vector<PeerLink> links,
                         ComputePeerOverlap(c.self, c.peer, c.heads, c.direction, c.dp));
    ExpectLinks(links, c.want);
  }
}

TEST(ComputePeerOverlap, ReportsSpans) {
  ASSERT_OK_AND_ASSIGN(std::vector<PeerLink> links,
                       ComputePeerOverlap(Make(2, 1, {3, 4}, 1), Make(4, 0, {5, 2}),
                                          {8, false}, Direction::kSend, {}));
  ASSERT_EQ(links.size(), 4u);
  // Self holds layers [3, 7) and heads [4, 8); peer stage 0 [0, 5), stage 1 [5, 7).
  EXPECT_EQ(links[0].peer_rank, 2);
  EXPECT_EQ(links[0].layers.first, 3);
  EXPECT_EQ(links[0].layers.end, 5);
  EXPECT_EQ(links[0].heads.first, 4);
  EXPECT_EQ(links[0].heads.end, 6);
  EXPECT_EQ(links[3].peer_rank, 7);
  EXPECT_EQ(links[3].layers.first, 5);
  EXPECT_EQ(links[3].heads.first, 6);
  EXPECT_EQ(links[3].self_duplicates, 1);
  EXPECT_EQ(links[3].peer_duplicates, 1);
}

TEST(ComputePeerOverlap, ReportsDuplicateHeadFactors) {
  // 2 heads: TP8 holds each 4 times, TP2 once.
  ASSERT_OK_AND_ASSIGN(std::vector<PeerLink> links,
                       ComputePeerOverlap(Make(2, 1, {4}), Make(8, 0, {4}), {2, false},
                                          Direction::kReceive, {}));
  ASSERT_EQ(links.size(), 4u);
  EXPECT_EQ(links[0].peer_rank, 4);
  EXPECT_EQ(links[0].self_duplicates, 1);
  EXPECT_EQ(links[0].peer_duplicates, 4);
  EXPECT_EQ(links[1].writes, true);  // sender 5: 5 % 4 == 1 % 4
}

TEST(ComputePeerOverlap, RejectsMismatchedInstances) {
  EXPECT_THAT(
      ComputePeerOverlap(Make(1, 0, {4}), Make(1, 0, {5}), {8, false}, Direction::kSend,
                         {}),
      StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("receiver_layers=5")));
  EXPECT_THAT(ComputePeerOverlap(Make(2, 0, {4}, 0, true), Make(1, 0, {4}), {8, false},
                                 Direction::kSend, {5, 0}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("dp_rank=5")));
}

// Regression: issue 8, finding 3 (65,536 ranks). A peer's topology is untrusted:
// its size is bounded, and walking it is linear in its ranks and stages.
TEST(ValidateTopology, BoundsTheRanksOfAnInstance) {
  EXPECT_THAT(ValidateTopology(Make(kMaxInstanceRanks, 0, {4})), IsOk());
  EXPECT_THAT(ValidateTopology(Make(kMaxInstanceRanks, 0, {4, 4})),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("instance has too many ranks: tp_size=65536 pp_size=2 "
                                 "max_ranks=65536")));
  Topology huge = Make(int64_t{1} << 40, 0, {4});
  huge.pp_size = int64_t{1} << 40;
  EXPECT_THAT(ValidateTopology(huge), StatusIs(absl::StatusCode::kInvalidArgument,
                                               HasSubstr("max_ranks=65536")));
}

TEST(ComputePeerOverlap, WalksAWideAndDeepPeerInLinearTime) {
  // 65536 one-layer stages: quadratic work here was 4e9 steps.
  const std::vector<int64_t> stages(kMaxInstanceRanks, 1);
  ASSERT_OK_AND_ASSIGN(std::vector<PeerLink> links,
                       ComputePeerOverlap(Make(1, 0, {kMaxInstanceRanks}), Make(1, 0, stages),
                                          {8, false}, Direction::kSend, {}));
  ASSERT_EQ(links.size(), stages.size());
  EXPECT_EQ(links.back().peer_pp_rank, kMaxInstanceRanks - 1);
  EXPECT_EQ(links.back().layers.first, kMaxInstanceRanks - 1);
  ASSERT_OK_AND_ASSIGN(links, ComputePeerOverlap(Make(1, 0, stages, 7), Make(8, 0, {65536}),
                                                 {8, false}, Direction::kReceive, {}));
  ASSERT_EQ(links.size(), 8u);
  EXPECT_EQ(links[3].layers.first, 7);
  EXPECT_EQ(links[3].heads.first, 3);
}

}  // namespace
}  // namespace kvx::transfer
