// What a transceiver does per request before the first byte moves: build both
// sides' slices through V2 adapters (cache_reuse::BuildSlice), pair them
// (transfer::PairSliceBlocks) and plan the fragments (FragmentPlanner::PlanInto), for
// a 131072-token prompt with 64 layer groups (every other one a 4096-token window),
// once with fresh buffers per request and once reusing them as the transceiver does
// (BuildSliceInto, PairSliceBlocksInto, PlanInto on kept buffers).
//
//   bazel run -c opt //transfer/transceiver:planning_benchmark
//
// Arguments: tokens per block, prefix hit in percent of the prompt, and whether the
// block ids are shuffled (1) or handed out in order (0). items_per_second counts the
// block pairs planned; "fragments" is fragments after coalescing per request.

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <optional>
#include <random>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "benchmark/benchmark.h"
#include "cache_reuse/adapter.h"
#include "cache_reuse/v2_adapter.h"
#include "transfer/fragments.h"
#include "transfer/page_table.h"
#include "transfer/scenario.h"
#include "transfer/slice.h"
#include "transfer/topology.h"

namespace kvx::transceiver {
namespace {

constexpr int64_t kPromptLen = 128 * 1024;
constexpr int64_t kGroups = 64;
constexpr int64_t kWindow = 4096;

// A V2-style manager holding one request: every block of the prompt, a window's
// stale head dropped.
class OneRequestManager final : public cache_reuse::PagedCacheManager {
 public:
  OneRequestManager(std::optional<int64_t> committed, std::vector<cache_reuse::ValidPages> pages)
      : committed_(committed), pages_(std::move(pages)) {}
  std::optional<int64_t> NumCommittedTokens(int64_t) const override { return committed_; }
  absl::StatusOr<cache_reuse::ValidPages> Pages(int64_t, int group) const override {
    return pages_[group];
  }
  bool HasCache(int64_t) const override { return true; }
  absl::Status Commit(int64_t) override { return absl::OkStatus(); }

