// Plan building for a Llama-70B-like model (80 layers, 8 KV heads, head size 128,
// bf16, 32 tokens per block) from one context rank to one generation rank:
// fragments before and after coalescing, and the time per emitted fragment.
//
//   bazel run -c opt //transfer:fragments_benchmark
//
// Args: tokens (prompt length), topo (0: TP8 -> TP8, 1: TP4 -> TP8, 2: PP2 -> PP1),
// contiguous (1: block ids 0..n-1 on both sides; 0: shuffled ids).

#include <algorithm>
#include <cstdint>
#include <optional>
#include <random>
#include <vector>

#include "benchmark/benchmark.h"
#include "transfer/fragments.h"
#include "transfer/page_table.h"
#include "transfer/scenario.h"
#include "transfer/slice.h"
#include "transfer/topology.h"

namespace kvx::transfer {
namespace {

void BM_PlanRankPair(benchmark::State& state) {
  const int64_t tokens = state.range(0);
  const int64_t topo = state.range(1);
  const bool contiguous = state.range(2) == 1;
  ModelSpec model;
  model.num_layers = 80;
  model.num_kv_heads = 8;
  model.head_size = 128;
  model.element_bytes = 2;
  model.tokens_per_block = 32;
  model.groups = {GroupSpec{std::nullopt, AllLayers(80)}};
  Topology context = MakeTopology(8, {80});
  Topology generation = MakeTopology(8, {80});
  if (topo == 1) context = MakeTopology(4, {80});
  if (topo == 2) {
    context = MakeTopology(1, {40, 40});
    generation = MakeTopology(1, {80});
  }
  const int64_t blocks = CeilDiv(tokens, model.tokens_per_block);
  absl::StatusOr<RankPageTable> src =
      BuildStandardPageTable(model, context, blocks, uint64_t{1} << 32);
  absl::StatusOr<RankPageTable> dst =
      BuildStandardPageTable(model, generation, blocks, uint64_t{1} << 32);
  if (!src.ok() || !dst.ok()) {
    state.SkipWithError("page table");
    return;
  }
  absl::StatusOr<FragmentPlanner> planner = FragmentPlanner::Create(*src, *dst);
  if (!planner.ok()) {
    state.SkipWithError("planner");
    return;
  }
  GroupPairing pairing;
  for (int64_t b = 0; b < blocks; ++b) {
    pairing.src.push_back(b);
    pairing.dst.push_back(b);
  }
  if (!contiguous) {
    std::mt19937_64 rng(1);
    std::shuffle(pairing.src.begin(), pairing.src.end(), rng);
    std::shuffle(pairing.dst.begin(), pairing.dst.end(), rng);
  }
  const std::vector<GroupPairing> pairings = {pairing};
  FragmentPlan plan;
  for (auto _ : state) {
    if (!planner->PlanInto(pairings, PlanContext{}, &plan).ok()) {
      state.SkipWithError("plan");
      return;
    }
    benchmark::DoNotOptimize(plan.fragments.data());
  }
  const int64_t after = static_cast<int64_t>(plan.fragments.size());
  state.SetItemsProcessed(state.iterations() * after);
  state.SetBytesProcessed(state.iterations() * static_cast<int64_t>(plan.total_bytes));
  state.counters["fragments_before"] =
      static_cast<double>(plan.fragments_before_coalescing);
  state.counters["fragments_after"] = static_cast<double>(after);
  state.counters["runs"] = benchmark::Counter(
      static_cast<double>(after), benchmark::Counter::kIsIterationInvariantRate);
  // Seconds per fragment, before and after coalescing (printed as e.g. "12n").
  state.counters["time_per_fragment_before"] = benchmark::Counter(
      static_cast<double>(plan.fragments_before_coalescing),
      benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
  state.counters["time_per_fragment_after"] = benchmark::Counter(
      static_cast<double>(after),
      benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
}

BENCHMARK(BM_PlanRankPair)
    ->ArgsProduct({{8192, 131072}, {0, 1, 2}, {1, 0}})
    ->ArgNames({"tokens", "topo", "contiguous"});

}  // namespace
}  // namespace kvx::transfer
