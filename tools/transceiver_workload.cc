// The built-in model, the sharding of an instance and the request stream.

#include <algorithm>
#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "tools/transceiver_harness.h"
#include "transfer/scenario.h"
#include "transfer/slice.h"
#include "transfer/topology.h"

namespace kvx::harness {
namespace {

constexpr int64_t kMaxSize = int64_t{1} << 20;

// splitmix64: a generator whose sequence is fixed by its definition, so both
// instances, on any machine and standard library, draw the same workload
// (std::uniform_int_distribution is implementation-defined).
class Random {
 public:
  explicit Random(uint64_t seed) : state_(seed) {}
  uint64_t Next() {
    uint64_t z = (state_ += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }
  // Uniform in [lo, hi]. REQUIRES: lo <= hi.
  int64_t Uniform(int64_t lo, int64_t hi) {
    return lo + static_cast<int64_t>(Next() % static_cast<uint64_t>(hi - lo + 1));
  }
  bool Chance(double p) { return static_cast<double>(Next() >> 11) * 0x1.0p-53 < p; }

 private:
  uint64_t state_;
};

}  // namespace

absl::StatusOr<transfer::ModelSpec> BuildModel(const ModelOptions& options) {
  const std::pair<const char*, int64_t> sizes[] = {
      {"num_layers", options.num_layers},        {"num_kv_heads", options.num_kv_heads},
      {"head_size", options.head_size},          {"element_bytes", options.element_bytes},
      {"tokens_per_block", options.tokens_per_block}};
  for (const auto& [name, value] : sizes) {
    if (value < 1 || value > kMaxSize) {
      return absl::InvalidArgumentError(
          absl::StrCat("model size out of [1, 2^20]: ", name, "=", value));
    }
  }
  const int64_t groups = static_cast<int64_t>(options.windows.size());
  if (groups < 1 || groups > options.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the model needs 1..num_layers layer groups (one window each): groups=", groups,
        " num_layers=", options.num_layers));
  }
  transfer::ModelSpec model;
  model.num_layers = options.num_layers;
  model.num_kv_heads = options.num_kv_heads;
  model.head_size = options.head_size;
  model.element_bytes = options.element_bytes;
  model.tokens_per_block = options.tokens_per_block;
  model.is_mla = options.is_mla;
  for (int64_t g = 0; g < groups; ++g) {
    const std::optional<int64_t> window = options.windows[g];
    if (window.has_value() && (*window < 1 || *window > (int64_t{1} << 40))) {
      return absl::InvalidArgumentError(
          absl::StrCat("window out of [1, 2^40]: group=", g, " window=", *window));
    }
    transfer::GroupSpec spec;
    spec.window = window;
    for (int64_t layer = g; layer < options.num_layers; layer += groups) {
      spec.global_layer_ids.push_back(layer);
    }
    model.groups.push_back(std::move(spec));
  }
  return model;
}

absl::StatusOr<transfer::Topology> RankTopology(const Shape& shape, int64_t num_layers,
                                                int64_t rank) {
  if (shape.tp < 1 || shape.pp < 1 || shape.pp > num_layers) {
    return absl::InvalidArgumentError(absl::StrCat(
        "instance shape out of range: tp=", shape.tp, " pp=", shape.pp,
        " num_layers=", num_layers));
  }
  std::vector<int64_t> split = shape.layers_per_pp;
  if (split.empty()) {
    for (int64_t p = 0; p < shape.pp; ++p) {
      split.push_back(num_layers / shape.pp + (p < num_layers % shape.pp ? 1 : 0));
    }
  }
  int64_t sum = 0;
  for (int64_t layers : split) sum += layers;
  if (static_cast<int64_t>(split.size()) != shape.pp || sum != num_layers) {
    return absl::InvalidArgumentError(absl::StrCat(
        "layers_per_pp must have pp entries summing to num_layers: pp=", shape.pp,
        " entries=", split.size(), " sum=", sum, " num_layers=", num_layers));
  }
  if (rank < 0 || rank >= shape.ranks()) {
    return absl::InvalidArgumentError(
        absl::StrCat("rank out of range: rank=", rank, " ranks=", shape.ranks()));
  }
  transfer::Topology topology =
      transfer::MakeTopology(shape.tp, split, rank % shape.tp, rank / shape.tp);
  topology.attention_dp = shape.attention_dp;
  if (absl::Status valid = transfer::ValidateTopology(topology); !valid.ok()) return valid;
  return topology;
}

absl::string_view CancelWhenName(CancelWhen when) {
  switch (when) {
    case CancelWhen::kNone:
      return "none";
    case CancelWhen::kBefore:
      return "before";
    case CancelWhen::kDuring:
      return "during";
    case CancelWhen::kAfter:
      return "after";
  }
  return "unknown";
}

std::vector<int64_t> RequestPlan::aux_tokens() const {
  // The first generated token and a draft token, different for every request.
  return {static_cast<int64_t>(rid % 50000) + 1, prompt_len};
}

RequestPlan MakePlan(uint64_t rid, int64_t prompt_len, int64_t hit_tokens,
                     std::vector<Chunk> chunks) {
  RequestPlan plan;
  plan.rid = rid;
  plan.prompt_len = prompt_len;
  plan.hit_tokens = hit_tokens;
  plan.chunks = chunks.empty() ? std::vector<Chunk>{{0, prompt_len}} : std::move(chunks);
  return plan;
}

