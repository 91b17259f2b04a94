#include "transfer/internal/fuzz_models.h"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "transfer/page_table.h"
#include "transfer/scenario.h"
#include "transfer/topology.h"

namespace kvx::transfer_internal {
namespace {

using transfer::GroupSpec;
using transfer::MakeTopology;
using transfer::ModelSpec;
using transfer::RankPageTable;
using transfer::Topology;

constexpr int64_t kSlots = 64;
constexpr uint64_t kBase = uint64_t{1} << 32;

// The tables are built from constants: a failure is a bug of this file.
RankPageTable Build(const ModelSpec& model, const Topology& topology) {
  absl::StatusOr<RankPageTable> table =
      transfer::BuildStandardPageTable(model, topology, kSlots, kBase);
  if (!table.ok()) {
    std::fprintf(stderr, "fuzz model does not build: %s\n", table.status().ToString().c_str());
    std::abort();
  }
  return *std::move(table);
}

Topology WithDp(Topology t) {
  t.attention_dp = true;
  return t;
}

}  // namespace

std::vector<FuzzModel> FuzzModels() {
  ModelSpec interleaved;
  interleaved.num_layers = 8;
  interleaved.num_kv_heads = 8;
  interleaved.head_size = 16;
  interleaved.element_bytes = 2;
  interleaved.tokens_per_block = 16;
  interleaved.groups = {GroupSpec{std::nullopt, {0, 2, 4, 6}}, GroupSpec{64, {1, 3, 5, 7}}};

  ModelSpec mla;
  mla.num_layers = 4;
  mla.num_kv_heads = 1;
  mla.head_size = 72;
  mla.element_bytes = 2;
  mla.tokens_per_block = 32;
  mla.is_mla = true;
  mla.groups = {GroupSpec{std::nullopt, transfer::AllLayers(4)}};

  ModelSpec hybrid;
  hybrid.num_layers = 6;
  hybrid.num_kv_heads = 4;
  hybrid.head_size = 8;
  hybrid.element_bytes = 4;
  hybrid.tokens_per_block = 8;
  hybrid.groups = {GroupSpec{std::nullopt, {0, 1, 4, 5}}};
  hybrid.state_layer_ids = {2, 3};
  hybrid.state_bytes_per_layer = 96;
  return {{"interleaved", interleaved}, {"mla", mla}, {"hybrid", hybrid}};
}

const std::vector<NamedTable>& LocalTables() {
  static const std::vector<NamedTable>* const tables = [] {
    const std::vector<FuzzModel> models = FuzzModels();
    const ModelSpec& interleaved = models[0].spec;
    const ModelSpec& mla = models[1].spec;
    const ModelSpec& hybrid = models[2].spec;
    return new std::vector<NamedTable>{
        {"interleaved_tp2_rank1", Build(interleaved, MakeTopology(2, {8}, 1))},
        {"interleaved_pp2_stage1", Build(interleaved, MakeTopology(1, {3, 5}, 0, 1))},
        {"interleaved_tp4_dp_rank3", Build(interleaved, WithDp(MakeTopology(4, {8}, 3)))},
        {"mla_tp2_rank1", Build(mla, MakeTopology(2, {4}, 1))},
        {"hybrid_tp2_rank0", Build(hybrid, MakeTopology(2, {6}))},
    };
  }();
  return *tables;
}

std::vector<NamedTable> PeerTables(const FuzzModel& model) {
  const int64_t layers = model.spec.num_layers;
  // Every PP stage one layer: the most stages the model allows.
  const std::vector<int64_t> one_each(static_cast<size_t>(layers), 1);
  const int64_t max_ranks = transfer::kMaxInstanceRanks;
  // A power of two, so that the model's head count divides it.
  int64_t most_tp_over_all_stages = 1;
  while (2 * most_tp_over_all_stages * layers <= max_ranks) most_tp_over_all_stages *= 2;
  struct Shape {
    std::string name;
    int64_t tp;
    std::vector<int64_t> stages;
    bool dp;
  };
  const std::vector<Shape> shapes = {
      {"tp1", 1, {layers}, false},
      {"tp2", 2, {layers}, false},
      {"tp4", 4, {layers}, false},
      {"tp8", 8, {layers}, false},
      {"tp16", 16, {layers}, false},
      {"tp4_dp", 4, {layers}, true},
      {"tp2_pp2", 2, {1, layers - 1}, false},
      {"tp1_pp_all", 1, one_each, false},
      // The largest instances: kMaxInstanceRanks ranks in one stage, or nearly
      // as many over every stage the model has.
      {"tp65536", max_ranks, {layers}, false},
      {"tp_max_pp_all", most_tp_over_all_stages, one_each, false},
      {"tp_max_pp_all_dp", most_tp_over_all_stages, one_each, true},
  };
  std::vector<NamedTable> tables;
  for (const Shape& shape : shapes) {
    // The last rank: the largest rank id and PP stage of the shape.
    Topology t = MakeTopology(shape.tp, shape.stages, shape.tp - 1,
                              static_cast<int64_t>(shape.stages.size()) - 1);
    t.attention_dp = shape.dp;
    tables.push_back({absl::StrCat(model.name, "_", shape.name), Build(model.spec, t)});
  }
  return tables;
}

}  // namespace kvx::transfer_internal
