// libFuzzer target for the planner's entry points, fed well-formed but random
// scenarios: a small model (layers in 1-3 groups, windows, MLA, Mamba state), two
// instances sharded at random (TP, uneven PP, attention DP), a prompt, a chunk, a
// prefix hit and positional block tables (shuffled ids, evicted stale heads, draft
// blocks, a slot count that may be too small). The bytes steer every choice, so
// libFuzzer's coverage feedback explores the planner's branches. For each input:
//
//   1. testing::CheckScenarioBytes builds both slices (cache_reuse::BuildSlice),
//      plans them (transfer::PlanScenario), applies every fragment with memcpy and
//      checks every byte of every generation rank: a DataLoss is a planning bug.
//   2. PlanScenario on slices cut from the same tables, listing every fragment and
//      listing only k: the counts agree, the short list is a prefix of the long
//      one, every fragment lies inside a registered pool, and
//      FragmentPlanner::PlanInto on the same tables and pairs builds exactly the
//      listed plan (PlanScenario itself goes through FragmentPlanner::Count).
//
// Any error must be a one-line Status that is not kInternal; a broken property
// aborts with the reason. No crash, no sanitizer report.
//
//   bazel build --config=fuzz //transfer:planner_fuzzer
//   bazel-bin/transfer/planner_fuzzer -timeout=5 -rss_limit_mb=1024 \
//       -max_total_time=60 /tmp/corpus transfer/planner_fuzzer_corpus

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "testing/fuzz_bytes.h"
#include "testing/kv_oracle.h"
#include "transfer/fragments.h"
#include "transfer/scenario.h"
#include "transfer/slice.h"
#include "transfer/topology.h"

