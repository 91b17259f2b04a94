#include "transfer/page_table.h"

#include <cstdint>
#include <functional>
#include <limits>
#include <optional>
#include <string>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "testing/status_matchers.h"
#include "transfer/topology.h"

namespace kvx::transfer {
namespace {

using ::kvx::testing::IsOk;
using ::kvx::testing::StatusIs;
using ::testing::HasSubstr;

// Two layers of 4 heads, tpb 4, head size 8, bf16: K0 V0 K1 V1 in a slot, plus a
// Mamba state pool.
RankPageTable ValidTable() {
  RankPageTable table;
  table.tokens_per_block = 4;
  table.head_size = 8;
  table.element_bytes = 2;
  table.num_kv_heads = 4;
  table.topology.layers_per_pp_rank = {2};
  const uint64_t kv = 4 * 4 * 8 * 2;
  table.pools = {Pool{1 << 20, 4 * kv, 16, PoolRole::kKVCache},
                 Pool{1 << 24, 256, 4, PoolRole::kMambaState}};
  AttentionGroup group;
  group.kv_heads_per_rank = 4;
  group.global_layer_ids = {0, 1};
  group.view = PoolView{0, {{0, kv}, {2 * kv, 3 * kv}}};
  table.attention_groups = {group};
  table.state_groups = {StateGroup{{0, 1}, 1, {{0, 128}, {128, 128}}}};
  return table;
}

TEST(ValidatePageTable, AcceptsAConsistentTable) {
  EXPECT_THAT(ValidatePageTable(ValidTable()), IsOk());
  EXPECT_EQ(KVBufferBytes(ValidTable(), ValidTable().attention_groups[0]), 256u);
  // A Mamba state layer needs no attention group.
  RankPageTable state_only = ValidTable();
  state_only.attention_groups[0].global_layer_ids = {0};
  state_only.attention_groups[0].view.layers.pop_back();
  EXPECT_THAT(ValidatePageTable(state_only), IsOk());
}

TEST(ValidatePageTable, RejectsMalformedPeerTables) {
  struct Case {
    std::string name;
    std::function<void(RankPageTable&)> mutate;
    std::string message;
  };
  const Case cases[] = {
      {"zero tokens per block", [](RankPageTable& t) { t.tokens_per_block = 0; },
       "tokens_per_block=0"},
      {"zero slot bytes", [](RankPageTable& t) { t.pools[0].slot_bytes = 0; },
       "slot_bytes=0"},
      {"no slots", [](RankPageTable& t) { t.pools[1].num_slots = 0; }, "num_slots=0"},
      {"pool wraps the address space",
       [](RankPageTable& t) {
         t.pools[0].base_address = std::numeric_limits<uint64_t>::max() - 100;
       },
       "pool=0"},
      {"pools overlap",
       [](RankPageTable& t) { t.pools[1].base_address = (1 << 20) + 64; },
       "pools overlap"},
      {"view outside its slot",
       [](RankPageTable& t) { t.attention_groups[0].view.layers[1].v_offset = 900; },
       "v_offset=900"},
      {"heads per rank not the tp share",
       [](RankPageTable& t) { t.attention_groups[0].kv_heads_per_rank = 2; },
       "expected=4"},
      {"layer outside the pp span",
       [](RankPageTable& t) { t.attention_groups[0].global_layer_ids[1] = 2; },
       "layer=2"},
      {"layer ids not increasing",
       [](RankPageTable& t) {
         t.attention_groups[0].global_layer_ids = {1, 1};
       },
       "index=1"},
      {"view entries missing",
       [](RankPageTable& t) { t.attention_groups[0].view.layers.pop_back(); },
       "entries=1"},
      {"view names a state pool",
       [](RankPageTable& t) { t.attention_groups[0].view.pool_index = 1; }, "pool=1"},
      {"view names no pool",
       [](RankPageTable& t) { t.attention_groups[0].view.pool_index = -1; }, "pool=-1"},
      {"window zero", [](RankPageTable& t) { t.attention_groups[0].window = 0; },
       "window=0"},
      {"state outside its slot",
       [](RankPageTable& t) { t.state_groups[0].layers[1].offset = 200; }, "offset=200"},
      {"state empty", [](RankPageTable& t) { t.state_groups[0].layers[0].bytes = 0; },
       "bytes=0"},
      {"buffer size overflows",
       [](RankPageTable& t) {
         t.tokens_per_block = 1 << 20;
         t.head_size = 1 << 20;
         t.element_bytes = 1 << 20;
         t.num_kv_heads = 1 << 20;
       },
       "kv buffer size overflows"},
      {"slice group twice",
       [](RankPageTable& t) {
         t.slice_groups = {0, 0};
       },
       "slice_group=1 attention_group=0"},
      {"slice group missing",
       [](RankPageTable& t) { t.slice_groups = {kStateSliceGroup}; },
       "attention_group=0"},
      {"slice group out of range",
       [](RankPageTable& t) {
         t.slice_groups = {0, 3};
       },
       "attention_group=3"},
      {"bad topology", [](RankPageTable& t) { t.topology.tp_rank = 1; }, "tp_rank=1"},
      // Regression: issue 8, semantics gap 2: a layer in two groups would be
      // written twice, a layer in none never.
      {"layer in two attention groups",
       [](RankPageTable& t) {
         AttentionGroup other = t.attention_groups[0];
         other.global_layer_ids = {1};
         other.view.layers.pop_back();
         t.attention_groups.push_back(other);
         t.slice_groups.clear();
       },
       "layer in two attention groups: layer=1 group=0 other_group=1"},
      {"layer in no group",
       [](RankPageTable& t) {
         t.attention_groups[0].global_layer_ids = {0};
         t.attention_groups[0].view.layers.pop_back();
         t.state_groups.clear();
       },
       "layer in no attention group and not a state layer: layer=1 first=0 end=2"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    RankPageTable table = ValidTable();
    c.mutate(table);
    EXPECT_THAT(ValidatePageTable(table),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(c.message)));
  }
}

TEST(CheckCompatible, NamesTheFieldThatDiffers) {
  struct Case {
    std::function<void(RankPageTable&)> mutate;
    std::string message;
  };
  const Case cases[] = {
      {[](RankPageTable& t) { t.tokens_per_block = 8; },
       "field=tokens_per_block self=4 peer=8"},
      {[](RankPageTable& t) { t.head_size = 16; }, "field=head_size self=8 peer=16"},
      {[](RankPageTable& t) { t.element_bytes = 1; }, "field=element_bytes"},
      {[](RankPageTable& t) { t.topology.layers_per_pp_rank = {3}; },
       "field=total_layers self=2 peer=3"},
      {[](RankPageTable& t) { t.is_mla = true; }, "field=is_mla self=0 peer=1"},
      {[](RankPageTable& t) { t.num_kv_heads = 8; }, "field=num_kv_heads"},
      {[](RankPageTable& t) { t.attention_groups.push_back(t.attention_groups[0]); },
       "field=attention_groups self=1 peer=2"},
      {[](RankPageTable& t) { t.attention_groups[0].window = 64; },
       "field=window group=0 self=0 peer=64"},
      {[](RankPageTable& t) {
         t.slice_groups = {kStateSliceGroup, 0};
       },
       "field=slice_groups"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.message);
    RankPageTable peer = ValidTable();
    c.mutate(peer);
    EXPECT_THAT(CheckCompatible(ValidTable(), peer),
                StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr(c.message)));
  }
  EXPECT_THAT(CheckCompatible(ValidTable(), ValidTable()), IsOk());
}

TEST(CheckCompatible, RejectsALayerUnderDifferentGroups) {
  RankPageTable self = ValidTable();
  self.attention_groups.push_back(self.attention_groups[0]);
  self.attention_groups[0].global_layer_ids = {0};
  self.attention_groups[0].view.layers.pop_back();
  self.attention_groups[1].global_layer_ids = {1};
  self.attention_groups[1].view.layers.pop_back();
  ASSERT_THAT(ValidatePageTable(self), IsOk());
  RankPageTable peer = self;
  peer.attention_groups[0].global_layer_ids = {1};
  peer.attention_groups[1].global_layer_ids = {0};
  EXPECT_THAT(CheckCompatible(self, peer),
              StatusIs(absl::StatusCode::kFailedPrecondition,
                       HasSubstr("field=layer_group layer=1 self=1 peer=0")));
}

}  // namespace
}  // namespace kvx::transfer
