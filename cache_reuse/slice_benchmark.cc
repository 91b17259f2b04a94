// Planning one long request: building both sides' slices (cache_reuse::BuildSlice
// over V2-style paged managers) and pairing them (PairSliceBlocks), for a
// 128k-token prompt with many layer groups, every other one a 4096-token window,
// and a prefix hit on the generation side.
//
//   bazel run -c opt //cache_reuse:slice_benchmark
//
// items_per_second counts blocks planned: block ids in the built lists for
// BM_BuildSlices, pairs for BM_PairSlices and BM_PlanTransfer; "plans" is
// requests planned per second.

#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "benchmark/benchmark.h"
#include "cache_reuse/adapter.h"
#include "cache_reuse/v2_adapter.h"
#include "transfer/slice.h"

namespace kvx::transfer {
namespace {

using cache_reuse::LayerGroupSpec;
using cache_reuse::ValidPages;

constexpr int64_t kPromptLen = 128 * 1024;
constexpr int64_t kWindow = 4096;

// A V2-style manager that knows one request: its committed tokens and, per layer
// group, the pages it still holds.
class InMemoryPagedManager final : public cache_reuse::PagedCacheManager {
 public:
  InMemoryPagedManager(std::optional<int64_t> committed, std::vector<ValidPages> pages)
      : committed_(committed), pages_(std::move(pages)) {}

  std::optional<int64_t> NumCommittedTokens(int64_t request_id) const override {
    return committed_;
  }
  absl::StatusOr<ValidPages> Pages(int64_t request_id, int layer_group) const override {
    return pages_[layer_group];
  }
  bool HasCache(int64_t request_id) const override { return true; }
  absl::Status Commit(int64_t request_id) override { return absl::OkStatus(); }

 private:
  const std::optional<int64_t> committed_;
  const std::vector<ValidPages> pages_;
};

// The benchmark's arguments: tokens per block, layer groups, prefix hit in percent
// of the prompt.
struct Shape {
  int64_t tokens_per_block;
  int64_t num_groups;
  int64_t hit_tokens;
};

Shape ShapeOf(const benchmark::State& state) {
  return {state.range(0), state.range(1), kPromptLen * state.range(2) / 100};
}

std::vector<LayerGroupSpec> Groups(const Shape& shape) {
  std::vector<LayerGroupSpec> groups;
  for (int64_t g = 0; g < shape.num_groups; ++g) {
    groups.push_back(g % 2 == 0 ? LayerGroupSpec::Full() : LayerGroupSpec::Windowed(kWindow));
  }
  return groups;
}

// What a side's manager holds: every block of the prompt and one draft block; a
// windowed group has dropped its stale head. Ids start at `first_id`.
std::vector<ValidPages> HeldPages(const Shape& shape, int64_t first_id) {
  const int64_t total = CeilDiv(kPromptLen, shape.tokens_per_block);
  const int64_t stale_end =
      ComputeWindowBlocks(kPromptLen, kWindow, shape.tokens_per_block).value().stale_end;
  std::vector<ValidPages> pages(shape.num_groups);
  int64_t id = first_id;
  for (int64_t g = 0; g < shape.num_groups; ++g) {
    pages[g].num_dropped_leading = g % 2 == 0 ? 0 : stale_end;
    for (int64_t b = pages[g].num_dropped_leading; b <= total; ++b) pages[g].pages.push_back(id++);
  }
  return pages;
}

cache_reuse::SliceRequest Request(const Shape& shape, cache_reuse::Side side) {
  cache_reuse::SliceRequest request;
  request.request_id = 1;
  request.prompt_len = kPromptLen;
  request.tokens_per_block = shape.tokens_per_block;
  request.side = side;
  return request;
}

PairingOptions Pairing(const Shape& shape) {
  PairingOptions options;
  options.tokens_per_block = shape.tokens_per_block;
  options.prompt_len = kPromptLen;
  for (const LayerGroupSpec& group : Groups(shape)) options.windows.push_back(group.window);
  return options;
}

struct BuiltPair {
  cache_reuse::BuiltSlice src;  // the context side's slice
  cache_reuse::BuiltSlice dst;  // the generation side's
};

// Both sides of one request: managers, adapters and requests, built once.
struct Sides {
  explicit Sides(const Shape& shape)
      : groups(Groups(shape)),
        context_manager(std::nullopt, HeldPages(shape, 0)),
        generation_manager(shape.hit_tokens, HeldPages(shape, int64_t{1} << 40)),
        context(&context_manager, cache_reuse::ReuseOptions{true}),
        generation(&generation_manager, cache_reuse::ReuseOptions{true}),
        context_request(Request(shape, cache_reuse::Side::kContext)),
        generation_request(Request(shape, cache_reuse::Side::kGeneration)),
        options(Pairing(shape)) {}

