// Runs the README's integration example (readme_example.cc) as an engine would:
// one prefill rank and one decode rank over libfabric tcp on 127.0.0.1.

#include "transfer/transceiver/readme_example.h"

#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <vector>

#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "cache_reuse/v2_adapter.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "testing/fake_cache_managers.h"
#include "testing/status_matchers.h"
#include "transfer/page_table.h"
#include "transfer/protocol.h"
#include "transfer/scenario.h"
#include "transfer/topology.h"

namespace kvx_readme {
namespace {

using ::testing::ElementsAre;

struct Memory {
  std::vector<unsigned char> bytes;
  kvx::transfer::RankPageTable table;
};

Memory Pools(unsigned char fill) {
  kvx::transfer::ModelSpec model;
  model.num_layers = 2;
  model.num_kv_heads = 2;
  model.head_size = 8;
  model.element_bytes = 2;
  model.tokens_per_block = 16;
  model.groups = {kvx::transfer::GroupSpec{std::nullopt, kvx::transfer::AllLayers(2)}};
  Memory m;
  const kvx::transfer::Topology topology = kvx::transfer::MakeTopology(1, {2});
  const uint64_t slot = kvx::transfer::BuildStandardPageTable(model, topology, 1, 0x1000)
                            .value()
                            .pools[0]
                            .slot_bytes;
  m.bytes.assign(slot * 32, fill);
  m.table = kvx::transfer::BuildStandardPageTable(model, topology, 32,
                                                  reinterpret_cast<uint64_t>(m.bytes.data()))
                .value();
  return m;
}

TEST(ReadmeExample, MovesTheKvOfOneRequest) {
  Memory prefill_memory = Pools(0x11);
  Memory decode_memory = Pools(0x00);
  kvx::testing::FakePagedCacheManager prefill_cache, decode_cache;
  prefill_cache.AddRequestFromTables(17, std::nullopt, {{0, 1, 2, 3}});
  decode_cache.AddRequestFromTables(17, std::nullopt, {{4, 5, 6, 7}});
  kvx::cache_reuse::V2Adapter prefill_adapter(&prefill_cache, {true});
  kvx::cache_reuse::V2Adapter decode_adapter(&decode_cache, {true});

  ASSERT_OK_AND_ASSIGN(auto prefill, StartRank(kvx::transfer::Role::kContext, "prefill-0",
                                               prefill_memory.table, &prefill_adapter));
  ASSERT_OK_AND_ASSIGN(auto decode, StartRank(kvx::transfer::Role::kGeneration, "decode-0",
                                              decode_memory.table, &decode_adapter));
  ASSERT_OK(decode->AddPeerInstance({prefill->control_address()},
                                    absl::Now() + absl::Seconds(20)));
  ASSERT_OK(SendKv(*prefill, 17, 64, /*first_token=*/42));
  ASSERT_OK_AND_ASSIGN(std::vector<int64_t> aux, ReceiveKv(*decode, 17, 64));
  EXPECT_THAT(aux, ElementsAre(42));
  const uint64_t slot = decode_memory.table.pools[0].slot_bytes;
  EXPECT_EQ(std::memcmp(decode_memory.bytes.data() + 4 * slot, prefill_memory.bytes.data(),
                        4 * slot),
            0);
  EXPECT_EQ(decode_memory.bytes[3 * slot], 0x00);  // Slot 3 is not the request's.
}

}  // namespace
}  // namespace kvx_readme