 private:
  const std::optional<int64_t> committed_;
  const std::vector<cache_reuse::ValidPages> pages_;
};

struct Fixture {
  int64_t tpb = 0;
  std::vector<cache_reuse::LayerGroupSpec> groups;
  std::vector<std::optional<int64_t>> windows;
  std::unique_ptr<OneRequestManager> context_manager;
  std::unique_ptr<OneRequestManager> generation_manager;
  std::unique_ptr<cache_reuse::V2Adapter> context;
  std::unique_ptr<cache_reuse::V2Adapter> generation;
  std::optional<transfer::FragmentPlanner> planner;
};

Fixture MakeFixture(int64_t tpb, int64_t hit_percent, bool shuffled) {
  Fixture f;
  f.tpb = tpb;
  transfer::ModelSpec model;
  model.num_layers = kGroups;
  model.num_kv_heads = 8;
  model.head_size = 128;
  model.element_bytes = 2;
  model.tokens_per_block = tpb;
  for (int64_t g = 0; g < kGroups; ++g) {
    const std::optional<int64_t> window =
        g % 2 == 1 ? std::optional<int64_t>(kWindow) : std::nullopt;
    model.groups.push_back(transfer::GroupSpec{window, {g}});
    f.groups.push_back(window ? cache_reuse::LayerGroupSpec::Windowed(*window)
                              : cache_reuse::LayerGroupSpec::Full());
    f.windows.push_back(window);
  }
  const int64_t total = transfer::CeilDiv(kPromptLen, tpb);
  const int64_t slots = 2 * total + 2;
  const transfer::Topology topology = transfer::MakeTopology(1, {kGroups});
  transfer::RankPageTable context_table =
      transfer::BuildStandardPageTable(model, topology, slots, 0x1000).value();
  transfer::RankPageTable generation_table =
      transfer::BuildStandardPageTable(model, topology, slots, 0x1000).value();
  f.planner = transfer::FragmentPlanner::Create(context_table, generation_table).value();

  std::mt19937_64 rng(7);
  auto pages_for = [&](int64_t first_id) {
    std::vector<cache_reuse::ValidPages> pages(kGroups);
    for (int64_t g = 0; g < kGroups; ++g) {
      std::vector<int64_t> ids(total);
      std::iota(ids.begin(), ids.end(), first_id);
      if (shuffled) std::shuffle(ids.begin(), ids.end(), rng);
      int64_t dropped = 0;
      if (f.windows[g]) {
        dropped = transfer::ComputeWindowBlocks(kPromptLen, kWindow, tpb).value().stale_end;
      }
      pages[g].num_dropped_leading = dropped;
      pages[g].pages.assign(ids.begin() + dropped, ids.end());
    }
    return pages;
  };
  f.context_manager = std::make_unique<OneRequestManager>(std::nullopt, pages_for(0));
  f.generation_manager = std::make_unique<OneRequestManager>(
      kPromptLen * hit_percent / 100, pages_for(total + 1));
  f.context = std::make_unique<cache_reuse::V2Adapter>(f.context_manager.get(),
                                                       cache_reuse::ReuseOptions{true});
  f.generation = std::make_unique<cache_reuse::V2Adapter>(f.generation_manager.get(),
                                                          cache_reuse::ReuseOptions{true});
  return f;
}

cache_reuse::SliceRequest Request(int64_t tpb, cache_reuse::Side side) {
  cache_reuse::SliceRequest request;
  request.request_id = 1;
  request.prompt_len = kPromptLen;
  request.tokens_per_block = tpb;
  request.side = side;
  return request;
}

transfer::PairingOptions Pairing(const Fixture& f) {
  transfer::PairingOptions options;
  options.tokens_per_block = f.tpb;
  options.prompt_len = kPromptLen;
  options.windows = f.windows;
  return options;
}

void Report(benchmark::State& state, int64_t pairs, int64_t fragments) {
  state.SetItemsProcessed(state.iterations() * pairs);
  state.counters["fragments"] = static_cast<double>(fragments);
  state.counters["plans"] = benchmark::Counter(static_cast<double>(state.iterations()),
                                               benchmark::Counter::kIsRate);
}

// Fresh buffers per request: what planning cost before buffers were reused.
void BM_PlanRequestFresh(benchmark::State& state) {
  const Fixture f = MakeFixture(state.range(0), state.range(1), state.range(2) != 0);
  const transfer::PairingOptions options = Pairing(f);
  int64_t pairs = 0, fragments = 0;
  for (auto _ : state) {
    absl::StatusOr<cache_reuse::BuiltSlice> src =
        cache_reuse::BuildSlice(*f.context, Request(f.tpb, cache_reuse::Side::kContext), f.groups);
    absl::StatusOr<cache_reuse::BuiltSlice> dst = cache_reuse::BuildSlice(
        *f.generation, Request(f.tpb, cache_reuse::Side::kGeneration), f.groups);
    absl::StatusOr<std::vector<transfer::GroupPairing>> pairings =
        transfer::PairSliceBlocks(src->slice, dst->slice, options);
    absl::StatusOr<transfer::FragmentPlan> plan =
        f.planner->Plan(*pairings, transfer::PlanContext{});
    if (!plan.ok()) state.SkipWithError(plan.status().ToString().c_str());
    pairs = 0;
    for (const transfer::GroupPairing& g : *pairings) pairs += static_cast<int64_t>(g.src.size());
    fragments = static_cast<int64_t>(plan->fragments.size());
    benchmark::DoNotOptimize(plan->fragments.data());
  }
  Report(state, pairs, fragments);
}

// Buffers kept across requests, as the transceiver keeps them.
void BM_PlanRequestReused(benchmark::State& state) {
  const Fixture f = MakeFixture(state.range(0), state.range(1), state.range(2) != 0);
  const transfer::PairingOptions options = Pairing(f);
  cache_reuse::BuiltSlice src, dst;
  std::vector<transfer::GroupPairing> pairings;
  transfer::FragmentPlan plan;
  int64_t pairs = 0;
  for (auto _ : state) {
    absl::Status s = cache_reuse::BuildSliceInto(
        *f.context, Request(f.tpb, cache_reuse::Side::kContext), f.groups, &src);
    if (s.ok()) {
      s = cache_reuse::BuildSliceInto(*f.generation,
                                      Request(f.tpb, cache_reuse::Side::kGeneration), f.groups,
                                      &dst);
    }
    if (s.ok()) s = transfer::PairSliceBlocksInto(src.slice, dst.slice, options, &pairings);
    if (s.ok()) s = f.planner->PlanInto(pairings, transfer::PlanContext{}, &plan);
    if (!s.ok()) state.SkipWithError(s.ToString().c_str());
    benchmark::DoNotOptimize(plan.fragments.data());
  }
  for (const transfer::GroupPairing& g : pairings) pairs += static_cast<int64_t>(g.src.size());
  Report(state, pairs, static_cast<int64_t>(plan.fragments.size()));
}

// tokens per block x prefix hit % x shuffled ids.
BENCHMARK(BM_PlanRequestFresh)
    ->ArgNames({"tpb", "hit", "shuffled"})
    ->ArgsProduct({{16, 32}, {0, 50}, {0, 1}})
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_PlanRequestReused)
    ->ArgNames({"tpb", "hit", "shuffled"})
    ->ArgsProduct({{16, 32}, {0, 50}, {0, 1}})
    ->Unit(benchmark::kMicrosecond);

}  // namespace
}  // namespace kvx::transceiver

BENCHMARK_MAIN();