  // What the timed loops do: both sides' BuildSlice.
  absl::StatusOr<BuiltPair> Build() const {
    absl::StatusOr<cache_reuse::BuiltSlice> src =
        cache_reuse::BuildSlice(context, context_request, groups);
    if (!src.ok()) return src.status();
    absl::StatusOr<cache_reuse::BuiltSlice> dst =
        cache_reuse::BuildSlice(generation, generation_request, groups);
    if (!dst.ok()) return dst.status();
    return BuiltPair{*std::move(src), *std::move(dst)};
  }

  std::vector<LayerGroupSpec> groups;
  InMemoryPagedManager context_manager;
  InMemoryPagedManager generation_manager;
  cache_reuse::V2Adapter context;
  cache_reuse::V2Adapter generation;
  cache_reuse::SliceRequest context_request;
  cache_reuse::SliceRequest generation_request;
  PairingOptions options;
};

int64_t CountIds(const KVSlice& slice) {
  int64_t n = 0;
  for (const BlockList& list : slice.block_ids_per_layer_group) n += list.size();
  return n;
}

int64_t CountPairs(const std::vector<GroupPairing>& pairings) {
  int64_t n = 0;
  for (const GroupPairing& pairing : pairings) n += pairing.src.size();
  return n;
}

void SetCounters(benchmark::State& state, int64_t blocks_per_plan) {
  state.SetItemsProcessed(state.iterations() * blocks_per_plan);
  state.counters["plans"] = benchmark::Counter(state.iterations(), benchmark::Counter::kIsRate);
  state.counters["blocks_per_plan"] = blocks_per_plan;
}

void BM_BuildSlices(benchmark::State& state) {
  const Shape shape = ShapeOf(state);
  Sides sides(shape);
  int64_t blocks = 0;
  for (auto _ : state) {
    absl::StatusOr<BuiltPair> built = sides.Build();
    if (!built.ok()) {
      state.SkipWithError("BuildSlice failed");
      return;
    }
    blocks = CountIds(built->src.slice) + CountIds(built->dst.slice);
    benchmark::DoNotOptimize(built);
  }
  SetCounters(state, blocks);
}

void BM_PairSlices(benchmark::State& state) {
  const Shape shape = ShapeOf(state);
  Sides sides(shape);
  const BuiltPair built = sides.Build().value();
  int64_t pairs = 0;
  for (auto _ : state) {
    absl::StatusOr<std::vector<GroupPairing>> pairings =
        PairSliceBlocks(built.src.slice, built.dst.slice, sides.options);
    if (!pairings.ok()) {
      state.SkipWithError("PairSliceBlocks failed");
      return;
    }
    pairs = CountPairs(*pairings);
    benchmark::DoNotOptimize(pairings);
  }
  SetCounters(state, pairs);
}

void BM_PlanTransfer(benchmark::State& state) {
  const Shape shape = ShapeOf(state);
  Sides sides(shape);
  int64_t pairs = 0;
  for (auto _ : state) {
    absl::StatusOr<BuiltPair> built = sides.Build();
    absl::StatusOr<std::vector<GroupPairing>> pairings =
        built.ok() ? PairSliceBlocks(built->src.slice, built->dst.slice, sides.options)
                   : built.status();
    if (!pairings.ok()) {
      state.SkipWithError("planning failed");
      return;
    }
    pairs = CountPairs(*pairings);
    benchmark::DoNotOptimize(pairings);
  }
  SetCounters(state, pairs);
}

void Shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"tpb", "groups", "hit_pct"})
      ->ArgsProduct({{16, 32}, {64}, {0, 50}})
      ->Unit(benchmark::kMicrosecond);
}

BENCHMARK(BM_BuildSlices)->Apply(Shapes);
BENCHMARK(BM_PairSlices)->Apply(Shapes);
BENCHMARK(BM_PlanTransfer)->Apply(Shapes);

}  // namespace
}  // namespace kvx::transfer