absl::StatusOr<std::vector<RequestPlan>> MakeWorkload(const WorkloadOptions& options,
                                                      int64_t tokens_per_block) {
  if (options.requests < 0 || options.requests > (int64_t{1} << 24)) {
    return absl::InvalidArgumentError(
        absl::StrCat("requests out of [0, 2^24]: requests=", options.requests));
  }
  if (options.min_prompt < 1 || options.max_prompt < options.min_prompt ||
      options.max_prompt > (int64_t{1} << 24)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "prompt lengths need 1 <= min_prompt <= max_prompt <= 2^24: min_prompt=",
        options.min_prompt, " max_prompt=", options.max_prompt));
  }
  for (const auto& [name, rate] : {std::pair<const char*, double>{"hit_rate", options.hit_rate},
                                   {"chunk_rate", options.chunk_rate},
                                   {"cancel_rate", options.cancel_rate}}) {
    if (!(rate >= 0 && rate <= 1)) {
      return absl::InvalidArgumentError(absl::StrCat("rate out of [0, 1]: ", name, "=", rate));
    }
  }
  if (options.max_chunks < 2 || options.context_dp_size < 1 ||
      options.generation_dp_size < 1 || tokens_per_block < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "workload sizes out of range: max_chunks=", options.max_chunks,
        " (>= 2) context_dp_size=", options.context_dp_size,
        " generation_dp_size=", options.generation_dp_size,
        " tokens_per_block=", tokens_per_block));
  }
  Random random(options.seed);
  std::vector<RequestPlan> plans;
  plans.reserve(static_cast<size_t>(options.requests));
  for (int64_t i = 0; i < options.requests; ++i) {
    RequestPlan plan;
    plan.rid = options.first_rid + static_cast<uint64_t>(i);
    const int64_t length = random.Uniform(options.min_prompt, options.max_prompt);
    plan.prompt_len = length;
    // Every draw happens for every request, so one request's choices do not shift
    // the next one's.
    const bool hit = random.Chance(options.hit_rate);
    const int64_t hit_kind = random.Uniform(0, 2);
    const int64_t hit_partial = random.Uniform(1, length);
    const int64_t whole_blocks = length / tokens_per_block;
    const int64_t hit_blocks = whole_blocks > 0 ? random.Uniform(1, whole_blocks) : 0;
    if (hit) {
      if (hit_kind == 0 || hit_blocks == 0) {
        plan.hit_tokens = hit_partial;  // often inside a block: floored
      } else if (hit_kind == 1) {
        plan.hit_tokens = hit_blocks * tokens_per_block;
      } else {
        plan.hit_tokens = length;  // the whole prompt
      }
    }
    const bool chunked = random.Chance(options.chunk_rate) && length >= 2;
    const int64_t chunks = random.Uniform(2, options.max_chunks);
    std::vector<int64_t> cuts;
    for (int64_t c = 0; c + 1 < chunks; ++c) cuts.push_back(random.Uniform(1, std::max<int64_t>(1, length - 1)));
    std::sort(cuts.begin(), cuts.end());
    cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());
    int64_t start = 0;
    if (chunked) {
      for (int64_t cut : cuts) {
        if (cut <= start || cut >= length) continue;
        plan.chunks.push_back(Chunk{start, cut});
        start = cut;
      }
    }
    plan.chunks.push_back(Chunk{start, length});
    const bool cancel = random.Chance(options.cancel_rate);
    const int64_t when = random.Uniform(1, 3);
    const bool context_cancels = random.Chance(0.5);
    if (cancel) {
      plan.cancel = static_cast<CancelWhen>(when);
      plan.cancel_side = context_cancels ? Role::kContext : Role::kGeneration;
    }
    plan.keep_stale = random.Chance(0.5);
    plan.draft_block = random.Chance(0.25);
    plan.context_dp_rank = random.Uniform(0, options.context_dp_size - 1);
    plan.generation_dp_rank = random.Uniform(0, options.generation_dp_size - 1);
    plans.push_back(std::move(plan));
  }
  return plans;
}

std::vector<GroupBlocks> GenerationBlocks(const transfer::ModelSpec& model,
                                          const RequestPlan& plan) {
  const int64_t tpb = model.tokens_per_block;
  std::vector<GroupBlocks> blocks;
  for (const transfer::GroupSpec& group : model.groups) {
    GroupBlocks b;
    b.total = transfer::CeilDiv(plan.prompt_len, tpb);
    // SEMANTICS.md section 2, written out here rather than taken from the library
    // under test.
    if (group.window.has_value()) {
      b.stale = std::min(b.total, std::max<int64_t>(0, (plan.prompt_len + 1 - *group.window) / tpb));
    }
    b.first = std::min(b.total, std::max(b.stale, plan.hit_tokens / tpb));
    blocks.push_back(b);
  }
  return blocks;
}

int64_t SlotsFor(const transfer::ModelSpec& model, absl::Span<const RequestPlan> workload,
                 int64_t concurrency) {
  int64_t longest = 1;
  for (const RequestPlan& plan : workload) longest = std::max(longest, plan.prompt_len);
  // Each request holds at most every block of its prompt and a draft block.
  return std::max<int64_t>(1, concurrency) *
             (transfer::CeilDiv(longest, model.tokens_per_block) + 1) +
         1;
}

}  // namespace kvx::harness