namespace kvx::transfer {
namespace {

using ::kvx::testing::FuzzBytes;

[[noreturn]] void Broken(const std::string& what) {
  std::fprintf(stderr, "planner property broken: %s\n", what.c_str());
  std::abort();
}

// Errors are for the caller to read: one line, never a caught planner bug.
void CheckError(const absl::Status& status, const char* where) {
  if (status.ok()) return;
  const std::string message(status.message());
  if (status.code() == absl::StatusCode::kInternal ||
      status.code() == absl::StatusCode::kDataLoss ||
      message.find('\n') != std::string::npos) {
    Broken(std::string(where) + ": " + status.ToString());
  }
}

// Splits `layers` into `stages` non-empty consecutive runs.
std::vector<int64_t> Split(FuzzBytes& in, int64_t layers, int64_t stages) {
  std::vector<int64_t> split(stages, 1);
  for (int64_t extra = layers - stages; extra > 0; --extra) ++split[in.Int(0, stages - 1)];
  return split;
}

Scenario RandomScenario(FuzzBytes& in) {
  Scenario s;
  const int64_t layers = in.Int(1, 6);
  s.model = testing::TinyModel(layers, in.Pick({1, 2, 4, 8}), in.OneIn(8));
  s.model.head_size = in.Int(1, 4);
  s.model.element_bytes = in.Int(1, 2);
  s.model.tokens_per_block = in.Int(1, 8);
  const int64_t groups = in.Int(1, std::min<int64_t>(3, layers));
  s.model.groups.assign(groups, GroupSpec{});
  for (int64_t l = 0; l < layers; ++l) {
    s.model.groups[l < groups ? l : in.Int(0, groups - 1)].global_layer_ids.push_back(l);
  }
  for (GroupSpec& group : s.model.groups) {
    if (in.OneIn(2)) group.window = in.Int(1, 40);
  }
  if (in.OneIn(4)) {
    for (int64_t l = 0; l < layers; ++l) {
      if (in.OneIn(2)) s.model.state_layer_ids.push_back(l);
    }
    s.model.state_bytes_per_layer = static_cast<uint64_t>(in.Int(1, 8));
    if (in.OneIn(2)) s.request.context_state_slot = in.Int(0, 4);
    if (in.OneIn(2)) s.request.generation_state_slot = in.Int(0, 4);
  }
  for (InstanceSpec* instance : {&s.context, &s.generation}) {
    const int64_t tp = in.Pick({1, 2, 4, 8});
    instance->topology =
        MakeTopology(tp, Split(in, layers, in.Int(1, std::min<int64_t>(3, layers))));
    instance->topology.attention_dp = in.OneIn(5);
    if (in.OneIn(6)) instance->num_slots = in.Int(1, 48);
  }
  s.request.prompt_len = in.Int(0, 64);
  s.request.context_dp_rank = in.Int(0, s.context.topology.tp_size - 1);
  s.request.generation_dp_rank = in.Int(0, s.generation.topology.tp_size - 1);
  return s;
}

// One positional table per group: distinct shuffled ids, a few draft blocks, and
// sometimes an evicted (-1) stale head.
std::vector<BlockList> RandomTables(FuzzBytes& in, const Scenario& s, int64_t total) {
  std::vector<BlockList> tables;
  for (size_t g = 0; g < s.model.groups.size(); ++g) {
    BlockList ids(static_cast<size_t>(total + in.Int(0, 2)));
    for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int64_t>(i);
    for (size_t i = ids.size(); i > 1; --i) std::swap(ids[i - 1], ids[in.Int(0, i - 1)]);
    if (in.OneIn(4)) {
      std::fill(ids.begin(), ids.begin() + in.Int(0, total), int64_t{-1});  // evicted
    }
    tables.push_back(std::move(ids));
  }
  return tables;
}

// A slice of the tables: per group the suffix from a random first block up to the
// slice's last block, plus sometimes the next (draft) one.
KVSlice CutSlice(FuzzBytes& in, const std::vector<BlockList>& tables,
                 std::optional<TokenRange> range, int64_t total) {
  KVSlice slice;
  slice.token_range = range;
  for (const BlockList& table : tables) {
    const int64_t first = in.Int(0, total);
    const int64_t end = std::min<int64_t>(total + in.Int(0, 1), table.size());
    slice.block_ids_per_layer_group.emplace_back(table.begin() + std::min(first, end),
                                                 table.begin() + end);
  }
  return slice;
}

// Property 2: listing all, listing k and PlanInto agree.
void CheckListing(FuzzBytes& in, Scenario s, const KVSlice& src, const KVSlice& dst) {
  s.max_fragments_listed.reset();
  const absl::StatusOr<ScenarioPlan> all = PlanScenario(s, src, dst);
  s.max_fragments_listed = in.Int(0, 4);
  const absl::StatusOr<ScenarioPlan> some = PlanScenario(s, src, dst);
  CheckError(all.status(), "PlanScenario");
  CheckError(some.status(), "PlanScenario listing k");
  if (!all.ok()) {
    // Listing fewer can only avoid the held-fragments bound, never another error.
    if (all.status().code() != absl::StatusCode::kResourceExhausted &&
        some.status() != all.status()) {
      Broken("listing k changes the error: " + all.status().ToString() + " vs " +
             some.status().ToString());
    }
    return;
  }
  if (!some.ok() || some->pairs.size() != all->pairs.size() ||
      some->total_bytes != all->total_bytes ||
      some->fragments_before_coalescing != all->fragments_before_coalescing ||
      some->fragments_after_coalescing != all->fragments_after_coalescing) {
    Broken("listing k changes the plan's totals");
  }
  PairingOptions options;
  options.tokens_per_block = s.model.tokens_per_block;
  options.prompt_len = s.request.prompt_len;
  for (const GroupSpec& group : s.model.groups) options.windows.push_back(group.window);
  const absl::StatusOr<std::vector<GroupPairing>> pairings = PairSliceBlocks(src, dst, options);
  if (!pairings.ok()) Broken("pairing fails after planning: " + pairings.status().ToString());
  PlanContext context;
  context.src_state_slot = s.request.context_state_slot;
  context.dst_state_slot = s.request.generation_state_slot;
  uint64_t total_bytes = 0;
  for (size_t p = 0; p < all->pairs.size(); ++p) {
    const RankPairPlan& pair = all->pairs[p];
    const RankPairPlan& short_pair = some->pairs[p];
    const RankPageTable& sender = all->context_tables[pair.context_rank];
    const RankPageTable& receiver = all->generation_tables[pair.generation_rank];
    const std::vector<Fragment>& listed = pair.plan.fragments;
    const size_t k = static_cast<size_t>(*s.max_fragments_listed);
    if (static_cast<int64_t>(listed.size()) != pair.fragments_after_coalescing ||
        short_pair.fragments_after_coalescing != pair.fragments_after_coalescing ||
        short_pair.plan.total_bytes != pair.plan.total_bytes ||
        short_pair.plan.fragments.size() != std::min(k, listed.size()) ||
        !std::equal(short_pair.plan.fragments.begin(), short_pair.plan.fragments.end(),
                    listed.begin())) {
      Broken("a pair's short list is not the prefix of its whole plan");
    }
    if (absl::Status valid = ValidateFragments(listed, sender, receiver); !valid.ok()) {
      Broken("fragment outside a pool: " + valid.ToString());
    }
    absl::StatusOr<FragmentPlanner> planner = FragmentPlanner::Create(sender, receiver);
    if (!planner.ok()) Broken("planner fails after planning: " + planner.status().ToString());
    absl::StatusOr<FragmentPlan> plan = planner->Plan(*pairings, context);
    if (!plan.ok() || plan->fragments != listed ||
        plan->total_bytes != pair.plan.total_bytes ||
        plan->fragments_before_coalescing != pair.plan.fragments_before_coalescing) {
      Broken("PlanInto and Count disagree");
    }
    uint64_t bytes = 0;
    for (const Fragment& f : listed) bytes += f.bytes;
    if (bytes != pair.plan.total_bytes) Broken("a pair's bytes are not its fragments' sum");
    total_bytes += bytes;
  }
  if (total_bytes != all->total_bytes) Broken("the plan's bytes are not its pairs' sum");
}

}  // namespace
}  // namespace kvx::transfer

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace kvx::transfer;  // NOLINT: one function
  FuzzBytes in(data, size);
  const Scenario s = RandomScenario(in);
  const int64_t total = CeilDiv(s.request.prompt_len, s.model.tokens_per_block);
  kvx::testing::ScenarioCaches caches;
  caches.generation_cached_tokens = in.Int(0, s.request.prompt_len);
  if (!in.OneIn(3)) {
    caches.context_tables = RandomTables(in, s, total);
    caches.generation_tables = RandomTables(in, s, total);
  }
  // Property 1: every byte lands where the logical KV says, and nowhere else.
  CheckError(kvx::testing::CheckScenarioBytes(s, caches), "CheckScenarioBytes");

  // Property 2, on a chunk of the prompt cut from the same tables.
  if (caches.context_tables.empty() || s.request.prompt_len == 0) return 0;
  const int64_t end = in.Int(1, s.request.prompt_len);
  const std::optional<TokenRange> range = TokenRange::Create(0, end).value();
  const int64_t slice_total = CeilDiv(end, s.model.tokens_per_block);
  const KVSlice src = CutSlice(in, caches.context_tables, range, slice_total);
  const KVSlice dst = CutSlice(in, caches.generation_tables, range, slice_total);
  CheckListing(in, s, src, dst);
  return 0;
}
